"""Segmentation spreads over several Triton replicas (issue 17): client-side round-robin.

Two stock ``tritonserver`` processes (the nvidia-pytriton wheel's binary, mutual TLS with
certificates of one `LocalCA` as the chart runs them, explicit model control) on two loopback
ports share ONE model repository (the chart's shared repository volume). The segmentation
client gets the gRPC multi-address target ``ipv4:127.0.0.1:<p1>,127.0.0.1:<p2>`` (what a
headless Service's DNS name resolves to in a cluster) and gRPC's ``round_robin`` policy: the
calls reach both servers (counted by each server's own statistics API); the training
roll-out's repository load and segmentation's readiness check of an activated version reach
EVERY server (one client per address, Triton's certificate checked against the Service name);
with one server stopped the calls still succeed on the other, and the roll-out fails naming
the address that did not load. One module-scoped pair of servers (tiny test ensemble).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from atlasflow.common.errors import Unavailable
from atlasflow.common.tls import ClientTLS, LocalCA
from atlasflow.segmentation.ensemble import triton_model_name
from atlasflow.segmentation.triton_client import (
    TritonSegmenter,
    address_clients,
    ready_on_every_replica,
    triton_grpc_client,
    unready_addresses,
)
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.testing.triton import BundledTriton
from atlasflow.training.rollout import TritonRepositoryRollout
from atlasflow.training.versions import EnsembleVersion

TINY = Path(__file__).resolve().parent / "tiny_ensembles" / "tiny-a-v1.json"
MODEL = triton_model_name("tiny-a-v1")


@dataclass
class Pair:
    servers: list[BundledTriton]
    repo: Path
    tls: ClientTLS  # segmentation's certificate; Triton's checked against the name "triton"

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(s.grpc_url for s in self.servers)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("triton-spread")
    ca = LocalCA.create_or_load(root / "ca")
    server_cert = ca.issue("triton")  # SANs: localhost, 127.0.0.1, triton
    seg = ca.issue("segmentation", server=False)
    repo = root / "models"  # one repository, like the chart's shared volume
    write_repository(repo, TINY)
    tls = ClientTLS(
        ca_file=str(ca.ca_file), cert_file=str(seg.cert_file), key_file=str(seg.key_file), server_name="triton"
    )
    args = [
        "--model-control-mode=explicit",
        f"--load-model={MODEL}",
        "--exit-timeout-secs=1",
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={server_cert.cert_file}",
        f"--grpc-server-key={server_cert.key_file}",
        f"--grpc-root-cert={ca.ca_file}",
        "--allow-http=false",
    ]
    servers = [BundledTriton(repo, root / f"work{i}", [MODEL], extra_args=args, client_tls=tls) for i in (0, 1)]
    errors: list[BaseException] = []

    def start(server: BundledTriton) -> None:
        try:
            server.start(timeout_s=300)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield Pair(servers, repo, tls)
    except Exception:
        for s in servers:
            print(s.log_tail(40))
        raise
    finally:
        for s in servers:
            s.stop()


def _successes(pair: Pair, model: str = MODEL, only: int = 2) -> list[int]:
    """Each server's (the first ``only``) own count of successful inferences of ``model``
    (statistics API)."""
    counts = []
    for server in pair.servers[:only]:
        client = triton_grpc_client(server.grpc_url, pair.tls)
        try:
            stats = client.get_inference_statistics(model, client_timeout=10.0)
            counts.append(sum(int(m.inference_stats.success.count) for m in stats.model_stats if m.name == model))
        finally:
            client.close()
    return counts


def _ct() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((16, 16, 8), -1000, dtype=np.int16)
    vol[4:12, 4:12, 2:6] = 60
    return vol, np.diag([2.0, 2.0, 3.0, 1.0])


def test_calls_spread_round_robin_over_every_address(pair: Pair) -> None:
    before = _successes(pair)
    n = 6
    with TritonSegmenter(pair.target, MODEL, tls=pair.tls, shm="auto") as seg:
        assert seg.ready()
        vol, affine = _ct()
        for _ in range(n):
            assert seg.segment(vol, affine).labels.shape == vol.shape
        # the channel's second connection may finish its TLS handshake after the first calls
        # (a loaded machine): a few more calls, at most 24 in all (pick_first would put all on one)
        delta = [a - b for a, b in zip(_successes(pair), before)]
        while min(delta) < 2 and n < 24:
            seg.segment(vol, affine)
            n += 1
            delta = [a - b for a, b in zip(_successes(pair), before)]
        # shared memory would register on one server and infer on the other: never when spreading
        assert seg.last_transport == "grpc"
    assert sum(delta) == n, delta
    assert all(d >= 2 for d in delta), f"round_robin should reach both servers: {delta}"


def test_a_spreading_channel_is_rebuilt_so_new_replicas_are_resolved(pair: Pair) -> None:
    """gRPC's DNS resolver does not poll: the client rebuilds a spreading channel every
    ``reresolve_s`` (a scaled-up Triton pod is then resolved); calls go on across the swap and
    the replaced channel is closed once its calls are over (``timeout_s`` later)."""
    vol, affine = _ct()
    with TritonSegmenter(pair.target, MODEL, tls=pair.tls, shm="off", reresolve_s=0.3, timeout_s=1.0) as seg:
        first = seg._client
        seg.segment(vol, affine)
        time.sleep(0.4)
        seg.segment(vol, affine)
        assert seg._client is not first and [c for _, c in seg._retired] == [first]
        time.sleep(2.1)  # > timeout_s + 1 s: no call can still run on the first channel
        seg.segment(vol, affine)
        assert first not in [c for _, c in seg._retired]
        with pytest.raises(ValueError):  # closed: grpc refuses a call on a closed channel
            first.is_server_live(client_timeout=2.0)
    with TritonSegmenter(pair.servers[0].grpc_url, MODEL, tls=pair.tls) as one:
        assert not one._spreads  # one address: one channel for good


def _version(tmp_path: Path, name: str) -> EnsembleVersion:
    folder = tmp_path / "versions" / name
    folder.mkdir(parents=True)
    raw = json.loads(TINY.read_text())
    raw["version"] = name
    (folder / "ensemble.json").write_text(json.dumps(raw))
    return EnsembleVersion(name, "sha256:" + "0" * 64, folder)


def test_rollout_loads_on_every_replica_and_readiness_checks_every_one(pair: Pair, tmp_path: Path) -> None:
    version = _version(tmp_path, "tiny-a-spread-0123456789ab")
    model = triton_model_name(version.name)
    assert len(unready_addresses(pair.target, model, pair.tls)) == 2  # not loaded anywhere yet
    rollout = TritonRepositoryRollout(pair.target, pair.repo, tls=pair.tls, ready_timeout_s=120, previous="")
    note = rollout(version)
    assert "2 Triton servers" in note, note
    for addr, client in address_clients(pair.target, pair.tls):
        try:
            assert client.is_model_ready(model, client_timeout=10.0), addr
        finally:
            client.close()
    assert unready_addresses(pair.target, model, pair.tls) == []
    # segmentation's readiness check of the activated version (ACTIVATION=repository, app.py)
    is_ready = ready_on_every_replica(pair.target, pair.tls)
    assert is_ready(model)
    # a server that unloaded it is named by the readiness check
    client = triton_grpc_client(pair.servers[1].grpc_url, pair.tls)
    try:
        client.unload_model(model)
    finally:
        client.close()
    missing = unready_addresses(pair.target, model, pair.tls)
    assert len(missing) == 1 and missing[0].startswith(pair.servers[1].grpc_url), missing
    with pytest.raises(Unavailable) as exc:
        is_ready(model)
    assert exc.value.reason == "TRITON_LOAD_FAILED"
    assert exc.value.metadata["addresses"].startswith(pair.servers[1].grpc_url), exc.value.metadata
    # inference meanwhile: a call that lands on the server without the model goes on to the next
    with TritonSegmenter(pair.target, model, tls=pair.tls, shm="off") as seg:
        vol, affine = _ct()
        for _ in range(4):
            assert seg.segment(vol, affine).labels.shape == vol.shape
    assert _successes(pair, model, only=1) == [4]  # all on the server that has the model


def test_one_server_stopped_calls_go_on_and_the_rollout_names_it(pair: Pair, tmp_path: Path) -> None:
    with TritonSegmenter(pair.target, MODEL, tls=pair.tls, shm="off") as seg:
        vol, affine = _ct()
        seg.segment(vol, affine)  # both connected
        pair.servers[1].stop()
        for _ in range(4):
            assert seg.segment(vol, affine).labels.shape == vol.shape
    version = _version(tmp_path, "tiny-a-spread-fedcba987654")
    rollout = TritonRepositoryRollout(pair.target, pair.repo, tls=pair.tls, ready_timeout_s=30)
    with pytest.raises(Unavailable) as exc:
        rollout(version)
    assert exc.value.reason == "TRITON_LOAD_FAILED"
    assert exc.value.metadata["address"] == pair.servers[1].grpc_url, exc.value.metadata
