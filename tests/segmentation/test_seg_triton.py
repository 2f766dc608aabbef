"""Real Triton Inference Server (PyTriton) serving the ensemble pipeline, called over gRPC.

Starts `python -m atlasflow.segmentation.triton_server` as a subprocess on free ports (without
LD_LIBRARY_PATH: the server must set it), segments the TotalSegmentator demo CT through
TritonSegmenter and compares with the in-process EnsemblePipeline.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from atlasflow.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from atlasflow.common.ports import free_ports
from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.testing.data import TEST_DATA
from atlasflow.testing.triton import LocalTriton

DEMO_CT = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"
MODEL = "abdomen_trio_v1"


@dataclass
class Server:
    proc: subprocess.Popen
    grpc_url: str
    startup_s: float
    lines: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    t0 = time.perf_counter()
    triton = LocalTriton(["--ensemble", "abdomen-trio-v1"], env=env).start(timeout_s=240)
    proc, lines, url = triton.proc, triton.lines, triton.url
    deadline = time.monotonic() + 240
    with TritonSegmenter(url, MODEL) as probe:
        while not probe.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe.ready()
    srv = Server(proc, url, time.perf_counter() - t0, lines)
    print(f"\nTriton start-up (process start -> model ready): {srv.startup_s:.1f} s")
    yield srv
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Triton server did not stop on SIGTERM")
    time.sleep(0.5)
    assert rc == 0, "\n".join(lines[-30:])
    assert "TRITON STOPPED" in lines


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def test_tritonserver_inherits_libpython_dir(server: Server) -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    found = []
    stack = [server.proc.pid]
    while stack:
        pid = stack.pop()
        kids = _children(pid)
        stack.extend(kids)
        for kid in kids:
            try:
                if Path(f"/proc/{kid}/comm").read_text().strip() == "tritonserver":
                    env = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
                    found.append(next((e.decode() for e in env if e.startswith(b"LD_LIBRARY_PATH=")), ""))
            except OSError:
                continue
    assert found, "no tritonserver child process found"
    assert all(libdir in e.split("=", 1)[1].split(":") for e in found), found


def _tree(pid: int) -> list[int]:
    out, stack = [pid], [pid]
    while stack:
        kids = _children(stack.pop())
        out.extend(kids)
        stack.extend(kids)
    return out


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket (IPv4 and IPv6) the processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc/net/tcp* print each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.append(
                (socket.inet_ntop(socket.AF_INET if table == "tcp" else socket.AF_INET6, words), int(hexport, 16))
            )
    return out


def test_local_triton_listens_on_loopback_only_and_has_no_secret_on_its_command_line(server: Server) -> None:
    """Issue 13: every port of the PyTriton process tree (gRPC, HTTP, metrics, the proxy's)
    is bound to 127.0.0.1, none answers on this host's other address, and no process of the
    tree carries an access token or a restricted-protocol flag in its argv."""
    pids = _tree(server.proc.pid)
    sockets = _listening(pids)
    grpc_port = int(server.grpc_url.rsplit(":", 1)[1])
    assert grpc_port in [port for _, port in sockets], sockets
    assert len(sockets) >= 3, sockets  # gRPC, HTTP, metrics at least
    # 127.0.0.1 itself, or as an IPv4-mapped IPv6 address (gRPC's listener: ::ffff:127.0.0.1)
    assert all(
        ipaddress.ip_address(a.removeprefix("::ffff:")) == ipaddress.ip_address("127.0.0.1") for a, _ in sockets
    ), sockets
    others = [
        a
        for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
        if ":" not in a and not a.startswith("127.")
    ]
    for addr in others:
        for _, port in sockets:
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2.0)
                s.connect((addr, port))
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        assert "access-token" not in text and "restricted" not in text, text


def test_demo_ct_through_triton_equals_in_process(server: Server) -> None:
    img = nib.load(str(DEMO_CT))
    raw = np.asanyarray(img.dataobj)
    assert raw.min() >= -32768 and raw.max() <= 32767
    vol = raw.astype(np.int16)
    affine = img.affine
    assert vol.shape == (122, 101, 112)

    with TritonSegmenter(server.grpc_url, MODEL) as client:
        t0 = time.perf_counter()
        remote = client.segment(vol, affine, labelled_organs=[5])
        t_triton = time.perf_counter() - t0

    pipeline = EnsemblePipeline("abdomen-trio-v1")
    flags = np.zeros(9, dtype=np.uint8)
    flags[4] = 1
    t0 = time.perf_counter()
    local = pipeline(vol, affine, flags)
    t_local = time.perf_counter() - t0
    print(
        f"\ndemo CT {vol.shape}: Triton round trip {t_triton:.2f} s, in-process {t_local:.2f} s, "
        f"ratio {t_triton / t_local:.2f}; in-process stages { ({k: round(v, 2) for k, v in local.timings_s.items()}) }"
    )
    assert remote.labels.shape == vol.shape and remote.heatmap.shape == vol.shape
    assert local.labels.any()
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.heatmap, local.heatmap)
    np.testing.assert_allclose(remote.organ_stats, local.organ_stats, rtol=1e-12)
    assert remote.weights_trained is local.weights_trained is True
    assert np.all(remote.organ_stats[4, 1:3] == 0)  # liver flagged as labelled: no attention


def test_client_span_and_trace_context_injection(server: Server) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    vol = np.full((40, 34, 26), -1000, dtype=np.int16)
    vol[10:30, 8:26, 5:20] = 40
    with TritonSegmenter(server.grpc_url, MODEL, tracer_provider=provider) as client:
        sent: dict = {}
        real_infer = client._client.infer

        def spy(*args, **kwargs):
            sent.update(kwargs)
            return real_infer(*args, **kwargs)

        client._client.infer = spy
        out = client.segment(vol, np.diag([3.0, 3.0, 3.0, 1.0]))
    assert out.labels.shape == vol.shape
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "triton.infer"]
    assert span.kind == trace.SpanKind.CLIENT
    assert span.attributes["atlasflow.model_name"] == MODEL
    assert tuple(span.attributes["atlasflow.input_shape"]) == vol.shape
    expected = ["00", f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"]
    assert sent["headers"]["traceparent"].split("-")[:3] == expected
    assert sent["parameters"]["traceparent"] == sent["headers"]["traceparent"]


def test_server_side_domain_error_is_mapped(server: Server) -> None:
    with TritonSegmenter(server.grpc_url, MODEL) as client:
        with pytest.raises(InvalidArgument) as err:
            client.segment(np.zeros((8, 8, 8), np.int16), np.zeros((4, 4)))
    assert err.value.reason == "INVALID_AFFINE"
    assert "Traceback" not in err.value.message


def test_unknown_model_is_failed_precondition(server: Server) -> None:
    with TritonSegmenter(server.grpc_url, "no_such_model") as client:
        assert not client.ready()
        with pytest.raises(FailedPrecondition) as err:
            client.segment(np.zeros((8, 8, 8), np.int16), np.eye(4))
    assert err.value.reason == "TRITON_MODEL_NOT_READY"


def test_unreachable_triton_is_unavailable() -> None:
    (port,) = free_ports(1)
    with TritonSegmenter(f"127.0.0.1:{port}", MODEL, timeout_s=5) as client:
        assert not client.ready()
        with pytest.raises(Unavailable) as err:
            client.segment(np.zeros((8, 8, 8), np.int16), np.eye(4))
    assert err.value.reason == "TRITON_UNAVAILABLE"
