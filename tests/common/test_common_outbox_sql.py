"""`SqlOutboxStore` on SQLite and PostgreSQL (`db_url`): replicas claim each row once, a dead
replica's claim expires and another delivers, receivers are idempotent by the dedupe key, and the
outbox lag metric."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

from atlasflow.common import db
from atlasflow.common.metrics import Metrics
from atlasflow.common.outbox import OutboxDispatcher, OutboxRow, SqlOutboxStore, create_outbox_table, enqueue


@pytest.fixture
def database(db_url):
    engine = db.create_engine(db_url)
    with engine.begin() as conn:
        create_outbox_table(Operations(MigrationContext.configure(conn)))
    database = db.Database(engine)
    yield database
    database.close()


def _fill(database: db.Database, n: int, topic: str = "t") -> None:
    with database.transaction() as conn:
        for i in range(n):
            enqueue(conn, topic, f"k{i:03d}", f"p{i}".encode(), "")
        enqueue(conn, topic, "k000", b"duplicate", "")  # same dedupe key: ignored


def test_two_replicas_deliver_each_row_once(database):
    _fill(database, 40)
    delivered: list[tuple[str, str]] = []
    lock = threading.Lock()

    def replica(name: str) -> None:
        async def handler(row: OutboxRow) -> None:
            await asyncio.sleep(0.002)
            with lock:
                delivered.append((row.dedupe_key, name))

        store = SqlOutboxStore(database, claimer=name, batch=4)
        dispatcher = OutboxDispatcher(store, None, {"t": handler}, Metrics(name), max_backoff_s=0.0)

        async def drain() -> None:
            while store.pending():
                await dispatcher.deliver_due()

        asyncio.run(drain())

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    counts = Counter(key for key, _ in delivered)
    assert len(counts) == 40 and max(counts.values()) == 1, counts.most_common(3)
    with database.read() as conn:
        states = Counter(r[0] for r in conn.execute(sa.text("SELECT state FROM outbox")))
        payload = conn.execute(sa.text("SELECT payload FROM outbox WHERE dedupe_key = 'k000'")).scalar_one()
    assert states == {"done": 40}
    assert bytes(payload) == b"p0"


def test_claims_are_exclusive_until_they_expire(database):
    _fill(database, 3)
    a = SqlOutboxStore(database, claimer="a", claim_s=30.0)
    b = SqlOutboxStore(database, claimer="b", claim_s=30.0)
    t0 = 1e10  # far after the rows' next_attempt_at
    claimed = a.due(t0, 32)
    assert [r.dedupe_key for r in claimed] == ["k000", "k001", "k002"]
    assert b.due(t0 + 29.0, 32) == []  # a's claims hold
    # a dies without marking; after the claims expire b takes the rows over
    taken = b.due(t0 + 31.0, 32)
    assert [r.id for r in taken] == [r.id for r in claimed]
    # a comes back late: its retry mark no longer applies (b holds the claim)...
    a.mark(claimed[0].id, "pending", "UNAVAILABLE", t0 + 40.0)
    assert a.due(t0 + 32.0, 32) == []
    # ...a "done" mark applies whoever holds the claim; b's later marks leave it done
    a.mark(claimed[1].id, "done", "", t0)
    b.mark(claimed[1].id, "pending", "UNAVAILABLE", t0 + 40.0)
    b.mark(taken[0].id, "done", "", t0)
    assert b.pending() == 1
    # a released claim is due again at once
    assert b.release() == 1
    assert [r.dedupe_key for r in a.due(t0 + 33.0, 32)] == ["k002"]


def test_redelivery_after_a_crash_is_idempotent_and_lag_is_exported(database):
    _fill(database, 1)
    effects: set[str] = set()
    calls: list[str] = []

    async def receiver(row: OutboxRow) -> None:  # idempotent by the dedupe key
        calls.append(row.dedupe_key)
        effects.add(row.dedupe_key)

    crashed = SqlOutboxStore(database, claimer="crashed", claim_s=0.2)
    row = crashed.due(time.time(), 8)[0]
    asyncio.run(receiver(row))  # delivered, then the replica dies before marking it
    metrics = Metrics("lag")
    survivor = SqlOutboxStore(database, claimer="survivor", claim_s=0.2)
    assert survivor.oldest_pending_age(1e10) > 0
    dispatcher = OutboxDispatcher(survivor, None, {"t": receiver}, metrics)
    deadline = 200
    while survivor.pending() and deadline:
        asyncio.run(dispatcher.deliver_due())  # the crashed replica's claim expires after 0.2 s
        deadline -= 1
        threading.Event().wait(0.05)
    assert calls == ["k000", "k000"] and effects == {"k000"}
    assert (
        metrics.registry.get_sample_value("atlasflow_outbox_lag_seconds", {"service": "lag", "outbox": "outbox"}) == 0
    )
    assert survivor.oldest_pending_age(1e10) == 0.0


def test_a_stopping_dispatcher_gives_its_claims_back(database):
    _fill(database, 3)
    started = threading.Event()

    async def hangs(row: OutboxRow) -> None:
        started.set()
        await asyncio.sleep(3600)

    stopping = SqlOutboxStore(database, claimer="stopping")
    other = SqlOutboxStore(database, claimer="other")

    async def run_then_stop() -> None:
        task = asyncio.create_task(OutboxDispatcher(stopping, None, {"t": hangs}, Metrics("stop")).run())
        while not started.is_set():
            await asyncio.sleep(0.01)
        assert other.due(time.time(), 8) == []  # all three claimed by the stopping replica
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run_then_stop())
    assert [r.dedupe_key for r in other.due(time.time(), 8)] == ["k000", "k001", "k002"]
