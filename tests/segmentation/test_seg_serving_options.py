"""Pipeline options for the GPU path (ensemble JSON fields and EnsemblePipeline overrides):
bf16 autocast, patch batch, overlap, foreground (body) cropping; defaults change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlasflow.common.errors import InvalidArgument
from atlasflow.segmentation.ensemble import ForegroundCrop, load_ensemble, parse_ensemble
from atlasflow.segmentation.pipeline import EnsemblePipeline, foreground_box

TINY = Path(__file__).parent / "tiny_ensembles" / "tiny-a-v1.json"


def _ct() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((50, 44, 30), -1000, dtype=np.int16)
    vol[12:40, 9:36, 4:26] = 40
    vol[20:30, 15:25, 10:18] = 180
    return vol, np.array([[0, -2.5, 0, 40], [3.0, 0, 0, -20], [0, 0, 2.0, 7], [0, 0, 0, 1]])


def test_defaults_are_off_and_explicit_defaults_give_identical_outputs(tmp_path: Path) -> None:
    cfg = load_ensemble(TINY)
    assert cfg.autocast == "none" and cfg.foreground_crop is None
    raw = json.loads(TINY.read_text())
    raw.update({"autocast": "none", "foreground_crop": None})
    path = tmp_path / "explicit.json"
    path.write_text(json.dumps(raw))
    vol, aff = _ct()
    a = EnsemblePipeline(str(TINY))(vol, aff)
    b = EnsemblePipeline(str(path))(vol, aff)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.heatmap, b.heatmap)
    np.testing.assert_array_equal(a.organ_stats, b.organ_stats)


def test_json_options_parse_and_validate() -> None:
    raw = json.loads(TINY.read_text())
    cfg = parse_ensemble({**raw, "autocast": "bf16", "foreground_crop": {"threshold_hu": -400, "margin_mm": 5}})
    assert cfg.autocast == "bf16" and cfg.foreground_crop == ForegroundCrop(-400.0, 5.0)
    assert parse_ensemble({**raw, "foreground_crop": {}}).foreground_crop == ForegroundCrop(-500.0, 10.0)
    for bad in ({"autocast": "fp8"}, {"foreground_crop": 3}, {"foreground_crop": {"margin_mm": -1}}):
        with pytest.raises(InvalidArgument) as err:
            parse_ensemble({**raw, **bad})
        assert err.value.reason == "INVALID_ENSEMBLE_CONFIG"


def test_overrides_reach_members() -> None:
    pipe = EnsemblePipeline(str(TINY), autocast="bf16", sw_batch_size=16, overlap=0.75, foreground_crop=True)
    assert pipe.config.autocast == "bf16" and pipe.config.foreground_crop == ForegroundCrop()
    assert {(m.preprocessing.sw_batch_size, m.preprocessing.overlap) for m, _ in pipe.members} == {(16, 0.75)}
    with pytest.raises(InvalidArgument):
        EnsemblePipeline(str(TINY), autocast="fp16")


@pytest.mark.parametrize(
    ("margin_mm", "expected"),
    [(0.0, (slice(12, 40), slice(9, 36), slice(4, 26))), (5.0, (slice(10, 42), slice(7, 38), slice(1, 29)))],
)
def test_foreground_box_margin_in_mm(margin_mm: float, expected: tuple) -> None:
    vol, aff = _ct()  # column spacings: 3.0, 2.5, 2.0 mm
    vol[39, 35, 25] = 40
    assert foreground_box(vol, aff, ForegroundCrop(-500.0, margin_mm)) == expected
    assert foreground_box(np.full((4, 4, 4), -1000, np.int16), aff, ForegroundCrop()) is None


def test_cropped_and_bf16_runs_stay_on_the_native_grid() -> None:
    vol, aff = _ct()
    full = EnsemblePipeline(str(TINY))(vol, aff)
    cropped = EnsemblePipeline(str(TINY), foreground_crop=ForegroundCrop(-500.0, 3.0))(vol, aff)
    bf16 = EnsemblePipeline(str(TINY), autocast="bf16", sw_batch_size=8)(vol, aff)
    box = foreground_box(vol, aff, ForegroundCrop(-500.0, 3.0))
    outside = np.ones(vol.shape, bool)
    outside[box] = False
    for out in (cropped, bf16):
        assert out.labels.shape == vol.shape == out.heatmap.shape and out.labels.dtype == np.uint8
    assert not cropped.labels[outside].any() and not cropped.heatmap[outside].any()
    assert "foreground_crop" in cropped.timings_s
    # same models, same body: most voxels agree (the crop shifts the model grid's origin)
    assert (cropped.labels == full.labels).mean() > 0.9
    assert (bf16.labels == full.labels).mean() > 0.9
