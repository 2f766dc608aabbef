"""Real peers for tests and benchmarks: atlasflow ingest and Orthanc as subprocesses on free
ports, dcmtk storescu, and the CT series they receive.

`build_ct_series` tiles the 20 real 512x512 slices of TotalSegmentator's ``example_ct_dicom``
(JPEG 2000 lossless, 12-bit, HFS) into an N-slice CT Image Storage series (Explicit VR Little
Endian, uncompressed, 2.0 mm spacing, fresh deterministic UIDs). `IngestProcess` runs
`atlasflow serve ingest`, `OrthancProcess` runs Orthanc 1.10 (``/usr/sbin/Orthanc``), `storescu`
runs dcmtk's storescu with ``TCP_NODELAY=1`` and `acknowledged_files` parses its `-v` output.
Used by the ingest reception tests and by `benchmarks/bench_ingest.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlasflow.common.ports import free_ports
from atlasflow.testing import auth
from atlasflow.testing.data import REPO, TEST_DATA

__all__ = [
    "EXAMPLE_CT_DICOM",
    "PYTHON",
    "IngestProcess",
    "OrthancProcess",
    "acknowledged_files",
    "bench_uid",
    "build_ct_series",
    "free_ports",
    "storescu",
    "wait_port",
]

PYTHON = REPO / ".venv" / "bin" / "python"
EXAMPLE_CT_DICOM = TEST_DATA / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"
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
        source = pydicom.dcmread(p)
        pixels = source.pixel_array  # (rows, cols) uint16, decoded once
        sources.append((float(source.ImagePositionPatient[2]), source, pixels))
    sources.sort(key=lambda t: t[0])
    cycle = list(range(len(sources))) + list(range(len(sources) - 1, -1, -1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = (bench_uid(seed, r) for r in ("study", "series", "frame"))
    z0 = sources[0][0]
    paths = []
    for i in range(n_slices):
        _z, src, pixels = sources[cycle[i % len(cycle)]]
        ds: Any = src.copy()  # pydicom Dataset; UIDs are assigned as str
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
            # the tests' DICOM peers use many calling AE titles (a test of the allow-list sets its own)
            "ACCEPTED_CALLING_AETS": "*",
            # accepts the test session's tokens (atlasflow.testing.auth)
            **{k.upper(): v for k, v in auth.auth_settings("ingest").items()},
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
