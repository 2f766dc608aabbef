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

from atlasflow.segmentation.ensemble import triton_model_name
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.testing.triton import BundledTriton
from atlasflow.training.rollout import TritonRepositoryRollout
from atlasflow.training.versions import EnsembleVersion

TINY = Path(__file__).resolve().parents[1] / "segmentation" / "tiny_ensembles" / "tiny-a-v1.json"


def _version(root: Path, name: str) -> EnsembleVersion:
    folder = root / "versions" / name
    folder.mkdir(parents=True)
    raw = json.loads(TINY.read_text())
    raw["version"] = name
    (folder / "ensemble.json").write_text(json.dumps(raw))
    return EnsembleVersion(name, "sha256:" + "0" * 64, folder)


def test_promoted_version_is_loaded_into_a_running_triton(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_repository(repo, TINY)
    old = triton_model_name("tiny-a-v1")
    server = BundledTriton(
        repo, tmp_path / "work", [old], extra_args=["--model-control-mode=explicit", f"--load-model={old}"]
    ).start()
    try:
        new_version = _version(tmp_path, "tiny-a-ft-0123456789ab")
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
    from atlasflow.common.errors import Unavailable

    with pytest.raises(Unavailable) as exc:
        rollout(version)
    assert exc.value.reason == "TRITON_LOAD_FAILED"
    assert (tmp_path / "models" / triton_model_name(version.name) / "config.pbtxt").is_file()
