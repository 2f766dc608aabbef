"""Review rounds: a budgeted selection of the unreviewed cases, handed out by `lease_next` (no grpc).

`start_round(f)` closes the open round (if any) and selects the top ceil(f x U) of the U
unreviewed cases (ACCEPTED/REVISED excluded; PENDING and LEASED included) by priority. A case
remembers its latest round (`round_number`); round membership history is kept for the round
filter and the round statistics.
"""

from __future__ import annotations

import math
from decimal import Decimal

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound
from atlasflow.ranking.entries import DOMAIN, Round, check_id
from atlasflow.ranking.leases import check_principal
from atlasflow.ranking.schema import from_us
from atlasflow.ranking.store import WorklistStore


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
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            if request_id:
                prev = self._conn.execute(
                    "SELECT round_number FROM rounds WHERE request_id = ?", (request_id,)
                ).fetchone()
                if prev is not None:
                    return self._round(int(prev[0]))
            candidates = int(self._conn.execute("SELECT COUNT(*) FROM worklist WHERE outcome = 0").fetchone()[0])
            if candidates == 0:
                raise FailedPrecondition("NO_UNREVIEWED_CASES", "every case has been reviewed", domain=DOMAIN)
            n = min(candidates, math.ceil(Decimal(repr(f)) * candidates))
            self._conn.execute("UPDATE rounds SET close_us = ? WHERE close_us IS NULL", (now,))
            number = int(self._conn.execute("SELECT COALESCE(MAX(round_number), 0) + 1 FROM rounds").fetchone()[0])
            self._conn.execute(
                "INSERT INTO rounds(round_number, budget_fraction, candidate_count, creator,"
                " request_id, create_us) VALUES (?, ?, ?, ?, ?, ?)",
                (number, f, candidates, creator, request_id or None, now),
            )
            self._conn.execute(
                "INSERT INTO round_cases(round_number, case_id, selection_rank, priority)"
                " SELECT ?, case_id, ROW_NUMBER() OVER (ORDER BY priority DESC, case_id),"
                " priority FROM worklist WHERE outcome = 0"
                " ORDER BY priority DESC, case_id LIMIT ?",
                (number, n),
            )
            self._conn.execute(
                "UPDATE worklist SET round_number = ? WHERE case_id IN"
                " (SELECT case_id FROM round_cases WHERE round_number = ?)",
                (number, number),
            )
            return self._round(number)

    def get_round(self, round_number: int = 0) -> Round:
        """Round `round_number` (0: the open round), or NotFound("ROUND_NOT_FOUND")."""
        with self._lock:
            number = self._open_round_number() if round_number == 0 else int(round_number)
            if number is None or number < 0:
                raise NotFound(
                    "ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(round_number)}
                )
            return self._round(number)

    def list_rounds(self, page_size: int = 0, page_token: str = "") -> tuple[list[Round], str, int]:
        """A page of rounds, newest first: (rounds, next_page_token, total)."""
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        cursor = sq.decode_page_token(page_token, "rounds", domain=DOMAIN)
        before = None
        if cursor is not None:
            before = cursor.get("n")
            if not isinstance(before, int) or isinstance(before, bool):
                raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid", domain=DOMAIN)
        with self._lock:
            total = int(self._conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
            numbers = [
                int(r[0])
                for r in self._conn.execute(
                    "SELECT round_number FROM rounds WHERE round_number < ? ORDER BY round_number DESC LIMIT ?",
                    (before if before is not None else 2**62, size + 1),
                ).fetchall()
            ]
            more = len(numbers) > size
            rounds = [self._round(n) for n in numbers[:size]]
        token = sq.encode_page_token("rounds", {"n": rounds[-1].round_number}) if more else ""
        return rounds, token, total

    def _round(self, number: int) -> Round:
        row = self._conn.execute("SELECT * FROM rounds WHERE round_number = ?", (number,)).fetchone()
        if row is None:
            raise NotFound("ROUND_NOT_FOUND", "no such round", domain=DOMAIN, metadata={"round_number": str(number)})
        stats = self._conn.execute(
            "SELECT COUNT(*) AS n,"
            " COALESCE(SUM(w.outcome = 3 AND w.review_round = :r), 0) AS accepted,"
            " COALESCE(SUM(w.outcome = 4 AND w.review_round = :r), 0) AS revised,"
            " COALESCE(SUM(w.outcome = 0), 0) AS unreviewed"
            " FROM round_cases rc JOIN worklist w ON w.case_id = rc.case_id"
            " WHERE rc.round_number = :r",
            {"r": number},
        ).fetchone()
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
