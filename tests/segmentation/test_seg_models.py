"""Ensemble config + member loading: seeded init, state_dict / TorchScript checkpoints, mismatches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.segmentation.ensemble import (
    MemberConfig,
    Preprocessing,
    available_versions,
    load_ensemble,
    triton_model_name,
)
from atlasflow.segmentation.models import load_member, member_weights_trained

PRE = Preprocessing((3.0, 3.0, 3.0), (-175.0, 250.0), (32, 32, 32), 0.25, 1)


def _unet(channels: tuple[int, ...] = (4, 8), out_channels: int = 9, checkpoint: Path | None = None) -> MemberConfig:
    return MemberConfig(
        name="tiny_unet",
        architecture="monai.UNet",
        kwargs={
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": out_channels,
            "channels": list(channels),
            "strides": [2] * (len(channels) - 1),
            "num_res_units": 0,
        },
        activation="sigmoid",
        seed=7,
        preprocessing=PRE,
        checkpoint=checkpoint,
    )


def _forward(net: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(0, 1, 32**3).reshape(1, 1, 32, 32, 32)
    with torch.inference_mode():
        return net(x)


def test_shipped_ensemble_is_the_trained_trio() -> None:
    assert "abdomen-trio-v1" in available_versions()
    cfg = load_ensemble("abdomen-trio-v1")
    assert cfg.version == "abdomen-trio-v1"
    assert cfg.model_name == triton_model_name(cfg.version) == "abdomen_trio_v1"
    assert [m.architecture for m in cfg.members] == ["monai.UNet", "monai.SwinUNETR", "monai.DynUNet"]
    assert cfg.weights_trained  # demo weights (services/atlasflow/segmentation/weights/README.md)
    for m in cfg.members:
        assert m.preprocessing.hu_window == (-175.0, 250.0)
        if m.architecture == "monai.SwinUNETR":
            assert all(p % 32 == 0 for p in m.preprocessing.patch_size)


def test_unknown_version_is_not_found() -> None:
    with pytest.raises(NotFound) as err:
        load_ensemble("no-such-ensemble")
    assert err.value.reason == "ENSEMBLE_NOT_FOUND"


def test_bad_activation_channels_rejected(tmp_path: Path) -> None:
    raw = json.loads(Path(load_ensemble("abdomen-trio-v1").source).read_text())
    raw["members"][2]["activation"] = "sigmoid"  # DynUNet has 10 channels (softmax with background)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidArgument) as err:
        load_ensemble(str(path))
    assert err.value.reason == "INVALID_ENSEMBLE_CONFIG"


def test_seeded_init_is_deterministic_and_untrained() -> None:
    cfg = _unet()
    a, b = load_member(cfg), load_member(cfg)
    assert not member_weights_trained(cfg)
    assert torch.equal(_forward(a), _forward(b))
    other = load_member(dataclasses.replace(cfg, seed=8))
    assert not torch.equal(_forward(a), _forward(other))


def test_state_dict_round_trip(tmp_path: Path) -> None:
    source = load_member(dataclasses.replace(_unet(), seed=99))
    path = tmp_path / "unet.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    cfg = _unet(checkpoint=path)
    loaded = load_member(cfg)
    assert member_weights_trained(cfg)
    assert torch.equal(_forward(loaded), _forward(source))
    assert not torch.equal(_forward(loaded), _forward(load_member(_unet())))


def test_torchscript_round_trip(tmp_path: Path) -> None:
    source = load_member(dataclasses.replace(_unet(), seed=42))
    path = tmp_path / "unet.ts"
    torch.jit.save(torch.jit.trace(source, torch.zeros(1, 1, 32, 32, 32)), str(path))
    loaded = load_member(_unet(checkpoint=path))
    assert isinstance(loaded, torch.jit.ScriptModule)
    torch.testing.assert_close(_forward(loaded), _forward(source))


def test_state_dict_with_other_architecture_is_checkpoint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(load_member(_unet(channels=(4, 8, 16))).state_dict(), path)
    with pytest.raises(InvalidArgument) as err:
        load_member(_unet(checkpoint=path))
    assert err.value.reason == "CHECKPOINT_MISMATCH"
    assert int(err.value.metadata["unexpected_keys"]) > 0 or int(err.value.metadata["shape_mismatches"]) > 0


def test_state_dict_with_wrong_shapes_is_checkpoint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "eight.pt"
    torch.save(load_member(_unet(out_channels=8)).state_dict(), path)
    with pytest.raises(InvalidArgument) as err:
        load_member(_unet(checkpoint=path))
    assert err.value.reason == "CHECKPOINT_MISMATCH"
    assert int(err.value.metadata["shape_mismatches"]) > 0


def test_torchscript_with_wrong_channels_is_checkpoint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "eight.ts"
    net = load_member(_unet(out_channels=8))
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)), str(path))
    with pytest.raises(InvalidArgument) as err:
        load_member(_unet(checkpoint=path))
    assert err.value.reason == "CHECKPOINT_MISMATCH"


def test_garbage_and_missing_checkpoints(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidArgument) as err:
        load_member(_unet(checkpoint=junk))
    assert err.value.reason == "CHECKPOINT_MISMATCH"
    with pytest.raises(FailedPrecondition) as missing:
        load_member(_unet(checkpoint=tmp_path / "absent.pt"))
    assert missing.value.reason == "CHECKPOINT_NOT_FOUND"


def test_ensemble_with_all_checkpoints_reports_trained_weights(tmp_path: Path) -> None:
    from atlasflow.segmentation.pipeline import EnsemblePipeline

    source = load_ensemble("abdomen-trio-v1")
    raw = json.loads(Path(source.source).read_text())
    for member_raw, member in zip(raw["members"], source.members):
        torch.save(
            load_member(dataclasses.replace(member, seed=member.seed + 1, checkpoint=None)).state_dict(),
            tmp_path / f"{member.name}.pt",
        )
        member_raw["checkpoint"] = f"{member.name}.pt"  # relative to the ensemble file
    raw["version"] = "abdomen-trio-test"
    path = tmp_path / "abdomen-trio-test.json"
    path.write_text(json.dumps(raw))
    pipeline = EnsemblePipeline(str(path))
    assert pipeline.weights_trained and pipeline.config.model_name == "abdomen_trio_test"
    shipped = EnsemblePipeline("abdomen-trio-v1")  # the demo checkpoints
    assert shipped.weights_trained
    w_test = next(iter(pipeline.members[0][1].parameters()))
    w_shipped = next(iter(shipped.members[0][1].parameters()))
    assert not torch.equal(w_test, w_shipped)
