"""The stock ``tritonserver`` for tests and benchmarks: the binary and Python backend that the
``nvidia-pytriton`` wheel bundles, serving a model repository (`atlasflow.segmentation.triton_repo`
writes the atlasflow ones) as a child process.

`bundled_server_command` builds its argv and environment; `BundledTriton` runs it (start blocks
until the named models are ready, stop sends SIGTERM). `LocalTriton` runs atlasflow's own local
server instead (``atlasflow.segmentation.triton_server``, PyTriton) until it says it is ready.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlasflow.common.ports import free_ports


def bundled_server_command(
    model_repository: str | Path,
    work_dir: str | Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """argv and environment to serve ``model_repository`` with the ``tritonserver`` binary and
    Python backend bundled in the nvidia-pytriton wheel (what PyTriton itself does).

    ``work_dir`` receives ``backends/python`` (the backend library + this interpreter's
    version of the stub). Environment: ``LD_LIBRARY_PATH`` = the interpreter's ``LIBDIR``
    (the stub links the system libpython) + the wheel's bundled libraries; ``PATH`` starts
    with this environment's ``bin`` so the embedded stub interpreter finds the virtualenv's
    site-packages (PyTriton's ``_get_env``).
    """
    import pytriton
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    backends = Path(work_dir) / "backends"
    py = backends / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copyfile(f, py / f.name)
    stub = py / "triton_python_backend_stub"
    shutil.copyfile(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), stub)
    stub.chmod(0o755)
    env = dict(os.environ)
    libs = [str(sysconfig.get_config_var("LIBDIR") or ""), str(get_libs_path())]
    env["LD_LIBRARY_PATH"] = ":".join(
        [p for p in libs if p] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    )
    env["PATH"] = f"{Path(sys.exec_prefix) / 'bin'}:{env.get('PATH', '')}"
    argv = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--backend-directory={backends.resolve()}",
        f"--cache-directory={(dist / 'caches').resolve()}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--exit-on-error=true",
        "--strict-readiness=true",
        *extra_args,
    ]
    return argv, env


class BundledTriton:
    """The wheel-bundled ``tritonserver`` serving a model repository, as a child process.

    ``start()`` blocks until every model in ``models`` is ready (or raises RuntimeError with
    the log tail); ``stop()`` sends SIGTERM and waits. ``grpc_url`` is ``127.0.0.1:<port>``.
    ``client_tls``: the TLS (and client certificate) of the readiness checks, for a server
    started with ``--grpc-use-ssl[-mutual]`` in ``extra_args``.
    """

    def __init__(
        self,
        model_repository: str | Path,
        work_dir: str | Path,
        models: Sequence[str],
        *,
        grpc_port: int | None = None,
        extra_args: Sequence[str] = (),
        client_tls: Any = None,
    ) -> None:
        ports = free_ports(3)
        self.client_tls = client_tls
        self.grpc_port = int(grpc_port or ports[0])
        self.argv, self.env = bundled_server_command(
            model_repository,
            work_dir,
            grpc_port=self.grpc_port,
            http_port=ports[1],
            metrics_port=ports[2],
            extra_args=extra_args,
        )
        self.models = list(models)
        self.log_path = Path(work_dir) / "tritonserver.log"
        self.proc: Any = None
        self.startup_s = 0.0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self, timeout_s: float = 240.0) -> BundledTriton:
        import subprocess
        import time

        from tritonclient.utils import InferenceServerException

        from atlasflow.segmentation.triton_client import triton_grpc_client

        t0 = time.perf_counter()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = triton_grpc_client(self.grpc_url, self.client_tls)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("tritonserver exited during start-up:\n" + self.log_tail())
                try:
                    if all(client.is_model_ready(m, client_timeout=2.0) for m in self.models):
                        break
                except InferenceServerException:
                    pass
                if time.perf_counter() - t0 > timeout_s:
                    self.stop()
                    raise RuntimeError("tritonserver did not become ready:\n" + self.log_tail())
                time.sleep(0.2)
        finally:
            client.close()
        self.startup_s = time.perf_counter() - t0
        return self

    def stop(self, timeout_s: float = 60.0) -> int | None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return int(self.proc.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return int(self.proc.wait())

    def __enter__(self) -> BundledTriton:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class LocalTriton:
    """``python -m atlasflow.segmentation.triton_server ARGS`` (local PyTriton) on free loopback
    ports, as a child process in its own session: `start()` blocks until it prints
    ``TRITON READY`` (or raises RuntimeError with the log tail when it exits or times out; the
    process group is then killed); `stop()` sends SIGTERM, waits, and kills the group after
    `timeout_s`. ``lines``: its output so far; ``url``: ``127.0.0.1:<grpc port>``.
    ``env``: the child's environment (default: this one)."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.grpc_port, http_port, metrics_port = free_ports(3)
        self.argv = [
            sys.executable,
            "-m",
            "atlasflow.segmentation.triton_server",
            *args,
            f"--grpc-port={self.grpc_port}",
            f"--http-port={http_port}",
            f"--metrics-port={metrics_port}",
        ]
        self.env = env
        self.lines: list[str] = []
        self.proc: Any = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 300.0) -> LocalTriton:
        import signal
        import subprocess
        import threading
        import time

        t0 = time.perf_counter()
        ready = threading.Event()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True
        )

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("TRITON READY"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.is_set() and self.proc.poll() is None and time.monotonic() < deadline:
            ready.wait(0.2)
        if not ready.is_set():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise RuntimeError("Triton did not become ready:\n" + "\n".join(self.lines[-40:]))
        self.startup_s = time.perf_counter() - t0
        return self

    def stop(self, timeout_s: float = 90.0) -> None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
