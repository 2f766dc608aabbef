"""Conversion benchmark: `atlasflow convert` vs dcm2niix on an N-slice 512x512 CT series.

    .venv/bin/python benchmarks/bench_convert.py [--slices 300] [--runs 3] [--workdir DIR]

The series is derived from the real TotalSegmentator slices (atlasflow.testing.gen_cases,
uncompressed explicit VR LE, ~152 MB for 300 slices). Each run is a fresh child process, timed
by wall clock; its peak memory is the child's max RSS, read with
``resource.getrusage(RUSAGE_CHILDREN)`` inside a fresh wrapper process per run (so one run's
peak never hides another's). Prints the median of `--runs` for .nii and .nii.gz, both tools,
and the ratios (goals: atlasflow <= 2x dcm2niix's time to .nii; faster than dcm2niix to
.nii.gz). Inputs stay in the page cache after the first run (both tools see the same cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
run = subprocess.run(sys.argv[1:], capture_output=True)
wall = time.perf_counter() - t0
print(json.dumps({"rc": run.returncode, "wall_s": wall,
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "err": run.stderr.decode(errors="replace")[-400:]}))
"""


def measure(cmd: list[str]) -> dict[str, float]:
    """Wall time (s) and max RSS (MiB) of `cmd` in a fresh child of a fresh wrapper."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed: {result['err']}")
    return {"wall_s": result["wall_s"], "max_rss_mib": result["max_rss_kib"] / 1024}


def commands(tool: str, src: Path, out_dir: Path, gz: bool, run: int) -> list[str]:
    if tool == "atlasflow":
        return [str(BIN / "atlasflow"), "convert", str(src), str(out_dir / f"a{run}.nii{'.gz' if gz else ''}")]
    return [str(BIN / "dcm2niix"), "-z", "y" if gz else "n", "-b", "n", "-o", str(out_dir), "-f", f"d{run}", str(src)]


def bench(src: Path, out_dir: Path, runs: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for gz in (False, True):
        for tool in ("dcm2niix", "atlasflow"):
            samples = []
            for run in range(runs):
                for f in out_dir.iterdir():
                    f.unlink()
                samples.append(measure(commands(tool, src, out_dir, gz, run)))
            key = f"{tool} -> {'.nii.gz' if gz else '.nii'}"
            results[key] = {
                "wall_s": statistics.median(s["wall_s"] for s in samples),
                "max_rss_mib": statistics.median(s["max_rss_mib"] for s in samples),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    from atlasflow.testing import gen_cases

    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench_convert_"))
    try:
        src = gen_cases.write_long_series(work / "series", args.slices)
        size_mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        out_dir = work / "out"
        out_dir.mkdir()
        measure(commands("atlasflow", src, out_dir, False, 99))  # warm the page cache
        results = bench(src, out_dir, args.runs)
        print(f"series: {args.slices} slices 512x512, {size_mb:.0f} MB; median of {args.runs}")
        for key, r in results.items():
            print(f"  {key:22s} {r['wall_s']:7.3f} s   peak {r['max_rss_mib']:7.1f} MiB")
        for ext in (".nii", ".nii.gz"):
            a, d = results[f"atlasflow -> {ext}"], results[f"dcm2niix -> {ext}"]
            print(
                f"  ratio atlasflow/dcm2niix {ext:8s} time {a['wall_s'] / d['wall_s']:.2f}x"
                f"   memory {a['max_rss_mib'] / d['max_rss_mib']:.2f}x"
            )
        print("JSON " + json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
