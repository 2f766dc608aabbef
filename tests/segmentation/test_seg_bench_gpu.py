"""CPU dry run of benchmarks/bench_seg_gpu.py (tiny trio carried as state_dicts, tiny phantom,
bf16 autocast + patch batch + foreground crop vs MONAI fp32 sliding window)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_seg_gpu.py"


def test_bench_seg_gpu_dry_run_on_cpu() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--device", "cpu", "--overlaps", "0.5", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["device"] == "cpu" and result["shape"] == [48, 44, 40]
    assert result["autocast"] == "bf16" and result["crop"] is True and result["patch_batch"] == 16
    row = result["overlaps"]["0.5"]
    assert row["baseline_fp32_sw4_s"] > 0 and 0 < row["atlasflow_infer_s"] < row["atlasflow_total_s"]
    assert row["atlasflow_speedup_total"] == pytest.approx(row["baseline_fp32_sw4_s"] / row["atlasflow_total_s"])
    assert "MONAI fp32 sw_batch 4" in run.stdout and "speed-up" in run.stdout


def test_phantom_and_state_dict_ensemble(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from atlasflow.segmentation.ensemble import ForegroundCrop, load_ensemble
    from atlasflow.segmentation.pipeline import foreground_box
    from atlasflow.testing.synthetic import TINY_MEMBERS, phantom, write_ensemble

    vol = phantom((100, 90, 4))
    box = foreground_box(vol, np.diag([1.5, 1.5, 1.5, 1.0]), ForegroundCrop(-500.0, 0.0))
    assert (
        box is not None and box[0].stop - box[0].start < 100 and box[1].stop - box[1].start < 90
    )  # body + table inside the field
    assert vol.dtype == np.int16 and vol.min() == -1000 and vol.max() >= 300
    path = write_ensemble(tmp_path, TINY_MEMBERS, 0.5)
    cfg = load_ensemble(path)
    assert cfg.weights_trained and all(m.checkpoint is not None and m.checkpoint.suffix == ".pt" for m in cfg.members)
    state = torch.load(cfg.members[0].checkpoint, weights_only=True)
    assert isinstance(state, dict) and all(
        isinstance(v, torch.Tensor) for v in state.values()
    )  # state_dict, not TorchScript
