"""Review rounds: a budgeted selection of the unreviewed cases, handed out by `lease_next` (no grpc).

`start_round(f)` closes the open round (if any) and selects the top ceil(f x U) of the U
unreviewed cases (ACCEPTED/REVISED excluded; PENDING and LEASED included) by priority. A case
remembers its latest round (`round_number`); round membership history is kept for the round
filter and the round statistics. Starting rounds is serialised (an advisory lock on
PostgreSQL, BEGIN IMMEDIATE on SQLite): replicas never both close the open round and number a
new one alike; a repeated `request_id` returns the round it started.
"""

from __future__ import annotations

import math
from decimal import Decimal

import sqlalchemy as sa

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.ranking.entries import DOMAIN, Round, check_id
from atlasflow.ranking.leases import check_principal
from atlasflow.ranking.schema import from_us
from atlasflow.ranking.store import WorklistStore, one, rows, run, scalar


class Rounds(WorklistStore):
    """The round operations of the worklist store."""

    def start_round(self, budget_fraction: float, creator: str, request_id: str = "") -> Round:
        """Close the open round and select the top ceil(budget_fraction x U) of the U
        unreviewed cases by priority (ties: case_id) into a new round.

        budget_fraction in (0, 1] (INVALID_BUDGET otherwise); the product is computed in
        decimal from the fraction's shortest repr, so 0.07 x 100 selects 7, not 8. A repeated
        `request_id` returns the round it started. Errors: NO_UNREVIEWED_CASES
        (FailedPrecondition), PRINCIPAL_REQUIRED.
        """
        check_principal(creator)
        f = float(budget_fraction)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise InvalidArgument(
                "INVALID_BUDGET",
                "budget_fraction must be in (0, 1]",
                domain=DOMAIN,
                metadata={"budget_fraction": str(budget_fraction)},
            )
        if request_id:
            check_id("request_id", request_id)
        with self._db.transaction() as conn:
            self._db.lock(conn, "ranking-rounds")
            now = self._now_us()
            if request_id:
                prev = scalar(conn, "SELECT round_number FROM rounds WHERE request_id = :q", {"q": request_id})
                if prev is not None:
                    return self._round(conn, int(prev))
            candidates = int(scalar(conn, "SELECT COUNT(*) FROM worklist WHERE outcome = 0"))
            if candidates == 0:
                raise FailedPrecondition("NO_UNREVIEWED_CASES", "every case has been reviewed", domain=DOMAIN)
            n = min(candidates, math.ceil(Decimal(repr(f)) * candidates))
            run(conn, "UPDATE rounds SET close_us = :now WHERE close_us IS NULL", {"now": now})
            number = int(scalar(conn, "SELECT COALESCE(MAX(round_number), 0) + 1 FROM rounds"))
            run(
                conn,
                "INSERT INTO rounds(round_number, budget_fraction, candidate_count, creator,"
                " request_id, create_us) VALUES (:r, :f, :n, :who, :q, :now)",
                {"r": number, "f": f, "n": candidates, "who": creator, "q": request_id or None, "now": now},
            )
            run(
                conn,
                "INSERT INTO round_cases(round_number, case_id, selection_rank, priority)"
                " SELECT :r, case_id, ROW_NUMBER() OVER (ORDER BY priority DESC, case_id),"
                " priority FROM worklist WHERE outcome = 0"
                " ORDER BY priority DESC, case_id LIMIT :k",
                {"r": number, "k": int(n)},
            )
            run(
                conn,
                "UPDATE worklist SET round_number = :r WHERE case_id IN"
                " (SELECT case_id FROM round_cases WHERE round_number = :r)",
                {"r": number},
            )
            return self._round(conn, number)

    def get_round(self, round_number: int = 0) -> Round:
        """Round `round_number` (0: the open round), or NotFound("ROUND_NOT_FOUND")."""
        with self._db.read() as conn:
            number = self._open_round_number(conn) if round_number == 0 else int(round_number)
            if number is None or number < 0:
                raise NotFound(
                    "ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(round_number)}
                )
            return self._round(conn, number)

    def list_rounds(self, page_size: int = 0, page_token: str = "") -> tuple[list[Round], str, int]:
        """A page of rounds, newest first: (rounds, next_page_token, total)."""
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        cursor = sq.decode_page_token(page_token, "rounds", domain=DOMAIN)
        before = None
        if cursor is not None:
            before = cursor.get("n")
            if not isinstance(before, int) or isinstance(before, bool):
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
        with self._db.read() as conn:
            total = int(scalar(conn, "SELECT COUNT(*) FROM rounds"))
            numbers = [
                int(r["round_number"])
                for r in rows(
                    conn,
                    "SELECT round_number FROM rounds WHERE round_number < :before ORDER BY round_number DESC LIMIT :k",
                    {"before": before if before is not None else 2**62, "k": size + 1},
                )
            ]
            more = len(numbers) > size
            rounds = [self._round(conn, n) for n in numbers[:size]]
        token = sq.encode_page_token("rounds", {"n": rounds[-1].round_number}) if more else ""
        return rounds, token, total

    def _round(self, conn: sa.Connection, number: int) -> Round:
        row = one(conn, "SELECT * FROM rounds WHERE round_number = :r", {"r": number})
        if row is None:
            raise NotFound("ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(number)})
        stats = one(
            conn,
            "SELECT COUNT(*) AS n,"
            " COALESCE(SUM(CASE WHEN w.outcome = 3 AND w.review_round = :r THEN 1 ELSE 0 END), 0) AS accepted,"
            " COALESCE(SUM(CASE WHEN w.outcome = 4 AND w.review_round = :r THEN 1 ELSE 0 END), 0) AS revised,"
            " COALESCE(SUM(CASE WHEN w.outcome = 0 THEN 1 ELSE 0 END), 0) AS unreviewed"
            " FROM round_cases rc JOIN worklist w ON w.case_id = rc.case_id"
            " WHERE rc.round_number = :r",
            {"r": number},
        )
        assert stats is not None  # an aggregate without GROUP BY returns one row
        return Round(
            round_number=number,
            budget_fraction=float(row["budget_fraction"]),
            candidate_count=int(row["candidate_count"]),
            case_count=int(stats["n"]),
            accepted_count=int(stats["accepted"]),
            revised_count=int(stats["revised"]),
            unreviewed_count=int(stats["unreviewed"]),
            creator=row["creator"],
            create_time=from_us(row["create_us"]),
            close_time=None if row["close_us"] is None else from_us(row["close_us"]),
        )
