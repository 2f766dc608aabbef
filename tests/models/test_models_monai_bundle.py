"""MONAI bundle import: atlasflow's `atlasflow segment` path equals ``python -m monai.bundle run``.

Set-up (module scope): a tiny bundle in the standard layout written and briefly trained with
MONAI (`monai_bundle_fixture`), two real CTs from tests/data (TotalSegmentator's
``example_ct_sm.nii.gz``: 122x101x30, 3 mm, RAS; the 20-slice DICOM series converted by
dcm2niix: 512x512x20, 0.977x0.977x2 mm, LAS), the real ``python -m monai.bundle run`` as a
subprocess on both, and ``atlasflow model import monai-bundle`` + ``atlasflow segment`` on both
(the network on a local PyTriton: the product path).
Per-label Dice >= 0.99 and voxel agreement >= 99.9 % (figures printed; run with -s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monai_bundle_fixture import CHANNELS, CT_SM, shared_bundle  # noqa: E402
from nnunet_fixture import dicom_ct  # noqa: E402

from atlasflow.cli.main import cli  # noqa: E402
from atlasflow.models.monai_bundle import BundleImportError, import_monai_bundle  # noqa: E402
from atlasflow.models.registry import ModelRegistry  # noqa: E402
from atlasflow.segmentation.model_serving import local_triton  # noqa: E402

CASES = ("ct_sm", "dicom_ct")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("monai_bundle")
    bundle = shared_bundle(tmp_path_factory)  # trained once per session (tests/segmentation too)
    cts = root / "cts"
    dicom_ct(cts)
    shutil.copyfile(CT_SM, cts / "ct_sm.nii.gz")
    ref = root / "ref"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(cts),
            "--output_dir",
            str(ref),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = root / "state"
    result = CliRunner().invoke(
        cli, ["model", "import", "monai-bundle", str(bundle), "--name", "tiny-abdomen", "--state-dir", str(state)]
    )
    assert result.exit_code == 0, result.output
    out = root / "out"
    # ct_sm: `atlasflow segment` starts its own local PyTriton; dicom_ct: --triton-url of a Triton
    # that serves the model (as the stack's triton_server --model does)
    with local_triton(state, ["tiny-abdomen"]) as url:
        for case, extra in zip(CASES, ([], ["--triton-url", url])):
            result = CliRunner().invoke(
                cli,
                [
                    "segment",
                    str(cts / f"{case}.nii.gz"),
                    "--model",
                    "tiny-abdomen",
                    "--out",
                    str(out / case),
                    "--state-dir",
                    str(state),
                    *extra,
                ],
            )
            assert result.exit_code == 0, result.output
    return {"root": root, "bundle": bundle, "cts": cts, "ref": ref, "state": state, "out": out, "url": Path(url)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


@pytest.mark.parametrize("case", CASES)
def test_segment_equals_monai_bundle_run(stack: dict[str, Path], case: str) -> None:
    ref_img = nib.load(str(stack["ref"] / f"{case}_trans.nii.gz"))
    ours_img = nib.load(str(stack["out"] / case / "labels.nii.gz"))
    ct_img = nib.load(str(stack["cts"] / f"{case}.nii.gz"))
    ref = np.rint(np.asanyarray(ref_img.dataobj)).astype(np.int64)
    ours = np.asanyarray(ours_img.dataobj).astype(np.int64)
    assert ours.shape == ct_img.shape == ref.shape
    np.testing.assert_allclose(ours_img.affine, ct_img.affine, atol=1e-5)
    np.testing.assert_allclose(ref_img.affine, ct_img.affine, atol=1e-4)
    agreement = float((ours == ref).mean())
    present = sorted(int(v) for v in np.union1d(np.unique(ref), np.unique(ours)) if v)
    assert present, "the reference predicts no organ: nothing would be compared"
    dice = {CHANNELS[str(k)]: _dice(ours == k, ref == k) for k in present}
    print(
        f"\n{case} {ct_img.shape} {nib.aff2axcodes(ct_img.affine)}: voxel agreement {agreement * 100:.4f} %, "
        + ", ".join(f"{n} Dice {d:.5f} ({int((ref == k).sum())} vox)" for (n, d), k in zip(dice.items(), present))
    )
    assert agreement >= 0.999
    assert all(d >= 0.99 for d in dice.values()), dice


def test_manifest_and_listing(stack: dict[str, Path]) -> None:
    reg = ModelRegistry(stack["state"])
    m = reg.verify("tiny-abdomen")
    assert m.format == "monai-bundle"
    assert m.labels == {int(k): v for k, v in CHANNELS.items()}
    assert m.details["dropped"] == ["SaveImaged"]
    assert set(m.files) == {
        "configs/inference.json",
        "configs/metadata.json",
        "models/model.pt",
        "triton/config.pbtxt",
        "triton/1/model.pt",
    }
    assert m.details["triton"]["backend"] == "pytorch" and m.details["triton"]["export"] == "script"
    # atlasflow segment ran the network on a local PyTriton (the product path)
    for case in CASES:
        summary = json.loads((stack["out"] / case / "segment.json").read_text())
        where = "local PyTriton" if case == "ct_sm" else str(stack["url"])
        assert summary["network"] == f"triton {where}" and summary["digest"] == m.digest
    result = CliRunner().invoke(cli, ["model", "list", "--state-dir", str(stack["state"]), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [x["name"] for x in listed if x["format"] == "monai-bundle"] == ["tiny-abdomen"]


def _variant(stack: dict[str, Path], tmp_path: Path, edit: object) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(stack["bundle"], b)
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    assert callable(edit)
    edit(b, cfg)
    (b / "configs" / "inference.json").write_text(json.dumps(cfg))
    return b


def _post(cfg: dict, name: str) -> dict:
    return next(t for t in cfg["postprocessing"]["transforms"] if t["_target_"] == name)


REFUSALS = {
    "missing_weights": (lambda b, c: (b / "models" / "model.pt").unlink(), "MISSING_BUNDLE_FILE"),
    "unknown_post": (
        lambda b, c: c["postprocessing"]["transforms"].insert(2, {"_target_": "FillHolesd", "keys": "pred"}),
        "UNSUPPORTED_BUNDLE_TRANSFORM",
    ),
    "unknown_pre": (
        lambda b, c: c["preprocessing"]["transforms"].insert(
            3, {"_target_": "RandFlipd", "keys": "image", "prob": 0.5}
        ),
        "UNSUPPORTED_BUNDLE_TRANSFORM",
    ),
    "no_invert": (
        lambda b, c: c["postprocessing"]["transforms"].remove(_post(c, "Invertd")),
        "UNSUPPORTED_BUNDLE_TRANSFORM",
    ),
    "threshold": (
        lambda b, c: _post(c, "AsDiscreted").update(argmax=False, threshold=0.5),
        "UNSUPPORTED_BUNDLE_TRANSFORM",
    ),
    "expression": (lambda b, c: c["network_def"].update(channels="$[8, 16, 32]"), "UNSUPPORTED_BUNDLE_EXPRESSION"),
    "foreign_network": (lambda b, c: c["network_def"].update(_target_="os.system"), "UNSUPPORTED_BUNDLE_COMPONENT"),
    "nested_component": (
        lambda b, c: c["network_def"].update(act={"_target_": "monai.bundle.scripts.run", "config_file": "x"}),
        "UNSUPPORTED_BUNDLE_COMPONENT",
    ),
    "dtype_expression": (
        lambda b, c: c["preprocessing"]["transforms"][0].update(dtype="$__import__('os').getcwd()"),
        "UNSUPPORTED_BUNDLE_EXPRESSION",
    ),
    "inferer": (
        lambda b, c: c.update(inferer={"_target_": "SliceInferer", "roi_size": [64, 64]}),
        "UNSUPPORTED_INFERER",
    ),
    "wrong_weights": (lambda b, c: c["network_def"].update(channels=[4, 8, 16]), "INVALID_WEIGHTS"),
    "no_labels": (
        lambda b, c: (b / "configs" / "metadata.json").write_text(json.dumps({"name": "x"})),
        "MISSING_LABEL_MAP",
    ),
}


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_refused_with_a_reason(stack: dict[str, Path], tmp_path: Path, what: str) -> None:
    edit, reason = REFUSALS[what]
    bundle = _variant(stack, tmp_path, edit)
    with pytest.raises(BundleImportError) as err:
        import_monai_bundle(bundle, "refused", tmp_path / "state")
    assert err.value.reason == reason, err.value.message
    assert ModelRegistry(tmp_path / "state").names() == []  # nothing half-registered


def test_bundle_as_a_heterogeneous_ensemble_member(stack: dict[str, Path]) -> None:
    """The registered bundle (liver, spleen, kidneys; no pancreas) next to TotalSegmentator's own
    label map (117 classes) on the same CT: organs mapped by name, the pancreas is the
    TotalSegmentator member's alone."""
    from atlasflow.common.organs import ORGAN_IDS
    from atlasflow.models.class_maps import TOTALSEGMENTATOR_TOTAL_V2, load_class_map
    from atlasflow.segmentation.heterogeneous import MemberOutput, common_grid, heterogeneous_attention, model_member

    ct = stack["cts"] / "ct_sm.nii.gz"
    bundle = model_member(ct, "tiny-abdomen", stack["state"])
    seg = nib.load(str(CT_SM.with_name("example_seg.nii.gz")))
    ts = MemberOutput(
        "totalseg", load_class_map(TOTALSEGMENTATOR_TOTAL_V2), seg.affine, label_map=np.asanyarray(seg.dataobj)
    )
    img = nib.load(str(ct))
    grid = common_grid([bundle, ts], img.affine, img.shape)
    assert grid.available[ORGAN_IDS["pancreas"]] == [False, True]
    assert grid.available[ORGAN_IDS["liver"]] == [True, True]
    ours = np.asanyarray(nib.load(str(stack["out"] / "ct_sm" / "labels.nii.gz")).dataobj)
    np.testing.assert_array_equal(grid.probs[ORGAN_IDS["liver"]][0].numpy() > 0, ours == 1)
    case = heterogeneous_attention(grid)
    pancreas = case.organs[ORGAN_IDS["pancreas"]]
    assert pancreas.probs is not None and pancreas.probs.shape[0] == 1


def test_yaml_config_and_dtype_names_are_read(stack: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    b = tmp_path / "bundle"
    shutil.copytree(stack["bundle"], b)
    cfg = json.loads((b / "configs" / "inference.json").read_text())
    cfg["preprocessing"]["transforms"][0]["dtype"] = "$np.float32"
    (b / "configs" / "inference.json").unlink()
    (b / "configs" / "inference.yaml").write_text(yaml.safe_dump(cfg))
    m = import_monai_bundle(b, "yaml-bundle", tmp_path / "state")
    assert m.details["config"] == "configs/inference.yaml" and "configs/inference.yaml" in m.files
