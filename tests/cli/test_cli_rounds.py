"""The per-round measurements of the loop (`atlasflow.cli.rounds`, shared by bench_loop and
`atlasflow demo --rounds N`): the bundled reference, the reference on another grid, Dice per
organ and its revised/other split, attention, rows with the issue's keys, rounds.json written
atomically, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from atlasflow.cli import rounds
from atlasflow.common.organs import ORGANS
from atlasflow.labels.totalseg import totalseg_to_atlas

REF = Path(__file__).resolve().parents[1] / "data/totalsegmentator/tests/reference_files"


def test_bundled_reference_is_the_mapped_totalsegmentator_labels_on_the_ct_grid() -> None:
    ref, ref_affine = rounds.load_volume(rounds.REFERENCE_LABELS)
    ct, ct_affine = rounds.load_volume(rounds.EXAMPLE_CT)
    source, _ = rounds.load_volume(REF / "example_seg_fast_force_split.nii.gz")
    assert ref.shape == ct.shape and np.allclose(ref_affine, ct_affine)
    assert np.array_equal(ref, totalseg_to_atlas(source))
    assert set(np.unique(ref).tolist()) == {0, *ORGANS}
    for origin in rounds.BOXES.values():  # every box lies inside the CT
        box, _ = rounds.crop_box(ct, ct_affine, origin)
        assert box.shape == (rounds.BOX,) * 3
    assert set(rounds.HOLDOUT) < set(rounds.BOXES)


def test_reference_on_grid_follows_the_affines() -> None:
    ref = np.zeros((6, 5, 4), dtype=np.uint8)
    ref[1:3, 2:4, 1:3] = 5
    ref[4, 0, 3] = 9
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 7.0]
    # the same grid: unchanged
    assert np.array_equal(rounds.reference_on_grid(ref, affine, ref.shape, affine), ref)
    # a box of it (crop_box's affine): the same voxels
    box, box_affine = rounds.crop_box(ref, affine, (1, 1, 1), size=3)
    assert np.array_equal(rounds.reference_on_grid(ref, affine, box.shape, box_affine), box)
    # the grid flipped along x (what a reader that reorients does): flipped values
    flip = affine.copy()
    flip[0, 0] = -2.0
    flip[0, 3] = affine[0, 3] + 2.0 * (ref.shape[0] - 1)
    assert np.array_equal(rounds.reference_on_grid(ref, affine, ref.shape, flip), ref[::-1])
    # outside the reference: background
    far = affine.copy()
    far[:3, 3] += 1000.0
    assert not rounds.reference_on_grid(ref, affine, ref.shape, far).any()


def test_organ_dice_and_split() -> None:
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    ref[:2] = 1  # 32 voxels of organ 1
    ref[2:, :2] = 5  # 16 voxels of organ 5
    labels = ref.copy()
    labels[0] = 0  # organ 1: 16 of 32 found -> 2*16/48
    d = rounds.organ_dice(labels, ref)
    assert set(d) == {1, 5}
    assert d[1] == pytest.approx(2 / 3) and d[5] == 1.0
    everything = rounds.organ_dice(labels, ref, ORGANS)  # absent in both: 1.0
    assert set(everything) == set(ORGANS) and everything[9] == 1.0
    with pytest.raises(ValueError):
        rounds.organ_dice(labels[:2], ref)
    per_organ = rounds.mean_per_organ([{1: 0.5, 5: 1.0}, {1: 1.0, 5: math.nan}])
    assert per_organ == {1: 0.75, 5: 1.0}
    revised, other = rounds.split_dice({1: 0.75, 5: 1.0, 9: 0.5}, {5})
    assert revised == 1.0 and other == pytest.approx(0.625)
    revised, other = rounds.split_dice({1: 0.75}, set())
    assert math.isnan(revised) and other == 0.75


def test_attention_and_picks() -> None:
    total, above = rounds.attention_summary({"a": [0.5, 0.4], "b": [3.0], "c": []}, 1.0)
    assert total == pytest.approx(3.9) and above == 1
    picks = rounds.pick_revisions([(1.0, "a", 3), (7.0, "b", 5), (2.0, "a", 9)], 2)
    assert picks == [("b", 5), ("a", 9)]


def test_rows_and_rounds_json_written_atomically(tmp_path: Path) -> None:
    row = rounds.round_row(
        round_number=1,
        model_version="abdomen-trio-ft-1",
        promoted=True,
        gate_reason="NOT_WORSE",
        revised_dice=0.81234567,
        other_dice=math.nan,
        attention_ml=12.345,
        cases_to_review=2,
        seconds={"review": 0.123, "reinfer": None},
        run_id="tr-1",
    )
    assert tuple(row)[: len(rounds.ROW_KEYS)] == rounds.ROW_KEYS and row["run_id"] == "tr-1"
    assert row["revised_dice"] == 0.8123 and row["other_dice"] is None  # NaN is null in JSON
    assert row["seconds"] == {"review": 0.12, "reinfer": None}
    path = tmp_path / "out" / "rounds.json"
    rounds.write_rounds(path, [row])
    assert json.loads(path.read_text()) == [row]
    # a row that cannot be written (a raw NaN) leaves the rounds already written intact
    with pytest.raises(ValueError):
        rounds.write_rounds(path, [row, {"round": 2, "other_dice": math.nan}])
    assert json.loads(path.read_text()) == [row]
    assert [p.name for p in path.parent.iterdir()] == ["rounds.json"]  # no temp file left
    table = rounds.format_table([row])
    assert "revised_dice" in table and "review_s" in table and "0.812" in table and "NOT_WORSE" in table
