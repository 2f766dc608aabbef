"""Upload memory benchmark: the ingest process's peak RSS while it receives one large instance.

    .venv/bin/python benchmarks/bench_upload_memory.py [--mb 300] [--resumable] [--services DIR]

Generates one valid CT instance of ``--mb`` MB of pixel data (`write_large_ct_instance`, one
uncompressed 16-bit frame), starts `atlasflow serve ingest` (`IngestProcess`, its own process)
and uploads the instance with UploadInstances in 1 MiB chunks (the client streams it from the
file). Prints the server's peak RSS (VmHWM of /proc/<pid>/status) after start-up and after the
upload, the growth, and growth / instance size. ``--services DIR`` runs the server from another
source tree (e.g. ``git archive <rev> services | tar -x -C /tmp/old`` then ``/tmp/old/services``)
to compare with an older revision on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import auth
from atlasflow.testing.large_instance import write_large_ct_instance
from atlasflow.testing.peers import IngestProcess

CHUNK = 1 << 20


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _requests(path: Path, sha: str, upload_id: str) -> Iterator[ingest_pb2.UploadInstancesRequest]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            chunk = f.read(CHUNK)
            msg = ingest_pb2.UploadInstancesRequest(client_ref=path.name, chunk=chunk)
            if upload_id:
                msg.upload_id, msg.offset = upload_id, offset
            offset += len(chunk)
            if offset >= size:
                msg.last_chunk, msg.sha256 = True, sha
            yield msg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=300, help="pixel data of the instance, MB (10^6 bytes)")
    ap.add_argument("--resumable", action="store_true", help="upload with an upload_id (resumable path)")
    ap.add_argument("--services", type=Path, default=None, help="run the server from this source tree")
    args = ap.parse_args()
    auth.install()  # the client's token (ATLASFLOW_TOKEN_FILE); the server accepts its issuer
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        work = Path(tmp)
        path = write_large_ct_instance(work / "large.dcm", args.mb * 1_000_000, seed=f"bench-upload-{args.mb}")
        size = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        sha = h.hexdigest()
        ingest = IngestProcess(work / "ingest", env={"MIN_FREE_DISK_MB": "0"})
        if args.services is not None:
            ingest.env["PYTHONPATH"] = f"{args.services.resolve()}{os.pathsep}{ingest.env.get('PYTHONPATH', '')}"
        with ingest:
            assert ingest.proc is not None
            pid = ingest.proc.pid
            time.sleep(1.0)
            before = peak_rss_mb(pid)
            t0 = time.perf_counter()
            with sync_channel(ingest.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)
                upload_id = f"bench-{sha[:16]}" if args.resumable else ""
                resp = stub.UploadInstances(_requests(path, sha, upload_id), timeout=1200)
            elapsed = time.perf_counter() - t0
            after = peak_rss_mb(pid)
        (receipt,) = resp.receipts
        assert receipt.series_id
        mb = size / 1e6
        growth = after - before
        print(
            f"instance {mb:.1f} MB ({'resumable' if args.resumable else 'stream'}, "
            f"{args.services or 'this tree'}): ingest peak RSS {before:.0f} MiB after start -> "
            f"{after:.0f} MiB after the upload; growth {growth:.0f} MiB = "
            f"{growth * 1.048576 / mb:.2f} x the instance; upload {elapsed:.1f} s"
        )


if __name__ == "__main__":
    main()
