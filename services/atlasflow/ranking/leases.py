"""Leases and reviews: who reviews which case, for how long, and how the review ended (no grpc).

Review status (`Status`, numbers = proto `WorklistStatus`)
---------------------------------------------------------
    PENDING  -> LEASED     lease / lease_next
    LEASED   -> LEASED     renew, or lease by the holder
    LEASED   -> PENDING    release by the holder, or the lease's expiry passes
    LEASED   -> ACCEPTED   complete(ACCEPTED) by the holder of an unexpired lease
    LEASED   -> REVISED    complete(REVISED) by the holder of an unexpired lease
ACCEPTED / REVISED are terminal. LEASED vs PENDING is computed at read time from the stored
lease expiry and the injectable clock, so an expired lease needs no sweeper. Every lease change
runs in one `BEGIN IMMEDIATE` transaction with a conditional UPDATE, so two reviewers (threads,
processes) never hold the same case. `lease_next` hands out the open round's cases
(`atlasflow.ranking.rounds`).
"""

from __future__ import annotations

import math
import sqlite3

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from atlasflow.ranking.entries import DOMAIN, REVIEWED, Status, WorklistEntry, check_id
from atlasflow.ranking.schema import from_us
from atlasflow.ranking.store import WorklistStore

DEFAULT_LEASE_S = 15 * 60.0
MAX_LEASE_S = 8 * 3600.0


def check_principal(principal: str) -> str:
    """The caller's principal, or Unauthenticated("PRINCIPAL_REQUIRED") when missing."""
    if not principal:
        raise Unauthenticated("PRINCIPAL_REQUIRED", "the caller's identity (a bearer token) is required", domain=DOMAIN)
    if len(principal) > 256 or not principal.isprintable():
        raise InvalidArgument("INVALID_PRINCIPAL", "principal must be printable, <= 256 chars", domain=DOMAIN)
    return principal


def lease_seconds(seconds: float | None, default: float) -> float:
    if seconds is None or seconds == 0:
        return default
    if not (math.isfinite(seconds) and 1.0 <= seconds <= MAX_LEASE_S):
        raise InvalidArgument(
            "INVALID_LEASE_DURATION",
            f"lease duration must be between 1 s and {int(MAX_LEASE_S)} s",
            domain=DOMAIN,
            metadata={"seconds": str(seconds)},
        )
    return float(seconds)


class Leases(WorklistStore):
    """The lease and review operations of the worklist store.

    default_lease_s: lease length when a call gives none (seconds, 1 s .. 8 h)."""

    default_lease_s: float = DEFAULT_LEASE_S

    def lease(self, case_id: str, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Lease `case_id` to `reviewer` for `seconds` (None/0: the default).

        The holder leasing again renews. Errors: CASE_NOT_FOUND; CASE_ALREADY_REVIEWED and
        LEASE_HELD_BY_OTHER (FailedPrecondition); PRINCIPAL_REQUIRED; INVALID_LEASE_DURATION.
        """
        check_principal(reviewer)
        length = lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            if self._active(row, now) and row["lease_holder"] != reviewer:
                raise FailedPrecondition(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def lease_next(self, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Lease the highest-priority PENDING case of the open round to `reviewer`.

        If `reviewer` already holds an unexpired lease on an unreviewed case of the open round,
        that lease is renewed and returned. Errors: NO_OPEN_ROUND (FailedPrecondition),
        NO_CASE_AVAILABLE (NotFound), PRINCIPAL_REQUIRED, INVALID_LEASE_DURATION.
        """
        check_principal(reviewer)
        length = lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            rnd = self._open_round_number()
            if rnd is None:
                raise FailedPrecondition("NO_OPEN_ROUND", "no review round is open; start one", domain=DOMAIN)
            held = self._conn.execute(
                "SELECT case_id FROM worklist WHERE round_number = ? AND outcome = 0"
                " AND lease_holder = ? AND lease_expire_us > ?"
                " ORDER BY priority DESC, case_id LIMIT 1",
                (rnd, reviewer, now),
            ).fetchone()
            if held is not None:
                case_id = held["case_id"]
            else:
                free = self._conn.execute(
                    "SELECT case_id FROM worklist WHERE round_number = ? AND outcome = 0"
                    " AND (lease_holder = '' OR lease_expire_us <= ?)"
                    " ORDER BY priority DESC, case_id LIMIT 1",
                    (rnd, now),
                ).fetchone()
                if free is None:
                    raise NotFound(
                        "NO_CASE_AVAILABLE",
                        "no pending case left in the open round",
                        domain=DOMAIN,
                        metadata={"round_number": str(rnd)},
                    )
                case_id = free["case_id"]
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def renew(self, case_id: str, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Extend `reviewer`'s unexpired lease to now + `seconds` (None/0: the default).

        Errors: LEASE_HELD_BY_OTHER (PermissionDenied); LEASE_EXPIRED, LEASE_REQUIRED,
        CASE_ALREADY_REVIEWED (FailedPrecondition); CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        length = lease_seconds(seconds, self.default_lease_s)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            self._take(case_id, reviewer, now, length)
            return self._entry_and_rank(case_id, now)

    def release(self, case_id: str, reviewer: str) -> tuple[WorklistEntry, int]:
        """Give `reviewer`'s lease back (the case becomes PENDING).

        Succeeds without change when nobody holds the case (or the lease expired, or the case
        was reviewed meanwhile). Errors: LEASE_HELD_BY_OTHER (PermissionDenied) when another
        reviewer holds an unexpired lease; CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["lease_holder"] and row["lease_holder"] != reviewer and self._active(row, now):
                raise PermissionDenied(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            self._conn.execute(
                "UPDATE worklist SET lease_holder = '', lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = ? AND lease_holder = ?",
                (case_id, reviewer),
            )
            return self._entry_and_rank(case_id, now)

    def complete(
        self, case_id: str, reviewer: str, outcome: Status, label_version_id: str = ""
    ) -> tuple[WorklistEntry, int]:
        """Complete the review of `case_id` as ACCEPTED or REVISED; only by the holder of an
        unexpired lease. The lease ends. A repeat by the same reviewer with the same outcome
        and label version returns the case unchanged.

        Errors: INVALID_OUTCOME; LEASE_HELD_BY_OTHER (PermissionDenied); LEASE_EXPIRED,
        LEASE_REQUIRED, CASE_ALREADY_REVIEWED (FailedPrecondition); CASE_NOT_FOUND;
        PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        try:
            outcome = Status(int(outcome))
        except ValueError:
            outcome = Status.PENDING
        if outcome not in REVIEWED:
            raise InvalidArgument("INVALID_OUTCOME", "outcome must be ACCEPTED or REVISED", domain=DOMAIN)
        if label_version_id:
            check_id("label_version_id", label_version_id)
        with self._lock, sq.transaction(self._conn):
            now = self._now_us()
            row = self._row(case_id)
            if row["outcome"]:
                if (row["outcome"], row["reviewer"], row["label_version_id"]) == (
                    int(outcome),
                    reviewer,
                    label_version_id,
                ):
                    return self._entry_and_rank(case_id, now)
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            cur = self._conn.execute(
                "UPDATE worklist SET outcome = ?, reviewer = ?, label_version_id = ?,"
                " review_us = ?, review_round = round_number, lease_holder = '',"
                " lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = ? AND outcome = 0 AND lease_holder = ? AND lease_expire_us > ?",
                (int(outcome), reviewer, label_version_id, now, case_id, reviewer, now),
            )
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; never complete twice
                raise FailedPrecondition("LEASE_REQUIRED", "the lease changed meanwhile", domain=DOMAIN)
            return self._entry_and_rank(case_id, now)

    @staticmethod
    def _active(row: sqlite3.Row, now: int) -> bool:
        return bool(row["lease_holder"]) and int(row["lease_expire_us"]) > now

    @staticmethod
    def _lease_meta(row: sqlite3.Row) -> dict[str, str]:
        return {
            "case_id": row["case_id"][:80],
            "reviewer": row["lease_holder"],
            "expire_time": from_us(row["lease_expire_us"]).isoformat(),
        }

    @staticmethod
    def _already_reviewed(case_id: str) -> FailedPrecondition:
        return FailedPrecondition(
            "CASE_ALREADY_REVIEWED",
            "the case has already been reviewed",
            domain=DOMAIN,
            metadata={"case_id": case_id[:80]},
        )

    def _require_holder(self, row: sqlite3.Row, reviewer: str, now: int) -> None:
        holder = row["lease_holder"]
        if holder == reviewer and self._active(row, now):
            return
        if holder and holder != reviewer and self._active(row, now):
            raise PermissionDenied(
                "LEASE_HELD_BY_OTHER", "another reviewer holds this case", domain=DOMAIN, metadata=self._lease_meta(row)
            )
        if holder == reviewer:
            raise FailedPrecondition(
                "LEASE_EXPIRED",
                "the lease has expired; lease the case again",
                domain=DOMAIN,
                metadata=self._lease_meta(row),
            )
        raise FailedPrecondition(
            "LEASE_REQUIRED",
            "lease the case before this call",
            domain=DOMAIN,
            metadata={"case_id": row["case_id"][:80]},
        )

    def _take(self, case_id: str, reviewer: str, now: int, seconds: float) -> None:
        expire = now + int(round(seconds * 1_000_000))
        cur = self._conn.execute(
            "UPDATE worklist SET lease_holder = ?, lease_start_us = ?, lease_expire_us = ?"
            " WHERE case_id = ? AND outcome = 0"
            " AND (lease_holder = '' OR lease_holder = ? OR lease_expire_us <= ?)",
            (reviewer, now, expire, case_id, reviewer, now),
        )
        if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; never two holders
            raise FailedPrecondition(
                "LEASE_HELD_BY_OTHER",
                "the case was leased meanwhile",
                domain=DOMAIN,
                metadata={"case_id": case_id[:80]},
            )
