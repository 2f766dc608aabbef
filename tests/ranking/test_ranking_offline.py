"""`atlasflow rank ROOT --out OUT` on a generated reference-layout ROOT: outputs, grid, priority
order, reference scores equal to the numpy + scipy baseline, partial labels, enhanced mode and
prior learning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlasflow.common.organs import ORGANS
from atlasflow.method.prior import PopulationPrior
from atlasflow.ranking.offline import main
from atlasflow.testing.attention_baseline import reference_attention_numpy
from atlasflow.testing.synthetic import make_case

SHAPE = (40, 36, 30)
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, -100.0], [0, 0, 0, 1]])  # LAS, 4.5 ul voxels


def _write_root(root: Path) -> dict[str, dict[int, np.ndarray]]:
    cases: dict[str, dict[int, np.ndarray]] = {}
    for i, name in enumerate(["case_a", "case_b", "case_c"]):
        case = make_case(SHAPE, 3, seed=10 + i)
        if name == "case_c":  # three identical confident models: (almost) no attention
            case = {k: np.stack([np.where(v[0] >= 128, 255, 0).astype(np.uint8)] * 3) for k, v in case.items()}
        cases[name] = case
        for m, model in enumerate(["nnunet", "swinunetr", "unet"]):
            d = root / name / "backbones" / model / "soft_pred"
            d.mkdir(parents=True)
            for k, q in case.items():
                arr = q[m] if m != 1 else q[m].astype(np.float32) / 255.0  # one model stores floats
                nib.save(nib.Nifti1Image(arr, AFFINE), str(d / f"{ORGANS[k]}.nii.gz"))
    return cases


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, np.ndarray]]]:
    r = tmp_path_factory.mktemp("root")
    return r, _write_root(r)


def _priority(out: Path) -> list[dict[str, str]]:
    with open(out / "priority.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_reference_mode_outputs_and_scores(root: tuple[Path, dict], tmp_path: Path) -> None:
    r, cases = root
    lab = tmp_path / "labelled.csv"
    lab.write_text("case,organs\ncase_b,liver spleen\n")
    out = tmp_path / "out"
    assert main([str(r), "--out", str(out), "--labelled", str(lab)]) == 0
    rows = _priority(out)
    assert [row["case"] for row in rows] == sorted(
        (row["case"] for row in rows), key=lambda c: -float(next(x["score"] for x in rows if x["case"] == c))
    )
    for row in rows:
        labelled = {5, 8} if row["case"] == "case_b" else set()
        ref = reference_attention_numpy(cases[row["case"]], labelled)
        expected = sum(int(v["attention"].sum()) for v in ref.values() if "attention" in v)
        assert float(row["score"]) == expected
        heat_sums = {k: int(np.floor(v["heatmap"] * 255).sum()) for k, v in ref.items() if "heatmap" in v}
        order = [ORGANS[k] for k in sorted(heat_sums, key=lambda k: -heat_sums[k]) if heat_sums[k] > 0]
        assert row["organs"].split() == order
        for k, organ in ORGANS.items():
            path = out / row["case"] / "attention" / f"{organ}.nii.gz"
            if k in labelled:
                assert not path.exists()
                continue
            img = nib.load(str(path))
            assert img.shape == SHAPE and np.allclose(img.affine, AFFINE)
            data = np.asarray(img.dataobj)
            assert data.dtype == np.uint8
            np.testing.assert_array_equal(data, np.floor(ref[k]["heatmap"] * 255 + 1e-6).astype(np.uint8))
    scores = {row["case"]: float(row["score"]) for row in rows}
    assert scores["case_c"] < scores["case_a"]  # agreeing models: only the overlap term is left
    findings = json.loads((out / "findings.json").read_text())
    organ0 = findings["cases"][rows[0]["case"]]["organs"][0]
    assert organ0["reasons"] and organ0["pointer"]["voxel_box"]["x_max"] < SHAPE[0]


def test_enhanced_mode_and_learned_prior(root: tuple[Path, dict], tmp_path: Path) -> None:
    r, _ = root
    out = tmp_path / "enh"
    saved = tmp_path / "prior.json"
    assert main([str(r), "--out", str(out), "--mode", "enhanced", "--learn-prior", "--save-prior", str(saved)]) == 0
    rows = _priority(out)
    assert len(rows) == 3 and all(float(x["score"]) >= 0 for x in rows)
    learned = PopulationPrior.load(saved)
    assert learned.cases == PopulationPrior.load().cases + 3
    findings = json.loads((out / "findings.json").read_text())
    assert findings["mode"] == "enhanced"
    top = findings["cases"][rows[0]["case"]]["organs"][0]
    assert top["score"] > 0 and top["pointer"] is not None


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    d = tmp_path / "r" / "c1" / "backbones" / "m1" / "soft_pred"
    d.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 2.0, dtype=np.float32), np.eye(4)), str(d / "liver.nii.gz"))
    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
