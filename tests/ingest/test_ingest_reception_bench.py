"""Dry run of `python benchmarks/bench_ingest.py` at a tiny size: the same code path as the real run
(series built from the real slices, storescu to atlasflow ingest and to Orthanc, both counted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_dry_run(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_ingest.py"), "--slices", "6", "--runs", "1"]
        + ["--workdir", str(tmp_path), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["slices"] == 6 and result["bytes"] > 6 * 512 * 512 * 2
    for name in ("atlasflow", "orthanc"):
        assert result[name]["instances_per_s"] > 0 and result[name]["mb_per_s"] > 0
    assert result["ratio_instances_per_s"] == (
        result["atlasflow"]["instances_per_s"] / result["orthanc"]["instances_per_s"]
    )


def test_acknowledged_files_parses_storescu_verbose_output():
    log = (
        "I: Sending file: /d/a.dcm\nI: Received Store Response (Success)\n"
        "I: Sending file: /d/b.dcm\nE: Store Failed, file: /d/b.dcm\n"
        "I: Sending file: /d/c.dcm\nI: Received Store Response (Warning, Coercion of Data Elements)\n"
        "I: Sending file: /d/d.dcm\n"
    )
    assert peers.acknowledged_files(log) == ["/d/a.dcm", "/d/c.dcm"]
