"""nnU-Net v2 import + inference equal to nnUNetPredictor (its own code, defaults, CPU) on two
real CTs with different spacing and orientation: TotalSegmentator's example_ct_sm (122x101x30,
3 mm, RAS) and its DICOM series converted by dcm2niix (512x512x20, 0.98x0.98x2 mm, LAS). The
model is a tiny nnU-Net folder made in the set-up (`nnunet_fixture`). ``atlasflow segment``
runs the exported network on a local PyTriton (the product path)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tests.models import nnunet_fixture as fx

from atlasflow.cli.main import main as cli
from atlasflow.models.nnunet import ModelImportError, import_nnunet
from atlasflow.models.registry import ModelRegistry


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.shared_model_folder(tmp_path_factory)  # trained once per session (tests/segmentation too)


@pytest.fixture(scope="module")
def cts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [fx.CT_SM, fx.dicom_ct(tmp_path_factory.mktemp("cts"))]


def _predictor(folder: Path, ct: Path, out: Path) -> np.ndarray:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out.mkdir(parents=True, exist_ok=True)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0, 1))
    predictor.predict_from_files_sequential([[str(ct)]], [str(out / "ref")], save_probabilities=False)
    return np.asanyarray(nib.load(str(out / "ref.nii.gz")).dataobj)


def test_segment_equals_nnunet_predictor(folder: Path, cts: list[Path], tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert (
        cli(["model", "import", "nnunet", str(folder), "--name", "tiny", "--folds", "0,1", "--state-dir", str(state)])
        == 0
    )
    assert cli(["model", "list", "--state-dir", str(state)]) == 0
    listing = capsys.readouterr().out
    manifest = ModelRegistry(state).get("tiny")
    assert "tiny" in listing and manifest.digest[:16] in listing and "1=liver" in listing
    assert manifest.format == "nnunet-v2" and manifest.labels == {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    # the Triton export is part of the registered content (digested like the weights)
    assert {"triton/config.pbtxt", "triton/1/model.pt"} <= set(manifest.files)
    config = (ModelRegistry(state).path("tiny") / "triton" / "config.pbtxt").read_text()
    assert 'backend: "pytorch"' in config and "INPUT__1" in config and "dims: [ -1, 4, 8, 48, 48 ]" in config
    figures = []
    for ct in cts:
        ref = _predictor(folder, ct, tmp_path / "ref" / ct.name)
        out = tmp_path / "ours" / ct.name
        # the product path: the network on a local PyTriton, tiling and pre/post-processing here
        assert cli(["segment", str(ct), "--model", "tiny", "--out", str(out), "--state-dir", str(state)]) == 0
        summary = json.loads((out / "segment.json").read_text())
        assert summary["network"] == "triton local PyTriton" and summary["digest"] == manifest.digest
        ours_img = nib.load(str(out / "labels.nii.gz"))
        ct_img = nib.load(str(ct))
        assert ours_img.shape == ct_img.shape and np.allclose(ours_img.affine, ct_img.affine)
        ours = np.asanyarray(ours_img.dataobj)
        agreement = float((ours == ref).mean())
        dice = {}
        for label in (1, 2, 3):
            a, b = ref == label, ours == label
            if a.sum() + b.sum():
                dice[label] = float(2 * (a & b).sum() / (a.sum() + b.sum()))
        figures.append((ct.name, ct_img.shape, nib.aff2axcodes(ct_img.affine), agreement, dice))
        assert dice, "the model predicts no organ: the comparison would be vacuous"
        assert agreement >= 0.999 and all(d >= 0.99 for d in dice.values()), figures[-1]
    with capsys.disabled():
        for name, shape, axes, agreement, dice in figures:
            print(f"\n{name} {shape} {''.join(axes)}: agreement {agreement:.6f}, Dice {dice}")


def test_import_refuses_missing_file(folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "m"
    shutil.copytree(folder, broken)
    (broken / "plans.json").unlink()
    with pytest.raises(ModelImportError) as err:
        import_nnunet(broken, "x", tmp_path / "state")
    assert err.value.reason == "MISSING_FILE" and "plans.json" in err.value.message
    with pytest.raises(ModelImportError) as err:
        import_nnunet(folder, "x", tmp_path / "state", folds=["0", "4"])
    assert err.value.reason == "MISSING_FILE" and "fold_4" in err.value.message


def test_import_refuses_unsupported_trainer_and_plans_field(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "trainer"
    shutil.copytree(folder, other)
    for f in (0, 1):
        path = other / f"fold_{f}" / "checkpoint_final.pth"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["trainer_name"] = "nnUNetTrainerDA5"
        torch.save(ckpt, path)
    with pytest.raises(ModelImportError) as err:
        import_nnunet(other, "x", tmp_path / "state")
    assert err.value.reason == "UNSUPPORTED_TRAINER" and "nnUNetTrainerDA5" in err.value.message

    plans_field = tmp_path / "plans"
    shutil.copytree(folder, plans_field)
    plans = json.loads((plans_field / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["previous_stage"] = "3d_lowres"
    (plans_field / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelImportError) as err:
        import_nnunet(plans_field, "x", tmp_path / "state")
    assert err.value.reason == "UNSUPPORTED_PLANS_FIELD" and "previous_stage" in err.value.message
    assert cli(["model", "import", "nnunet", str(plans_field), "--name", "x", "--state-dir", str(tmp_path / "s")]) == 6
    assert ModelRegistry(tmp_path / "state").names() == []


def test_local_triton_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from atlasflow.common.errors import FailedPrecondition
    from atlasflow.segmentation.model_serving import require_pytriton

    monkeypatch.setitem(sys.modules, "pytriton", None)  # what a venv without the local-triton extra gives
    with pytest.raises(FailedPrecondition) as err:
        require_pytriton()
    assert err.value.reason == "LOCAL_TRITON_NOT_INSTALLED" and "local-triton" in err.value.message
