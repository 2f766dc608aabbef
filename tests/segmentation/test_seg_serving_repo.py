"""`atlasflow triton-repo`: the model repository served by a real (wheel-bundled) tritonserver.

One repository holds the shipped trio (`abdomen-trio-v1`) and a test-only tiny ensemble whose
members load state_dict checkpoints (so the copy of weights into the repository is exercised);
the server is the stock ``tritonserver`` binary + Python backend from the nvidia-pytriton
wheel, not PyTriton. The demo CT through tritonclient must equal the in-process pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from atlasflow.cli.main import main as cli_main
from atlasflow.common.errors import InvalidArgument
from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.segmentation.models import build_member
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_repo import PythonBackendModel, config_pbtxt
from atlasflow.testing.data import TEST_DATA
from atlasflow.testing.triton import BundledTriton

DEMO_CT = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
TINY = Path(__file__).parent / "tiny_ensembles" / "tiny-a-v1.json"


def _trained_tiny(tmp: Path) -> Path:
    """tiny-a-v1 with state_dict checkpoints (weights from other seeds) -> new JSON path."""
    raw = json.loads(TINY.read_text())
    raw["version"] = "tiny-ckpt-v1"
    cfg = load_ensemble(TINY)
    (tmp / "w").mkdir()
    for m_raw, m in zip(raw["members"], cfg.members):
        torch.manual_seed(0)
        net = build_member(m)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        torch.save({"state_dict": net.state_dict()}, tmp / "w" / f"{m.name}.pt")
        m_raw["checkpoint"] = f"w/{m.name}.pt"
    path = tmp / "tiny-ckpt-v1.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("repo")
    ckpt_json = _trained_tiny(tmp)
    out = tmp / "models"
    rc = cli_main(
        [
            "triton-repo",
            str(out),
            "--kind",
            "cpu",
            "--instances",
            "1",
            "--ensemble",
            "abdomen-trio-v1",
            "--ensemble",
            str(ckpt_json),
        ]
    )
    assert rc == 0
    return SimpleNamespace(out=out, ckpt_json=ckpt_json, work=tmp)


@pytest.fixture(scope="module")
def server(repo: SimpleNamespace) -> Iterator[BundledTriton]:
    srv = BundledTriton(repo.out, repo.work, ["abdomen_trio_v1", "tiny_ckpt_v1"]).start()
    print(f"\nbundled tritonserver start-up (process -> models ready): {srv.startup_s:.1f} s")
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def test_repository_layout_and_bundle(repo: SimpleNamespace) -> None:
    model = repo.out / "tiny_ckpt_v1"
    cfg_text = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg_text and "kind: KIND_CPU" in cfg_text and "count: 1" in cfg_text
    assert 'string_value: "ensemble/tiny-ckpt-v1.json"' in cfg_text
    assert "import triton_python_backend_utils" in (model / "1" / "model.py").read_text()
    bundled = json.loads((model / "1" / "ensemble" / "tiny-ckpt-v1.json").read_text())
    assert [m["checkpoint"] for m in bundled["members"]] == ["weights/unet_a.pt", "weights/unet_b.pt"]
    for name in ("unet_a", "unet_b"):
        copied = (model / "1" / "ensemble" / "weights" / f"{name}.pt").read_bytes()
        assert copied == (repo.ckpt_json.parent / "w" / f"{name}.pt").read_bytes()
    manifest = json.loads((model / "1" / "MANIFEST.json").read_text())
    assert manifest["model_name"] == "tiny_ckpt_v1" and "1/ensemble/weights/unet_a.pt" in manifest["files"]
    trio = load_ensemble(repo.out / "abdomen_trio_v1" / "1" / "ensemble" / "abdomen-trio-v1.json")
    shipped = load_ensemble("abdomen-trio-v1")
    assert [m.kwargs for m in trio.members] == [m.kwargs for m in shipped.members]
    assert trio.weights_trained == shipped.weights_trained


def test_config_pbtxt_gpu_instances_and_bad_kind() -> None:
    text = config_pbtxt("m", "ensemble/x.json", instances=3, kind="gpu", gpus=[0, 1])
    assert "count: 3" in text and "kind: KIND_GPU" in text and "gpus: [ 0, 1 ]" in text
    with pytest.raises(InvalidArgument):
        config_pbtxt("m", "e.json", kind="tpu")
    with pytest.raises(InvalidArgument):
        config_pbtxt("m", "e.json", instances=0)


def test_demo_ct_through_stock_triton_equals_in_process(server: BundledTriton) -> None:
    img = nib.load(str(DEMO_CT))
    vol = np.asanyarray(img.dataobj).astype(np.int16)
    flags = np.zeros(9, np.uint8)
    flags[4] = 1
    with TritonSegmenter(server.grpc_url, "abdomen_trio_v1", shm="off") as client:
        t0 = time.perf_counter()
        remote = client.segment(vol, img.affine, labelled_organs=[5])
        t_remote = time.perf_counter() - t0
    t0 = time.perf_counter()
    local = EnsemblePipeline("abdomen-trio-v1")(vol, img.affine, flags)
    print(
        f"\ndemo CT {vol.shape}: stock-Triton round trip {t_remote:.1f} s, in-process {time.perf_counter() - t0:.1f} s"
    )
    assert local.labels.any()
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.heatmap, local.heatmap)
    np.testing.assert_allclose(remote.organ_stats, local.organ_stats, rtol=1e-12)
    assert remote.weights_trained is local.weights_trained


def test_checkpointed_tiny_ensemble_and_domain_error(server: BundledTriton, repo: SimpleNamespace) -> None:
    vol = np.full((40, 34, 26), -1000, dtype=np.int16)
    vol[8:32, 6:28, 4:22] = 60
    aff = np.array([[0, 0, -2.5, 30], [-3.0, 0, 0, 10], [0, 3.0, 0, -5], [0, 0, 0, 1]])
    with TritonSegmenter(server.grpc_url, "tiny_ckpt_v1") as client:
        remote = client.segment(vol, aff)
        assert client.last_transport == "shm"  # loopback server, ATLASFLOW_SEGMENTATION_TRITON_SHM unset = auto
        with pytest.raises(InvalidArgument) as err:
            client.segment(vol, np.zeros((4, 4)))
    local = EnsemblePipeline(str(repo.ckpt_json))(vol, aff)
    assert remote.weights_trained is True
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.heatmap, local.heatmap)
    assert err.value.reason == "INVALID_AFFINE" and "Traceback" not in err.value.message


def test_backend_model_reads_traceparent_parameter(repo: SimpleNamespace) -> None:
    """PythonBackendModel with a stand-in for Triton's pb_utils module (Triton's API, not ours)."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class Response:
        def __init__(self, output_tensors: list, error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class Request:
        def __init__(self, params: str, tensors: dict[str, np.ndarray]) -> None:
            self._params, self.tensors = params, tensors

        def parameters(self) -> str:
            return self._params

    pb = SimpleNamespace(
        Tensor=Tensor,
        InferenceResponse=Response,
        TritonError=lambda msg: msg,
        get_input_tensor_by_name=lambda req, name: Tensor(name, req.tensors[name]),
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    class Model(PythonBackendModel):
        pb_utils = pb
        tracer_provider = provider

    model = Model()
    model_dir = repo.out / "tiny_ckpt_v1"
    model.initialize(
        {
            "model_config": json.dumps(
                {
                    "name": "tiny_ckpt_v1",
                    "parameters": {"atlasflow_ensemble_file": {"string_value": "ensemble/tiny-ckpt-v1.json"}},
                }
            ),
            "model_repository": str(model_dir),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_name": "tiny_ckpt_v1",
        }
    )
    vol = np.full((20, 18, 16), -1000, np.int16)
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    ok, bad = model.execute(
        [
            Request(
                json.dumps({"traceparent": f"00-{trace_id}-{parent}-01"}),
                {"volume": vol, "affine": np.diag([3.0, 3.0, 3.0, 1.0]), "labelled_organs": np.zeros(9, np.uint8)},
            ),
            Request("{}", {"volume": vol, "affine": np.zeros((4, 4)), "labelled_organs": np.zeros(9, np.uint8)}),
        ]
    )
    assert ok.error is None and [t.name for t in ok.output_tensors] == [
        "labels",
        "heatmap",
        "organ_stats",
        "weights_trained",
    ]
    assert ok.output_tensors[0].array.shape == vol.shape
    assert bad.error.startswith("ATLASFLOW_ERROR INVALID_ARGUMENT INVALID_AFFINE:")
    spans = [s for s in exporter.get_finished_spans() if s.name == "segmentation.pipeline"]
    assert format(spans[0].context.trace_id, "032x") == trace_id
    assert format(spans[0].parent.span_id, "016x") == parent
    assert spans[1].parent is None
