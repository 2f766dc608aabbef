"""The ranked worklist of cases for radiologists, with leases and review rounds, on SQLite or
PostgreSQL (atlasflow.common.db; no grpc).

`SqlWorklist` is the store the ranking service serves (`SqliteWorklist`: its former name).
Its parts, one job each:

- entries.py: the value types (`WorklistEntry`, `OrganAttention`, `Round`, `Status`, ...);
- priority.py: checked attention summaries and the case priority they make;
- schema.py: the row <-> value encoding (migrations: the package `atlasflow.ranking.migrations`);
- store.py: the database, the clock, and the shared reads;
- this module: attention submissions and the worklist's lists and counts;
- leases.py: leases and reviews (review status); rounds.py: review rounds;
- label_versions.py: label versions from the labels service and the learned prior's geometry.

Rank: 1-based position in the WHOLE worklist by (priority descending, case_id ascending) at
read time, whatever filter a list uses.

Idempotency: one entry per case. Submissions are keyed by (case_id, source_job_id): a repeat
of a key already seen changes nothing and returns the case's current entry (the first write of
a key wins, also after a restart); a submission with a NEW job id for the case replaces the
case's attention (the newer segmentation supersedes the older one, in order of arrival). A new
submission never touches the case's review status, lease or rounds: a reviewed case stays done.

Organ filter
------------
A case matches organ o when o contributes a positive amount to its priority: attention_ml > 0
(or score > 0 for scored cases) and o is neither labelled by the source nor decided by a human.
Kept as a bit mask.

Paging: keyset cursor on (priority, case_id) of the last item returned (tokens bound to the
filter), so moving through the pages never duplicates or skips an entry whose priority does not
change meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from atlasflow.common import sqlite as sq
from atlasflow.common.db import PoolSettings
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.metrics import Reading, lease_readings
from atlasflow.common.organs import ORGANS
from atlasflow.ranking.entries import DOMAIN, OrganAttention, Status, WorklistEntry, WorklistFilter, check_id
from atlasflow.ranking.label_versions import LabelVersions
from atlasflow.ranking.leases import DEFAULT_LEASE_S, Leases, lease_seconds
from atlasflow.ranking.priority import attention_mask, case_priority, invalid_attention, validate_organs
from atlasflow.ranking.rounds import Rounds
from atlasflow.ranking.schema import STATUS_SQL, entry_of, organ_json
from atlasflow.ranking.store import one, rows, run, scalar


class SqlWorklist(Leases, Rounds, LabelVersions):
    """The worklist store on SQLite (the embedded default: a file path) or PostgreSQL (a
    ``postgresql://`` URL; several replicas may share it).

    clock: returns timezone-aware UTC now (injectable for tests); default_lease_s: lease
    length when a call gives none (seconds, 1 s .. 8 h); pool: PostgreSQL pool settings.
    """

    def __init__(
        self,
        database: str | Path,
        *,
        clock: Callable[[], datetime] = sq.utc_now,
        default_lease_s: float = DEFAULT_LEASE_S,
        pool: PoolSettings | None = None,
    ) -> None:
        self.default_lease_s = lease_seconds(default_lease_s, DEFAULT_LEASE_S)
        super().__init__(database, clock=clock, pool=pool)

    def submit(
        self,
        case_id: str,
        series_id: str,
        source_job_id: str,
        organs: Sequence[OrganAttention],
        labelled_organs: Sequence[int] = (),
        heatmap_digest: str = "",
        heatmap_size: int = 0,
        model_generation: int | None = None,
    ) -> tuple[WorklistEntry, int]:
        """Record the attention summary of `case_id` from segmentation job `source_job_id`.

        Returns (the case's entry after re-ranking, its 1-based rank). Idempotent by
        (case_id, source_job_id); see the module docstring for replacement. Review status,
        lease and rounds of the case are kept. model_generation: the learned model generation
        `organs` were scored with (`atlasflow.ranking.learned`); raises `ModelChanged` when
        another one is in force (score again, retry); None: unscored (generation 0, rescored
        by the next refit once a model is fitted).
        """
        check_id("case_id", case_id)
        check_id("series_id", series_id)
        check_id("source_job_id", source_job_id)
        ordered = validate_organs(organs)
        labelled = tuple(sorted({int(o) for o in labelled_organs}))
        if any(o not in ORGANS for o in labelled):
            raise invalid_attention("labelled_organs must be AbdomenAtlas organ ids")
        if heatmap_size < 0:
            raise invalid_attention("heatmap size must be >= 0")
        now = self._clock().isoformat()
        organs_json = json.dumps([organ_json(o) for o in ordered])
        with self._db.transaction() as conn:
            self._db.lock(conn, f"ranking-case:{case_id}")  # vs record_label_version of the case
            self._check_generation(conn, model_generation)  # vs a newer model's publication
            known = one(
                conn, "SELECT label_version_id, human_organs FROM case_labels WHERE case_id = :c", {"c": case_id}
            )
            version_id = known["label_version_id"] if known else ""
            human = known["human_organs"] if known else "[]"
            excluded = set(labelled) | set(json.loads(human))
            priority = case_priority(ordered, excluded)
            mask = attention_mask(ordered, excluded)
            first = run(
                conn,
                "INSERT INTO worklist_submissions(case_id, source_job_id, submit_time) VALUES (:c, :j, :t)"
                " ON CONFLICT (case_id, source_job_id) DO NOTHING",
                {"c": case_id, "j": source_job_id, "t": now},
            )
            if first:
                run(
                    conn,
                    "INSERT INTO worklist(case_id, series_id, source_job_id, priority, organs,"
                    " labelled_organs, heatmap_digest, heatmap_size, update_time, attention_mask,"
                    " latest_label_version_id, human_organs, scored_generation)"
                    " VALUES (:c, :s, :j, :p, :organs, :labelled, :digest, :size, :t, :mask, :v, :human, :g)"
                    " ON CONFLICT(case_id) DO UPDATE SET series_id = excluded.series_id,"
                    " source_job_id = excluded.source_job_id, priority = excluded.priority,"
                    " organs = excluded.organs, labelled_organs = excluded.labelled_organs,"
                    " heatmap_digest = excluded.heatmap_digest,"
                    " heatmap_size = excluded.heatmap_size, update_time = excluded.update_time,"
                    " attention_mask = excluded.attention_mask,"
                    " latest_label_version_id = excluded.latest_label_version_id,"
                    " human_organs = excluded.human_organs, scored_generation = excluded.scored_generation",
                    {
                        "c": case_id,
                        "s": series_id,
                        "j": source_job_id,
                        "p": priority,
                        "organs": organs_json,
                        "labelled": json.dumps(labelled),
                        "digest": heatmap_digest,
                        "size": int(heatmap_size),
                        "t": now,
                        "mask": mask,
                        "v": version_id,
                        "human": human,
                        "g": model_generation or 0,
                    },
                )
            return self._entry_and_rank(conn, case_id, self._now_us())

    def get(self, case_id: str) -> tuple[WorklistEntry, int]:
        """(entry, 1-based rank) of `case_id`, or NotFound("CASE_NOT_FOUND")."""
        with self._db.read() as conn:
            return self._entry_and_rank(conn, case_id, self._now_us())

    def list(
        self, page_size: int = 0, page_token: str = "", where: WorklistFilter | None = None
    ) -> tuple[list[tuple[WorklistEntry, int]], str, int]:
        """A page of the worklist, highest priority first, optionally filtered.

        page_size: 0 -> 50, max 1000, negative -> INVALID_PAGE_SIZE. page_token: from a
        previous call with the same filter, else INVALID_PAGE_TOKEN. Returns
        ([(entry, rank), ...], next_page_token ("" at the end), number of matching cases).
        """
        flt = (where or WorklistFilter()).validated()
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        scope = flt.scope()
        cursor = sq.decode_page_token(page_token, "worklist", scope=scope, domain=DOMAIN)
        clauses: list[str] = []
        with self._db.read() as conn:
            now = self._now_us()
            params: dict[str, Any] = {"now": now}
            if flt.organs:
                clauses.append("(attention_mask & :omask) != 0")
                params["omask"] = sum(1 << o for o in flt.organs)
            if flt.round_number:
                clauses.append(
                    "EXISTS (SELECT 1 FROM round_cases rc WHERE rc.round_number ="
                    " :round AND rc.case_id = worklist.case_id)"
                )
                params["round"] = flt.round_number
            if flt.statuses:
                clauses.append(f"{STATUS_SQL} IN ({','.join(str(int(s)) for s in flt.statuses)})")
            filtered = bool(clauses)
            total = int(
                scalar(
                    conn,
                    "SELECT COUNT(*) FROM worklist" + (" WHERE " + " AND ".join(clauses) if clauses else ""),
                    params,
                )
            )
            if cursor is not None:
                p, c = cursor.get("p"), cursor.get("c")
                if not isinstance(p, (int, float)) or isinstance(p, bool) or not isinstance(c, str):
                    raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
                clauses.append("(priority < :p OR (priority = :p AND case_id > :c))")
                params.update(p=float(p), c=c)
            params["limit"] = size + 1
            page = rows(
                conn,
                "SELECT * FROM worklist"
                + (" WHERE " + " AND ".join(clauses) if clauses else "")
                + " ORDER BY priority DESC, case_id LIMIT :limit",
                params,
            )
            more = len(page) > size
            page = page[:size]
            if filtered:
                ranks = [self._rank(conn, r["priority"], r["case_id"]) for r in page]
            else:
                first = self._rank(conn, page[0]["priority"], page[0]["case_id"]) if page else 0
                ranks = [first + i for i in range(len(page))]
        items = [(entry_of(r, now), rank) for r, rank in zip(page, ranks)]
        token = (
            sq.encode_page_token("worklist", {"p": page[-1]["priority"], "c": page[-1]["case_id"]}, scope=scope)
            if more
            else ""
        )
        return items, token, total

    def count_by_status(self) -> dict[Status, int]:
        """Number of cases per status at read time (every status present, possibly 0)."""
        with self._db.read() as conn:
            found = rows(
                conn, f"SELECT {STATUS_SQL} AS s, COUNT(*) AS n FROM worklist GROUP BY 1", {"now": self._now_us()}
            )
        counts = {s: 0 for s in Status}
        counts.update({Status(int(r["s"])): int(r["n"]) for r in found})
        return counts

    def lease_gauges(self) -> tuple[float, int]:
        """(age in seconds of the oldest active review lease, 0 when none; leases past their
        expiry never released nor completed) at read time: the ``atlasflow_lease_*`` gauges."""
        now = self._now_us()
        with self._db.read() as conn:
            r = one(
                conn,
                "SELECT MIN(CASE WHEN lease_expire_us > :now THEN lease_start_us END) AS oldest,"
                " SUM(CASE WHEN lease_expire_us <= :now THEN 1 ELSE 0 END) AS expired"
                " FROM worklist WHERE outcome = 0 AND lease_holder != ''",
                {"now": now},
            )
        oldest = r["oldest"] if r is not None else None
        expired = int(r["expired"] or 0) if r is not None else 0
        return (max(0.0, (now - int(oldest)) / 1e6) if oldest is not None else 0.0), expired

    def purge_study(self, case_id: str) -> tuple[dict[str, int], Sequence[str]]:
        """Delete every row of `case_id` (the study was deleted, ingest's DeleteStudy): its
        worklist entry (lease and review included), submissions, round memberships and recorded
        label version, in one transaction; rounds keep their counts. Returns (rows deleted per
        table, the heatmap digests the deleted entry referenced). Idempotent."""
        with self._db.transaction() as conn:
            self._db.lock(conn, f"ranking-case:{case_id}")
            digests = [
                r["heatmap_digest"]
                for r in rows(conn, "SELECT heatmap_digest FROM worklist WHERE case_id = :c", {"c": case_id})
                if r["heatmap_digest"]
            ]
            counts = {
                table: run(conn, f"DELETE FROM {table} WHERE case_id = :c", {"c": case_id})
                for table in ("round_cases", "worklist_submissions", "case_labels", "worklist")
            }
        return counts, sorted(set(digests))

    def referenced(self, digests: Sequence[str]) -> Sequence[str]:
        """Those of `digests` that a worklist entry references (its heatmap)."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        query = sa.text("SELECT DISTINCT heatmap_digest FROM worklist WHERE heatmap_digest IN :ds").bindparams(
            sa.bindparam("ds", expanding=True)
        )
        with self._db.read() as conn:
            for i in range(0, len(wanted), 500):
                found.update(conn.execute(query, {"ds": wanted[i : i + 500]}).scalars())
        return sorted(found)


SqliteWorklist = SqlWorklist  # the former name (the store was SQLite-only)


def worklist_readings(worklist: SqlWorklist) -> list[Reading]:
    """The ranking service's scrape-time gauges (`atlasflow.common.metrics.Metrics.add_source`):
    queue depth ``worklist`` (every case), ``worklist_pending`` (not leased, not reviewed) and
    ``cases_open`` (not reviewed yet), and the review leases (queue ``review``)."""
    counts = worklist.count_by_status()
    oldest, expired = worklist.lease_gauges()
    return [
        Reading("atlasflow_queue_depth", "worklist", float(sum(counts.values()))),
        Reading("atlasflow_queue_depth", "worklist_pending", float(counts[Status.PENDING])),
        Reading("atlasflow_queue_depth", "cases_open", float(counts[Status.PENDING] + counts[Status.LEASED])),
        *lease_readings("review", oldest, expired),
    ]
