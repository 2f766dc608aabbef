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

The module also holds the process helpers the ingest reception tests use (`IngestProcess`,
`OrthancProcess`, `storescu`, `free_ports`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from atlasflow.cli.local import free_ports

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
SHARED_DATA = Path(os.environ.get("ATLASFLOW_TEST_DATA", REPO / "tests" / "data"))
EXAMPLE_CT_DICOM = SHARED_DATA / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"
ORTHANC = "/usr/sbin/Orthanc"
BENCH_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:atlasflow:bench-ingest-series")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def bench_uid(seed: str, role: str) -> str:
    return "2.25." + str(uuid.uuid5(BENCH_UID_NAMESPACE, f"{seed}/{role}").int)


def build_ct_series(
    out_dir: Path, n_slices: int = 300, *, seed: str = "bench", source_dir: Path = EXAMPLE_CT_DICOM
) -> list[Path]:
    """Write an `n_slices` CT series tiled from the real slices in `source_dir`.

    Slices are taken in position order, back and forth (0..19, 19..0, ...) so that neighbours
    stay anatomically close; (0020,0032) ImagePositionPatient z = z0 + 2.0 mm * i, one
    StudyInstanceUID/SeriesInstanceUID/FrameOfReferenceUID per `seed`, one SOPInstanceUID per
    slice (deterministic: the same seed gives byte-identical files). Pixels are decoded from
    JPEG 2000 once and written uncompressed (Explicit VR Little Endian). Returns the paths in
    slice order.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    sources = []
    for p in sorted(Path(source_dir).iterdir()):
        ds = pydicom.dcmread(p)
        pixels = ds.pixel_array  # (rows, cols) uint16, decoded once
        sources.append((float(ds.ImagePositionPatient[2]), ds, pixels))
    sources.sort(key=lambda t: t[0])
    cycle = list(range(len(sources))) + list(range(len(sources) - 1, -1, -1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = (bench_uid(seed, r) for r in ("study", "series", "frame"))
    z0 = sources[0][0]
    paths = []
    for i in range(n_slices):
        _z, src, pixels = sources[cycle[i % len(cycle)]]
        ds = src.copy()
        sop = bench_uid(seed, f"sop/{i}")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = i + 1
        x, y, _ = (float(v) for v in src.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + 2.0 * i, 3)]
        ds.SliceLocation = round(z0 + 2.0 * i, 3)
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW"
        ds["PixelData"].is_undefined_length = False
        path = out_dir / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open in {timeout_s} s")


class IngestProcess:
    """`atlasflow serve ingest` as a subprocess on free ports, state under `root`.

    `env` adds ATLASFLOW_INGEST_* settings (names without the prefix). The log goes to
    ``root/ingest-<n>.log``. Usable as a context manager; `kill()` is SIGKILL (crash tests).
    """

    def __init__(
        self,
        root: Path,
        *,
        ae_title: str = "ATLASFLOW",
        quiet_period_s: float = 3600,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ae_title = ae_title
        self.grpc_port, self.dicom_port, dead = free_ports(3)
        self.env = dict(
            os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1", OTEL_TRACES_EXPORTER="none", OTEL_SDK_DISABLED="true"
        )
        settings = {
            "GRPC_PORT": str(self.grpc_port),
            "DICOM_PORT": str(self.dicom_port),
            "DATA_DIR": str(self.root / "data"),
            "BLOB_DIR": str(self.root / "blobs"),
            "AE_TITLE": ae_title,
            "QUIET_PERIOD_S": str(quiet_period_s),
            "SEGMENTATION_TARGET": f"127.0.0.1:{dead}",
            "SHUTDOWN_GRACE_S": "1",
        }
        settings.update(env or {})
        self.env.update({"ATLASFLOW_INGEST_" + k: v for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 60) -> IngestProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.log_path = self.root / f"ingest-{self.starts}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(PYTHON), "-m", "atlasflow.cli.main", "serve", "ingest"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.dicom_port, timeout_s, self.proc)
        wait_port(self.grpc_port, timeout_s, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.starts else ""

    def __enter__(self) -> IngestProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OrthancProcess:
    """A throwaway Orthanc (Debian 1.10) with a generated config on free ports under `root`.

    `modalities`: {name: (aet, host, port)} that Orthanc may C-MOVE to. Remote access and
    authentication are off; the DICOM server accepts any calling AE (unknown SCU allowed).
    """

    def __init__(
        self, root: Path, *, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None
    ) -> None:
        self.root = Path(root)
        self.aet = aet
        self.dicom_port, self.http_port = free_ports(2)
        self.config = {
            "Name": "atlasflow-test",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "Plugins": [],
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "ConcurrentJobs": 2,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": 30,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> OrthancProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        self._log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [ORTHANC, str(cfg)],
            cwd=self.root,
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.http_port, timeout_s, self.proc)
        wait_port(self.dicom_port, timeout_s, self.proc)
        return self

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SUCCESS_RE = re.compile(r"Received Store Response \((Success|Warning[^)]*)\)")
_SENDING_RE = re.compile(r"Sending file: (.+)$")


def storescu(
    files: Sequence[Path],
    port: int,
    *,
    aec: str = "ATLASFLOW",
    aet: str = "STORESCU",
    timeout_s: float = 300,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """dcmtk storescu, TCP_NODELAY=1, verbose (`-v`) so that per-file statuses can be parsed."""
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (Debian package dcmtk)"
    return subprocess.run(
        [exe, "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)],
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def acknowledged_files(storescu_log: str) -> list[str]:
    """Files storescu saw acknowledged with Success (or Warning), from its `-v` output."""
    done, current = [], None
    for line in storescu_log.splitlines():
        m = _SENDING_RE.search(line)
        if m:
            current = m.group(1).strip()
            continue
        if current is not None and _SUCCESS_RE.search(line):
            done.append(current)
            current = None
    return done


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
    import grpc

    from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

    with grpc.insecure_channel(target) as channel:
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
    sys.path.insert(0, str(REPO))
    sys.exit(main())
