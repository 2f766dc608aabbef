"""Outbox delivery semantics and typed settings."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from atlasflow.common import sqlite as db
from atlasflow.common.errors import InvalidArgument, Unavailable
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OUTBOX_MIGRATION, OutboxDispatcher, OutboxRow, enqueue
from atlasflow.common.settings import ServiceSettings


def _open(path):
    conn = db.connect(path)
    db.migrate(conn, [OUTBOX_MIGRATION])
    return conn


def test_outbox_retries_transient_parks_permanent_and_survives_restart(tmp_path):
    path = tmp_path / "o.sqlite3"
    conn = _open(path)
    with db.transaction(conn):
        enqueue(conn, "t.flaky", "k1", b"one", "")
        enqueue(conn, "t.bad", "k2", b"two", "")
        enqueue(conn, "t.flaky", "k1", b"dup", "")  # same dedupe key: ignored
    conn.close()

    conn = _open(path)  # "restart": the rows are still pending
    calls: list[bytes] = []
    fail_first = {"n": 1}

    async def flaky(row: OutboxRow) -> None:
        calls.append(row.payload)
        if fail_first["n"]:
            fail_first["n"] -= 1
            raise Unavailable("DOWN", "callee down")

    async def bad(row: OutboxRow) -> None:
        raise InvalidArgument("NOPE", "rejected")

    d = OutboxDispatcher(conn, threading.Lock(), {"t.flaky": flaky, "t.bad": bad}, Metrics("test"), max_backoff_s=0.0)
    assert d.pending() == 2
    assert asyncio.run(d.deliver_due()) == 0  # flaky failed once, bad parked
    assert d.pending() == 1
    assert asyncio.run(d.deliver_due()) == 1  # retried and delivered
    assert d.pending() == 0
    assert calls == [b"one", b"one"]
    states = dict(conn.execute("SELECT dedupe_key, state FROM outbox").fetchall())
    assert states == {"k1": "done", "k2": "dead"}


@dataclass(frozen=True)
class _S(ServiceSettings):
    quiet_period_s: float = 5.0
    peers: tuple[str, ...] = ()
    enabled: bool = False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, _S()),
        ({"X_GRPC_PORT": "123", "X_QUIET_PERIOD_S": "1.5"}, _S(grpc_port=123, quiet_period_s=1.5)),
        ({"X_PEERS": "A, B,", "X_ENABLED": "yes"}, _S(peers=("A", "B"), enabled=True)),
    ],
)
def test_settings_from_env(env, expected):
    assert _S.from_env("X_", env) == expected


@pytest.mark.parametrize("env", [{"X_GRPC_PORT": "eighty"}, {"X_ENABLED": "maybe"}])
def test_settings_reject_bad_values(env):
    with pytest.raises(InvalidArgument) as err:
        _S.from_env("X_", env)
    assert err.value.reason == "INVALID_SETTING"
