"""The ingest service's scrape-time gauges (`atlasflow.common.metrics.Metrics.add_source`; no
grpc), read from the shared database so every replica reports the same values: series waiting
for assembly and the assemblers' claims on them. The outbox (pending rows, lag) is read by the
dispatcher's own source (`atlasflow.common.outbox.OutboxDispatcher`). docs/runbooks.md says what
an SRE does with them."""

from __future__ import annotations

import sqlalchemy as sa

from atlasflow.common.metrics import Reading, lease_readings
from atlasflow.ingest.store import IngestStore, db_now_sql

#: queue name of the assembly claims (``atlasflow_lease_*{queue="series_assembly"}``)
ASSEMBLY_QUEUE = "series_assembly"


def series_readings(store: IngestStore) -> list[Reading]:
    """``atlasflow_queue_depth`` ``series_receiving`` (versions waiting for assembly) and
    ``series_open`` (not handed to segmentation yet: receiving or assembled), and the assembly
    claims: the oldest live claim's age since its last heartbeat, and claims past their expiry."""
    now = db_now_sql(store.db)
    with store.db.read() as conn:
        r = conn.execute(store_sql(now), {"lease": float(store.claim_s)}).mappings().one()
    receiving, assembled = int(r["receiving"] or 0), int(r["assembled"] or 0)
    oldest = float(r["oldest_age"] or 0.0)
    return [
        Reading("atlasflow_queue_depth", "series_receiving", float(receiving)),
        Reading("atlasflow_queue_depth", "series_open", float(receiving + assembled)),
        *lease_readings(ASSEMBLY_QUEUE, oldest, int(r["expired"] or 0)),
    ]


def store_sql(now: str) -> sa.TextClause:
    """The one query of `series_readings` (`now`: the database's clock in SQL)."""
    claimed = "state = 'RECEIVING' AND claim_holder != ''"
    return sa.text(
        "SELECT SUM(CASE WHEN state = 'RECEIVING' THEN 1 ELSE 0 END) AS receiving,"
        " SUM(CASE WHEN state = 'ASSEMBLED' THEN 1 ELSE 0 END) AS assembled,"
        f" MAX(CASE WHEN {claimed} AND claim_expire_at >= {now} THEN {now} - (claim_expire_at - :lease) END)"
        " AS oldest_age,"
        f" SUM(CASE WHEN {claimed} AND claim_expire_at < {now} THEN 1 ELSE 0 END) AS expired"
        " FROM series_versions WHERE state IN ('RECEIVING', 'ASSEMBLED')"
    )
