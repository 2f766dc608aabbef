"""C-STORE reception benchmark: atlasflow ingest (durable) vs Orthanc, both fed by dcmtk storescu.

    .venv/bin/python benchmarks/bench_ingest.py [--slices 300] [--runs 3] [--json OUT]

The series: `build_ct_series` tiles the 20 real 512x512 slices of TotalSegmentator's
``example_ct_dicom`` (JPEG 2000 lossless, 12-bit, HFS) into an N-slice CT Image Storage series
(Explicit VR Little Endian, uncompressed, 2.0 mm spacing, fresh deterministic UIDs): 300 slices
are 300 x ~513 KiB = ~154 MB. Both receivers get the same files from
``storescu`` with ``TCP_NODELAY=1`` in the environment of both ends (DESIGN.md: without it the
figure measures Nagle + delayed ACK). Every run starts a fresh receiver on empty storage
(duplicates would be cheaper); the time is storescu's wall time, one association, all files.
Reported: median of `runs` for instances/s and MB/s (10^6 bytes of file) and the ratio
atlasflow / Orthanc, after one untimed warm-up run of each, in alternating order (see
`run_benchmark`), with the load average. atlasflow acknowledges an instance only after its
spool record is fdatasync'd and its row committed (the record is the row's redo log, see
`atlasflow.ingest.spool`); Orthanc 1.10 fsyncs each stored file (SyncStorageArea, default
true) and commits its SQLite index.

The peers and the series builder live in `atlasflow.testing.peers` (the ingest reception tests
use them too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from atlasflow.testing import auth
from atlasflow.testing.peers import IngestProcess, OrthancProcess, acknowledged_files, build_ct_series, storescu


def _time_storescu(files: Sequence[Path], port: int, aec: str) -> float:
    t0 = time.perf_counter()
    result = storescu(files, port, aec=aec)
    elapsed = time.perf_counter() - t0
    acked = acknowledged_files(result.stdout + result.stderr)
    if result.returncode != 0 or len(acked) != len(files):
        raise RuntimeError(
            f"storescu to {aec}: rc={result.returncode}, {len(acked)}/{len(files)}"
            f" acknowledged\n{result.stderr[-2000:]}"
        )
    return elapsed


def _run_atlasflow(files: Sequence[Path], root: Path) -> float:
    with IngestProcess(root) as ingest:
        elapsed = _time_storescu(files, ingest.dicom_port, "ATLASFLOW")
        count = _series_instance_count(ingest.target)
        if count != len(files):
            raise RuntimeError(f"atlasflow holds {count} instances, {len(files)} sent")
    return elapsed


def _run_orthanc(files: Sequence[Path], root: Path) -> float:
    with OrthancProcess(root) as orthanc:
        elapsed = _time_storescu(files, orthanc.dicom_port, "ORTHANC")
        stats = orthanc.get("/statistics")
        assert isinstance(stats, dict)
        if int(stats["CountInstances"]) != len(files):
            raise RuntimeError(f"Orthanc holds {stats['CountInstances']} instances")
    return elapsed


def run_benchmark(n_slices: int, runs: int, work: Path, *, warmup: bool = True) -> dict:
    """Fairness: the same files, the same storescu command (TCP_NODELAY=1 on both ends, one
    association), both receivers on loopback with their storage under `work` (one disk), each
    run on a fresh receiver with empty storage. One untimed warm-up run of each first (page
    cache, imports, first-run effects); then the order alternates run by run (atlasflow first
    in even runs, Orthanc first in odd ones) so that neither always follows the other's disk
    write-back. The load average before and after is recorded: 2 shared cores."""
    files = build_ct_series(work / "series", n_slices)
    total_bytes = sum(p.stat().st_size for p in files)
    times: dict[str, list[float]] = {"atlasflow": [], "orthanc": []}
    receivers = {"atlasflow": _run_atlasflow, "orthanc": _run_orthanc}
    load_before = os.getloadavg()
    if warmup:
        for name, run in receivers.items():
            run(files, work / f"{name}-warmup")
    for i in range(runs):
        order = ["atlasflow", "orthanc"] if i % 2 == 0 else ["orthanc", "atlasflow"]
        for name in order:
            times[name].append(receivers[name](files, work / f"{name}-{i}"))
    result: dict = {
        "slices": n_slices,
        "bytes": total_bytes,
        "runs": runs,
        "seconds": times,
        "warmup": warmup,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": med, "instances_per_s": n_slices / med, "mb_per_s": total_bytes / 1e6 / med}
    result["ratio_instances_per_s"] = result["atlasflow"]["instances_per_s"] / result["orthanc"]["instances_per_s"]
    return result


def _series_instance_count(target: str) -> int:
    from atlasflow.common.clients import sync_channel
    from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

    with sync_channel(target) as channel:  # the token of ATLASFLOW_TOKEN_FILE (auth.install in main)
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        listed = stub.ListSeries(ingest_pb2.ListSeriesRequest(page_size=10), timeout=10).series
    return sum(s.instance_count for s in listed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    args = parser.parse_args(argv)
    # the session's token issuer: IngestProcess accepts its tokens, the count query carries one
    auth.install()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = args.workdir or Path(tmp)
        result = run_benchmark(args.slices, args.runs, work, warmup=not args.no_warmup)
    for name in ("atlasflow", "orthanc"):
        r = result[name]
        print(
            f"{name:10s} {args.slices} instances, {result['bytes'] / 1e6:.1f} MB: "
            f"median {r['median_s']:.2f} s = {r['instances_per_s']:.0f} instances/s, "
            f"{r['mb_per_s']:.1f} MB/s  (runs: " + ", ".join(f"{t:.2f}" for t in result["seconds"][name]) + ")"
        )
    print(f"ratio atlasflow/orthanc (instances/s): {result['ratio_instances_per_s']:.2f}")
    before = " ".join(f"{x:.2f}" for x in result["load_avg_before"])
    after = " ".join(f"{x:.2f}" for x in result["load_avg_after"])
    print(f"load average (1, 5, 15 min) before: {before}, after: {after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
