"""`atlasflow demo --rounds N --out DIR`: the options reach the demo; a bad --rounds/--steps is a
usage error (exit 2) before any stack starts; the default stays round 0 only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import atlasflow.cli.demo as demo_module
from atlasflow.cli.main import cli


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def record(out: Path, **kwargs: Any) -> int:  # stands in for starting a stack: argument parsing only
        seen.append({"out": out, **kwargs})
        return 0

    monkeypatch.setattr(demo_module, "run_demo", record)
    return seen


def test_rounds_and_out_reach_the_demo(calls: list[dict[str, Any]], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--rounds", "2", "--out", str(tmp_path / "d"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert calls == [{"out": tmp_path / "d", "keep_running": False, "rounds": 2, "steps": 3}]


def test_default_is_the_demo_without_rounds(calls: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    assert calls == [{"out": Path("atlasflow-demo"), "keep_running": False, "rounds": 0, "steps": 4}]


@pytest.mark.parametrize("args", [["--rounds", "-1"], ["--rounds", "two"], ["--rounds", "1", "--steps", "0"]])
def test_bad_rounds_are_usage_errors(calls: list[dict[str, Any]], args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["demo", *args])
    assert result.exit_code == 2 and calls == []


def test_help_names_rounds_json() -> None:
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--rounds" in result.output and "rounds.json" in result.output


def test_reference_on_a_case_geometry_and_box_centres() -> None:
    """The demo samples the reference on the grid the labels service reports (a VolumeGeometry:
    shape + row-major affine) and matches series to boxes by their centre in patient space,
    which does not depend on the voxel order a reader chose."""
    from atlasflow.cli import rounds
    from atlasflow.cli.demo_rounds import Reference, _centre
    from atlasflow.common.v1 import common_pb2

    ref = Reference()
    origin = rounds.BOXES["case-5"]
    box, affine = rounds.crop_box(ref.labels, ref.affine, origin)
    geometry = common_pb2.VolumeGeometry(shape=list(box.shape), affine=affine.ravel().tolist())
    assert np.array_equal(ref.on(geometry), box) and box.any()
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (box.shape[0] - 1)
    assert np.allclose(_centre(box.shape, flipped), _centre(box.shape, affine))
    centres = [_centre(box.shape, rounds.crop_box(ref.labels, ref.affine, o)[1]) for o in rounds.BOXES.values()]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]) > 1.0
