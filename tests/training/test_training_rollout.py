"""Roll-out without restart, cluster path: a promoted version is written into the model
repository of a running stock ``tritonserver`` (the nvidia-pytriton wheel's binary + Python
backend, ``--model-control-mode=explicit``) and loaded through the repository API; the old
version is unloaded after the new one is ready, and the new model answers inference. The
ensembles are the test-only tiny ones (seconds to load), not the trio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlasflow.common.errors import Unavailable
from atlasflow.segmentation.activation import EnsembleRegistry, ReadyCheckLoader, RegistryState
from atlasflow.segmentation.ensemble import triton_model_name
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.testing.triton import BundledTriton
from atlasflow.training.rollout import TritonRepositoryRollout
from atlasflow.training.versions import EnsembleVersion, write_version

TINY = Path(__file__).resolve().parents[1] / "segmentation" / "tiny_ensembles" / "tiny-a-v1.json"


def _version(root: Path, name: str) -> EnsembleVersion:
    folder = root / "versions" / name
    folder.mkdir(parents=True)
    raw = json.loads(TINY.read_text())
    raw["version"] = name
    (folder / "ensemble.json").write_text(json.dumps(raw))
    return EnsembleVersion(name, "sha256:" + "0" * 64, folder)


def _trained_version(state: Path, bump: float = 0.01) -> EnsembleVersion:
    """A version as training writes it (weights + model card) of tiny-a-v1."""
    import torch

    from atlasflow.segmentation.ensemble import load_ensemble
    from atlasflow.segmentation.models import build_member

    parent = load_ensemble(TINY)
    state.mkdir(parents=True, exist_ok=True)
    weights = {}
    for m in parent.members:
        net = build_member(m)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(bump)
        weights[m.name] = state / f"{m.name}-{bump}.pt"
        torch.save(net.state_dict(), weights[m.name])
    return write_version(
        state,
        parent,
        weights,
        manifest_digest="sha256:" + "1" * 64,
        hyperparameters={"bump": bump},
        train_cases=1,
        holdout_cases=0,
        metrics={},
    )


def test_promoted_version_is_loaded_into_a_running_triton(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_repository(repo, TINY)
    old = triton_model_name("tiny-a-v1")
    server = BundledTriton(
        repo, tmp_path / "work", [old], extra_args=["--model-control-mode=explicit", f"--load-model={old}"]
    ).start()
    try:
        new_version = _trained_version(tmp_path / "state")
        rollout = TritonRepositoryRollout(server.grpc_url, repo, previous=old, ready_timeout_s=240)
        client = rollout.client()
        assert not client.is_model_ready(triton_model_name(new_version.name))
        outcome = rollout(new_version)
        new = triton_model_name(new_version.name)
        assert outcome == f"triton: loaded {new}, unloaded {old}"
        assert client.is_model_ready(new) and not client.is_model_ready(old)
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index[new] == "READY" and index[old] in ("UNLOADING", "UNAVAILABLE")  # unload drains first
        assert not list(repo.glob(".staging-*"))
        # the new model serves the segmentation client unchanged
        seg = TritonSegmenter(server.grpc_url, new, shm="off")
        try:
            vol = np.full((24, 24, 16), -1000, dtype=np.int16)
            vol[6:18, 6:18, 4:12] = 60
            out = seg.segment(vol, np.diag([2.0, 2.0, 3.0, 1.0]))
            assert out.labels.shape == vol.shape
        finally:
            seg.close()
        # segmentation in cluster mode (ACTIVATION=repository) then activates it: the weights
        # are checked against the model card, the model must be ready, the default swaps
        promoted = new_version
        registry = EnsembleRegistry(RegistryState(("tiny-a-v1",), {"tiny-a-v1": object()}))

        def ready(model: str) -> bool:
            probe = TritonSegmenter(server.grpc_url, model, shm="off")
            try:
                return probe.ready()
            finally:
                probe.close()

        made: list[str] = []
        _, after, model = registry.activate(
            tmp_path / "state" / "versions", promoted.name, ReadyCheckLoader(ready), made.append
        )
        assert after.default == promoted.name and model == triton_model_name(promoted.name) and made == [model]
        with pytest.raises(Unavailable) as exc:  # a version Triton was never told to load
            registry.activate(
                tmp_path / "state" / "versions",
                _trained_version(tmp_path / "state", 0.03).name,
                ReadyCheckLoader(ready),
                made.append,
            )
        assert exc.value.reason == "TRITON_LOAD_FAILED"
    except Exception:
        print(server.log_tail(80))
        raise
    finally:
        server.stop()


def test_a_refused_load_is_a_clear_error(tmp_path: Path) -> None:
    class Refusing:
        def load_model(self, name: str) -> None:
            raise RuntimeError("load failed")

    version = _version(tmp_path, "tiny-a-ft-refused00000")
    rollout = TritonRepositoryRollout("unused:1", tmp_path / "models", client=Refusing())
    with pytest.raises(Unavailable) as exc:
        rollout(version)
    assert exc.value.reason == "TRITON_LOAD_FAILED"
    assert (tmp_path / "models" / triton_model_name(version.name) / "config.pbtxt").is_file()


def test_a_version_with_imported_members_is_written_and_loaded_under_segmentations_name(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With segmentation's IMPORTED_MODELS (here the session's tiny nnU-Net model): the promoted
    version's model is `<model>__with_<sha12>`, the name segmentation's repository activation
    waits for; the member's PyTorch-backend entry is moved into the repository (kept when already
    there) and loaded before the ensemble on every replica. Triton here is a recording client:
    the test tritonserver has the Python backend only, no libtorch for the member's entry."""
    from tests.models import nnunet_fixture as fx

    from atlasflow.models.export import triton_model_name as entry_name
    from atlasflow.models.nnunet import import_nnunet
    from atlasflow.segmentation.imported import resolve, served_model_name
    from atlasflow.training.rollout import from_settings
    from atlasflow.training.settings import PREFIX, TrainingSettings

    registry = tmp_path / "registry"
    manifest = import_nnunet(fx.shared_model_folder(tmp_path_factory), "tiny", registry)
    repo = tmp_path / "models"

    class Recording:
        def __init__(self) -> None:
            self.loaded: list[str] = []

        def load_model(self, name: str) -> None:
            self.loaded.append(name)

        def is_model_ready(self, name: str) -> bool:
            return name in self.loaded

    settings = TrainingSettings.from_env(
        PREFIX,
        {
            PREFIX + "TRITON_URL": "triton:8001",
            PREFIX + "TRITON_MODEL_REPOSITORY": str(repo),
            PREFIX + "IMPORTED_MODELS": "tiny",
            PREFIX + "MODELS_STATE_DIR": str(registry),
        },
    )
    rollout = from_settings(settings)
    assert rollout is not None and rollout.members == ("tiny",)
    rollout._client = client = Recording()  # what clients() uses in place of every replica
    version = _version(tmp_path / "state", "tiny-a-ft-members0000000")
    outcome = rollout(version)
    # the name segmentation computes (activation.py: served_model_name over IMPORTED_MODELS)
    expected = served_model_name(triton_model_name(version.name), resolve(registry, ["tiny"]))
    entry = entry_name(manifest)
    assert expected.startswith(triton_model_name(version.name) + "__with_")
    assert client.loaded == [entry, expected] and outcome == f"triton: loaded {expected}"
    assert (repo / expected / "config.pbtxt").is_file() and (repo / entry / "config.pbtxt").is_file()
    card = json.loads((repo / expected / "1" / "MANIFEST.json").read_text())
    assert card["imported_members"] == [f"tiny@{manifest.digest[:12]}"]
    assert not list(repo.glob(".staging-*"))
    # the next version: the entry already in the repository and served is kept, not reloaded
    marker = repo / entry / "kept"
    marker.write_text("x")
    second = _version(tmp_path / "state2", "tiny-a-ft-members0000001")
    client.loaded = [entry]
    rollout(second)
    assert marker.is_file()
    assert client.loaded == [entry, served_model_name(triton_model_name(second.name), resolve(registry, ["tiny"]))]
