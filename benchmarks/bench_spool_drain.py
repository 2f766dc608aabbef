"""Spool drain cost of the deletion guard: records/s moved from the instance spool into the
local blob store, with the per-record check against deletions (`IngestStore._drain_guard`: one
transaction holding the study's lock per record, what several ingest replicas need) and without
it (the drain before that check), on SQLite and on a local PostgreSQL 15.

    .venv/bin/python benchmarks/bench_spool_drain.py [--records 300] [--kib 512] [--runs 3] [--json]

Each run stores `records` instances of `kib` KiB (random bytes: the store does not parse them,
reception does) into a fresh store, then times `spool_drain.drain()`. Median of `runs`, the
four variants alternating within each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.ingest.store import IngestStore
from atlasflow.testing.postgres import PostgresCluster


def one_run(root: Path, database: str | None, records: int, kib: int, guarded: bool) -> float:
    store = IngestStore(
        root / "data", LocalBlobStore(root / "blobs"), database=database, spool_segment_bytes=64 << 20, spool_spares=1
    )
    try:
        if not guarded:
            store.spool_drain._guard = None  # the drain without the deletion check
        for i in range(records):
            store.store_instance(os.urandom(kib * 1024), f"study-{i % 10}", f"series-{i % 10}", f"sop-{i}")
        t0 = time.perf_counter()
        moved = store.spool_drain.drain()
        elapsed = time.perf_counter() - t0
        assert moved == records, moved
        return records / elapsed
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--kib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with PostgresCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        rates: dict[str, list[float]] = {}
        for run in range(args.runs):  # alternating, so that drift of the machine hits both alike
            for backend in ("sqlite", "postgresql"):
                for guarded in (False, True):
                    root = Path(tmp) / f"{backend}-{guarded}-{run}"
                    url = cluster.create_database() if backend == "postgresql" else None
                    key = f"{backend}_{'guarded' if guarded else 'unguarded'}_records_per_s"
                    rates.setdefault(key, []).append(one_run(root, url, args.records, args.kib, guarded))
        result = {k: statistics.median(v) for k, v in rates.items()}
    result["load_average_1m"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result))
        return
    print(f"spool drain, {args.records} records of {args.kib} KiB, median of {args.runs}:")
    for backend in ("sqlite", "postgresql"):
        plain = result[f"{backend}_unguarded_records_per_s"]
        checked = result[f"{backend}_guarded_records_per_s"]
        print(
            f"  {backend:10s} without the deletion check {plain:8.1f} records/s,"
            f" with it {checked:8.1f} records/s ({checked / plain:.2f}x)"
        )
    print(f"  load average (1 min): {result['load_average_1m']:.2f}")


if __name__ == "__main__":
    main()
