"""An S3 emulator as a real HTTP peer: moto's server mode (``moto_server`` from PyPI) on a free
loopback port, for the blob-store contract suite, the ingest-on-S3 test and benchmarks.

    with MotoS3() as s3:
        store = s3.store("bucket", "prefix")        # an S3BlobStore talking HTTP to it

It sets no process-wide environment: the store it returns carries the emulator's endpoint and
dummy credentials through ``AWS_*`` variables that `MotoS3.env` lists, for a child process or
for `os.environ` in a test fixture.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from atlasflow.common.blobstore import S3Options
from atlasflow.common.ports import free_ports

#: dummy credentials moto accepts (never real ones)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "atlasflow-test",
    "AWS_SECRET_ACCESS_KEY": "atlasflow-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_server_binary() -> str:
    here = Path(sys.executable).parent / "moto_server"
    found = str(here) if here.exists() else shutil.which("moto_server")
    if not found:
        raise RuntimeError('moto_server not found: pip install "moto[server]" (the test extra has it)')
    return found


class MotoS3:
    """moto_server on 127.0.0.1:<free port>; stopped (and its state gone) on exit."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Variables for a process that talks to the emulator with boto3's standard chain."""
        return dict(CREDENTIALS)

    def options(self, *, multipart_threshold_mb: int = 64, max_attempts: int = 8) -> S3Options:
        """`S3Options` reaching the emulator (path-style, like most MinIO / Ceph set-ups)."""
        return S3Options(
            endpoint_url=self.endpoint,
            region="us-east-1",
            addressing_style="path",
            max_attempts=max_attempts,
            multipart_threshold_mb=multipart_threshold_mb,
            multipart_chunk_mb=5,  # S3's smallest part
        )

    def start(self) -> MotoS3:
        self.proc = subprocess.Popen(
            [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **CREDENTIALS},
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=5).close()
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {self.start_timeout_s} s")

    def create_bucket(self, bucket: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=bucket)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
