"""Dry run of benchmarks/bench_seg_service.py: the whole harness (Triton child, segmentation
service child, SegmentSeries -> SUCCEEDED, in-process pipeline) on a tiny ensemble."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_seg_service.py"


@pytest.mark.parametrize("triton", ["pytriton"])
def test_bench_seg_service_dry_run(triton: str) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--json", "--triton", triton],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["shape"] == [40, 34, 26] and result["triton"] == triton
    assert len(result["service_s"]) == len(result["in_process_s"]) == 1
    assert 0 < result["triton_call_s"][0] < result["service_s"][0]
    assert result["ratio"] == pytest.approx(result["service_median_s"] / result["in_process_median_s"])
    assert "ratio service / in-process" in run.stdout
    # both sides ran with the glibc/OpenMP settings `atlasflow up` uses (the harness re-executes itself)
    assert "environment (both sides): MALLOC_ARENA_MAX=1 " in run.stdout and "OMP_WAIT_POLICY=PASSIVE" in run.stdout
