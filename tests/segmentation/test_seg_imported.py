"""An imported nnU-Net v2 model as a member of the served ensemble, through the service path.

The tiny nnU-Net model of `tests.models.nnunet_fixture` (trained once per test session, shared
with tests/models) predicts liver, spleen and "kidney" (both kidneys in one label, which maps
to no atlasflow organ): on atlasflow's nine organs it has an opinion on liver and spleen only.
It is imported into a registry, a real local Triton (PyTriton, `triton_server --ensemble
abdomen-trio-v1 --member tiny`) serves the demo trio's pipeline with it as a fourth member
and its exported network, and the segmentation service (in-process, real gRPC, real worker,
``IMPORTED_MODELS=tiny``) segments one small CT. The job's output is compared with the
library's heterogeneous computation (`atlasflow.segmentation.heterogeneous`) of the trio's
soft predictions and the imported model's label map (`atlasflow segment`'s path).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from tests.models import monai_bundle_fixture as mb
from tests.models import nnunet_fixture as fx

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import InvalidArgument, NotFound, Unavailable
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.common.ports import free_ports
from atlasflow.common.v1 import common_pb2
from atlasflow.method.prior import PopulationPrior
from atlasflow.method.strategy import get_strategy
from atlasflow.models.export import triton_model_name
from atlasflow.models.monai_bundle import import_monai_bundle
from atlasflow.models.nnunet import import_nnunet
from atlasflow.models.registry import Manifest, ModelRegistry
from atlasflow.models.segment import served_model
from atlasflow.segmentation.activation import EnsembleRegistry, ReadyCheckLoader, RegistryState
from atlasflow.segmentation.app import build_app
from atlasflow.segmentation.attention import strategy_attention
from atlasflow.segmentation.ensemble import ForegroundCrop, load_ensemble
from atlasflow.segmentation.heterogeneous import (
    CommonGrid,
    MemberOutput,
    common_grid,
    ensemble_labels,
    heterogeneous_attention,
)
from atlasflow.segmentation.imported import ImportedMember, parse_names, resolve, served_model_name
from atlasflow.segmentation.pipeline import EnsemblePipeline, foreground_box
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.segmentation.v1 import segmentation_pb2 as pb
from atlasflow.segmentation.v1 import segmentation_pb2_grpc
from atlasflow.testing import auth
from atlasflow.testing.triton import BundledTriton, LocalTriton

S = common_pb2
ENSEMBLE = "abdomen-trio-v1"
TINY_A = Path(__file__).parent / "tiny_ensembles" / "tiny-a-v1.json"
PREDICTED = {ORGAN_IDS["liver"], ORGAN_IDS["spleen"]}  # the tiny model's organs among atlasflow's


class AppThread:
    """The segmentation ServiceApp on its own event loop in a thread, plus a sync gRPC stub."""

    def __init__(self, settings: SegmentationSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = self._run(self._build(settings))
        self.channel = sync_channel(f"127.0.0.1:{self.app.port}")
        self.stub = segmentation_pb2_grpc.SegmentationServiceStub(self.channel)

    async def _build(self, settings: SegmentationSettings):
        app = await build_app(settings)
        await app.start()
        return app

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def wait(self, job_id: str, pred: Callable[[pb.SegmentationJob], bool], timeout: float) -> pb.SegmentationJob:
        deadline = time.monotonic() + timeout
        while True:
            job = self.stub.GetSegmentationJob(pb.GetSegmentationJobRequest(job_id=job_id)).job
            if pred(job):
                return job
            assert time.monotonic() < deadline, f"timed out; job is {job}"
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()
        self._run(self.app.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A registry with the session's tiny nnU-Net model imported as ``tiny``."""
    state = tmp_path_factory.mktemp("seg-imported-registry")
    return state, import_nnunet(fx.shared_model_folder(tmp_path_factory), "tiny", state)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, registry: tuple[Path, Manifest]) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("seg-imported")
    state, manifest = registry
    triton = LocalTriton([f"--ensemble={ENSEMBLE}", "--member=tiny", f"--state-dir={state}"]).start()
    url, lines = triton.url, triton.lines
    dead = free_ports(2)
    settings = SegmentationSettings(
        grpc_port=0,
        data_dir=str(tmp / "data"),
        blob_dir=str(tmp / "blobs"),
        triton_url=url,
        ensemble=ENSEMBLE,
        imported_models="tiny",
        models_state_dir=str(state),
        labels_target=f"127.0.0.1:{dead[0]}",
        ranking_target=f"127.0.0.1:{dead[1]}",
        worker_poll_s=0.05,
        triton_timeout_s=600.0,
        **auth.auth_settings("segmentation"),
    )
    app = AppThread(settings)
    img = nib.load(str(fx.CT_SM))
    vol = np.asanyarray(img.dataobj).astype(np.int16)
    aff = np.asarray(img.affine, dtype=np.float64)
    blobs = LocalBlobStore(settings.blob_dir)
    yield SimpleNamespace(
        app=app, url=url, state=state, manifest=manifest, vol=vol, aff=aff, blobs=blobs, lines=lines, tmp=tmp
    )
    app.close()
    triton.stop()


def test_imported_member_votes_where_it_predicts_and_has_no_opinion_elsewhere(stack: SimpleNamespace) -> None:
    blob = stack.blobs.put(to_nifti_bytes(stack.vol, stack.aff))
    job = stack.app.stub.SegmentSeries(
        pb.SegmentSeriesRequest(
            case_id="case-imported",
            series_id="ser-1",
            series_version=1,
            volume=S.BlobRef(digest=blob.digest, size_bytes=blob.size_bytes),
        )
    ).job
    done = stack.app.wait(job.job_id, lambda j: j.state in (S.OPERATION_STATE_SUCCEEDED, S.OPERATION_STATE_FAILED), 900)
    assert done.state == S.OPERATION_STATE_SUCCEEDED, (done.error_reason, stack.lines[-20:])
    assert done.ensemble_version == ENSEMBLE
    assert list(done.result.members) == ["unet", "swin_unetr", "dynunet", f"tiny@{stack.manifest.digest[:12]}"]
    labels, affine = from_nifti_bytes(stack.blobs.get(done.result.label_map.digest))
    heat, _ = from_nifti_bytes(stack.blobs.get(done.result.heatmap.digest))
    assert labels.shape == heat.shape == stack.vol.shape  # geometry exact: the CT's grid
    np.testing.assert_array_equal(affine, stack.aff)
    assert set(np.unique(labels).tolist()) <= set(range(10))  # atlasflow's organ ids
    voxel_ml = abs(float(np.linalg.det(stack.aff[:3, :3]))) / 1000.0
    job_attention = {k + 1: round(o.attention_ml / voxel_ml) for k, o in enumerate(done.result.organs)}

    # the reference: the trio's soft predictions (in process) + the imported model's label map
    # (`atlasflow segment`'s path, its network on the same Triton), mapped by organ name
    trio = EnsemblePipeline(ENSEMBLE).soft_predictions(stack.vol, stack.aff)
    spacing = [float(v) for v in np.linalg.norm(stack.aff[:3, :3], axis=0)]
    with served_model(stack.state, "tiny", triton_url=stack.url) as model:
        tiny_map = model(stack.vol, spacing)
    tiny = common_grid(
        [MemberOutput("tiny", dict(stack.manifest.labels), stack.aff, label_map=tiny_map)],
        stack.aff,
        stack.vol.shape,
    )
    assert {o for o in ORGANS if tiny.available[o][0]} == PREDICTED
    grid = CommonGrid(
        {o: torch.cat([trio[o], tiny.probs[o]]) for o in ORGANS},
        {o: [True, True, True, tiny.available[o][0]] for o in ORGANS},
        ["unet", "swin_unetr", "dynunet", "tiny"],
    )
    np.testing.assert_array_equal(labels, ensemble_labels(grid))
    case = heterogeneous_attention(grid)
    assert job_attention == {o: case.organs[o].attention_voxels() for o in ORGANS}
    assert heat.max() > 0

    # the organs the tiny model does not predict: attention from the trio alone ...
    trio_only = CommonGrid(trio, {o: [True, True, True] for o in ORGANS}, grid.members[:3])
    trio_case = heterogeneous_attention(trio_only)
    for o in set(ORGANS) - PREDICTED:
        assert job_attention[o] == trio_case.organs[o].attention_voxels(), ORGANS[o]
    # ... which is not what counting its silence as background would give
    as_background = CommonGrid(grid.probs, {o: [True] * 4 for o in ORGANS}, grid.members)
    assert (ensemble_labels(as_background) != labels).any()
    # where it predicts, its votes change the result
    trio_labels = ensemble_labels(trio_only)
    assert any(job_attention[o] != trio_case.organs[o].attention_voxels() for o in PREDICTED)
    liver = ORGAN_IDS["liver"]
    assert ((labels == liver) != (trio_labels == liver)).any()


def test_imported_members_are_named_by_digest(tmp_path: Path, stack: SimpleNamespace) -> None:
    members = resolve(stack.state, ["tiny"])
    assert members == [ImportedMember("tiny", stack.manifest.digest)]
    name = served_model_name("abdomen_trio_v1", members)
    assert name.startswith("abdomen_trio_v1__with_") and served_model_name("abdomen_trio_v1", []) == "abdomen_trio_v1"
    assert served_model_name("abdomen_trio_v1", [ImportedMember("tiny", "0" * 64)]) != name  # other weights
    # the Triton server binds exactly that name
    with TritonSegmenter(stack.url, name) as seg:
        assert seg.ready()
    with pytest.raises(NotFound) as err:
        resolve(stack.state, ["nope"])
    assert err.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(InvalidArgument) as bad:
        parse_names("tiny, tiny")
    assert bad.value.reason == "INVALID_IMPORTED_MODELS"
    with pytest.raises(InvalidArgument) as no_dir:
        resolve("", ["tiny"])
    assert no_dir.value.reason == "MODELS_STATE_DIR_NOT_CONFIGURED"


def _version_of(ensemble: Path, versions_dir: Path) -> str:
    """``ensemble`` as a promoted version in ``versions_dir`` (weights + model card, the layout
    `activation.verify_version_card` checks) under its own version name."""
    raw = json.loads(ensemble.read_text())
    folder = versions_dir / raw["version"]
    folder.mkdir(parents=True)
    digests = {}
    for member in raw["members"]:
        src = (ensemble.parent / member["checkpoint"]).resolve()
        member["checkpoint"] = str(src)
        digests[member["name"]] = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    (folder / "ensemble.json").write_text(json.dumps(raw))
    (folder / "model_card.json").write_text(json.dumps({"weights": digests}))
    return str(raw["version"])


def test_an_activated_version_is_served_with_the_imported_members(tmp_path: Path, stack: SimpleNamespace) -> None:
    """Cluster mode (ACTIVATION=repository): the version's Triton model is its `__with_` name
    (the stack's Triton serves only that one) and its member list ends with the imported ones."""
    versions = tmp_path / "versions"
    source = load_ensemble(ENSEMBLE).source
    assert source is not None
    name = _version_of(source, versions)
    members = resolve(stack.state, ["tiny"])

    def ready(model: str) -> bool:
        with TritonSegmenter(stack.url, model) as probe:
            return probe.ready()

    registry = EnsembleRegistry(RegistryState(("other-v1",), {"other-v1": object()}), members)
    made: list[str] = []
    _, after, model = registry.activate(versions, name, ReadyCheckLoader(ready, members), made.append)
    assert model == served_model_name("abdomen_trio_v1", members) and made == [model]
    assert after.default == name
    assert after.members[name] == ["unet", "swin_unetr", "dynunet", f"tiny@{stack.manifest.digest[:12]}"]
    # again: nothing loaded, the same name
    assert registry.activate(versions, name, ReadyCheckLoader(ready, members), made.append)[2] == model
    # without the members the bare model is checked, which this Triton does not serve
    with pytest.raises(Unavailable) as bare:
        ReadyCheckLoader(ready).load(load_ensemble(versions / name / "ensemble.json"))
    assert bare.value.reason == "TRITON_LOAD_FAILED" and bare.value.metadata["model"] == "abdomen_trio_v1"


def test_cluster_repository_has_the_members_and_their_pytorch_backend_entries(
    tmp_path: Path, registry: tuple[Path, Manifest]
) -> None:
    """`atlasflow triton-repo --member`: the layout and configs a stock Triton loads (its
    PyTorch backend cannot run here: the wheel-bundled tritonserver has the Python backend only)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    state, manifest = registry
    out = tmp_path / "repo"
    model_dir = write_repository(out, ENSEMBLE, kind="gpu", members=["tiny"], models_state_dir=state)
    name = served_model_name("abdomen_trio_v1", [ImportedMember("tiny", manifest.digest)])
    net_dir = out / triton_model_name(manifest)
    assert sorted(p.name for p in out.iterdir()) == sorted([name, net_dir.name])
    # the ensemble: Python backend, named with its members, the member's registry copied and intact
    ens = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert model_dir == out / name and ens.name == name and ens.backend == "python"
    assert ens.parameters["atlasflow_imported_models"].string_value == "tiny"
    assert ModelRegistry(model_dir / "1" / "ensemble").verify("tiny").digest == manifest.digest
    # the member's network: what Triton's PyTorch backend expects (model.pt in version 1,
    # INPUT__i / OUTPUT__i names, no model name in the config: the folder names it)
    net = text_format.Parse((net_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert net.backend == "pytorch" and net.name == "" and net.max_batch_size == 0
    assert [(t.name, t.data_type) for t in net.input] == [("INPUT__0", mc.TYPE_FP32), ("INPUT__1", mc.TYPE_INT64)]
    assert [(t.name, t.data_type) for t in net.output] == [("OUTPUT__0", mc.TYPE_FP32)]
    assert sorted(str(p.relative_to(net_dir)) for p in net_dir.rglob("*") if p.is_file()) == [
        "1/model.pt",
        "config.pbtxt",
    ]
    window = [int(d) for d in net.input[0].dims[2:]]
    module = torch.jit.load(str(net_dir / "1" / "model.pt"))  # what libtorch loads
    with torch.inference_mode():
        y = module(torch.zeros((2, 1, *window)), torch.tensor([1]))
    assert tuple(y.shape) == (2, *[int(d) for d in net.output[0].dims[1:]])


class Recorder:
    """The real imported model, its answers kept for the test's reference."""

    def __init__(self, model: Any) -> None:
        self.model, self.manifest = model, model.manifest
        self.needs_affine = bool(getattr(model, "needs_affine", False))
        self.answers: list[np.ndarray] = []

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.answers.append(self.model(*args, **kwargs))
        return self.answers[-1]


@pytest.fixture(scope="module")
def cropped(tmp_path_factory: pytest.TempPathFactory, registry: tuple[Path, Manifest]) -> SimpleNamespace:
    """A cheap test ensemble (tiny-a: two seeded 1-level U-Nets) with the foreground crop and
    the ``enhanced`` (whole-case) strategy, plus two imported members of different label sets:
    the nnU-Net model (liver, spleen) and a MONAI bundle (liver, spleen, both kidneys; its
    inference needs the affine), run in process on the small CT; the members' answers kept."""
    state, _ = registry
    tmp = tmp_path_factory.mktemp("seg-imported-crop")
    import_monai_bundle(mb.shared_bundle(tmp_path_factory), "bundle", state, replace=True)
    raw = json.loads(TINY_A.read_text())
    raw.update(
        format=2,
        version="tiny-crop-v1",
        attention={"mode": "enhanced"},
        foreground_crop={"threshold_hu": -500, "margin_mm": 10},
    )
    ensemble = tmp / "tiny-crop-v1.json"
    ensemble.write_text(json.dumps(raw))
    img = nib.load(str(fx.CT_SM))
    vol = np.asanyarray(img.dataobj).astype(np.int16)
    aff = np.asarray(img.affine, dtype=np.float64)
    pipe = EnsemblePipeline(str(ensemble), imported=["tiny", "bundle"], models_state_dir=state)
    recorders = [Recorder(model) for _, model in pipe.imported]
    pipe.imported = [(member, rec) for (member, _), rec in zip(pipe.imported, recorders)]
    out = pipe(vol, aff)
    return SimpleNamespace(
        state=state, tmp=tmp, ensemble=ensemble, pipe=pipe, recorders=recorders, vol=vol, aff=aff, out=out
    )


def test_pipeline_with_foreground_crop_and_a_whole_case_strategy(cropped: SimpleNamespace) -> None:
    """In process: the crop and the whole-case strategy (`strategy_attention` with
    ``available``) with the two imported members equal the library on the cropped grid."""
    pipe, recorders, vol, aff, out = cropped.pipe, cropped.recorders, cropped.vol, cropped.aff, cropped.out
    box = foreground_box(vol, aff, ForegroundCrop())
    assert box is not None and tuple(b.stop - b.start for b in box) != vol.shape
    sub_aff = aff.copy()
    sub_aff[:3, 3] = aff[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + aff[:3, 3]

    outputs = []
    for name, rec in zip(["tiny", "bundle"], recorders):
        (label_map,) = rec.answers  # each member ran once, on the whole CT (before the crop)
        assert label_map.shape == vol.shape
        outputs.append(MemberOutput(name, dict(rec.manifest.labels), aff, label_map=label_map))
    assert recorders[1].needs_affine and not recorders[0].needs_affine
    mapped = common_grid(outputs, aff, vol.shape)
    assert {o for o in ORGANS if mapped.available[o][1]} == {
        *PREDICTED,
        *(ORGAN_IDS[k] for k in ("kidney_left", "kidney_right")),
    }
    soft = pipe.soft_predictions(vol, aff)  # the test ensemble's two members (zeros outside the box)
    probs = {o: torch.cat([soft[o], mapped.probs[o]])[(slice(None), *box)].contiguous() for o in ORGANS}
    available = {o: [True, True, *mapped.available[o]] for o in ORGANS}
    expected = np.zeros(vol.shape, dtype=np.uint8)
    expected[box] = ensemble_labels(CommonGrid(probs, available, ["unet_a", "unet_b", "tiny", "bundle"]))
    np.testing.assert_array_equal(out.labels, expected)
    assert {int(v) for v in np.unique(out.labels)} & PREDICTED  # the members' organs are in the vote

    organs = strategy_attention(
        probs, sub_aff, [], strategy=get_strategy("enhanced"), prior=PopulationPrior.load(), available=available
    )
    voxel_ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
    got = {o: round(out.organ_stats[o - 1, 1] / voxel_ml) for o in ORGANS}
    assert got == {o: int(organs[o].attention.sum()) if o in organs else 0 for o in ORGANS}
    heat = torch.zeros(tuple(b.stop - b.start for b in box), dtype=torch.float32)
    for o in organs.values():
        heat[o.box] = torch.maximum(heat[o.box], torch.from_numpy(o.heatmap))
    np.testing.assert_array_equal(out.heatmap[box], (heat.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy())


# A stand-in for Triton's PyTorch backend (absent from the wheel-bundled tritonserver): the
# Python backend running the same exported TorchScript file with the same tensors.
TORCHSCRIPT_STANDIN = """
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = Path(args["model_repository"]) / str(args["model_version"]) / "model.pt"
        self.module = torch.jit.load(str(path)).eval()

    def execute(self, requests):
        out = []
        for request in requests:
            args = [torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "INPUT__0").as_numpy().copy())]
            fold = pb_utils.get_input_tensor_by_name(request, "INPUT__1")
            if fold is not None:
                args.append(torch.from_numpy(fold.as_numpy().copy()))
            with torch.inference_mode():
                y = self.module(*args)
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT__0", y.float().numpy())]))
        return out
"""


def test_cluster_repository_served_by_tritonserver_equals_in_process(cropped: SimpleNamespace) -> None:
    """`atlasflow triton-repo --member` served by the real (wheel-bundled) tritonserver: the
    Python-backend ensemble runs the members' pre/post-processing and calls their networks by
    BLS (`model_serving.BlsNetwork`); the members' entries run their ``model.pt`` through a
    Python-backend stand-in for the PyTorch backend (the only part not the cluster's). The
    answer equals the in-process pipeline exactly."""
    out_dir = cropped.tmp / "repo"
    model_dir = write_repository(
        out_dir, cropped.ensemble, kind="cpu", members=["tiny", "bundle"], models_state_dir=cropped.state
    )
    registry = ModelRegistry(cropped.state)
    nets = [triton_model_name(registry.get(n)) for n in ("tiny", "bundle")]
    for net in nets:
        config = out_dir / net / "config.pbtxt"
        assert 'backend: "pytorch"' in config.read_text()
        config.write_text(config.read_text().replace('backend: "pytorch"', 'backend: "python"'))
        (out_dir / net / "1" / "model.py").write_text(TORCHSCRIPT_STANDIN)
    server = BundledTriton(out_dir, cropped.tmp / "work", [model_dir.name, *nets]).start(timeout_s=300)
    try:
        with TritonSegmenter(server.grpc_url, model_dir.name, shm="off", timeout_s=600) as client:
            remote = client.segment(cropped.vol, cropped.aff)
    finally:
        assert server.stop() == 0, server.log_tail()
    np.testing.assert_array_equal(remote.labels, cropped.out.labels)
    np.testing.assert_array_equal(remote.heatmap, cropped.out.heatmap)
    np.testing.assert_array_equal(remote.organ_stats, cropped.out.organ_stats)


def test_local_stack_starts_its_triton_with_the_members(tmp_path: Path) -> None:
    from atlasflow.cli.local import LocalDeployment

    env = {
        "ATLASFLOW_SEGMENTATION_IMPORTED_MODELS": "tiny, bundle",
        "ATLASFLOW_SEGMENTATION_MODELS_STATE_DIR": str(tmp_path / "state"),
    }
    stack = LocalDeployment.create(tmp_path, auto_ports=True, extra_env=env)
    argv = stack._command("triton")
    assert argv[-3:] == ["--member=tiny", "--member=bundle", f"--state-dir={tmp_path / 'state'}"]
    plain = LocalDeployment.create(tmp_path, auto_ports=True, extra_env={"ATLASFLOW_SEGMENTATION_IMPORTED_MODELS": ""})
    assert not any(a.startswith("--member") for a in plain._command("triton"))
