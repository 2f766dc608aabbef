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
runs in one write transaction with a conditional UPDATE, so two reviewers (threads, processes,
replicas) never hold the same case: on SQLite the transaction is `BEGIN IMMEDIATE` (one writer
at a time); on PostgreSQL the case's row is read `FOR UPDATE` (a second lease of the same case
waits, then sees the first one's lease), and `lease_next` claims the next free case with
`FOR UPDATE SKIP LOCKED` (replicas handing out cases at once skip each other's candidate
instead of queueing on it). `lease_next` hands out the open round's cases
(`atlasflow.ranking.rounds`).
"""

from __future__ import annotations

import math

import sqlalchemy as sa

from atlasflow.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from atlasflow.ranking.entries import DOMAIN, REVIEWED, Status, WorklistEntry, check_id
from atlasflow.ranking.schema import from_us
from atlasflow.ranking.store import Row, WorklistStore, one, run

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
        with self._db.transaction() as conn:
            now = self._now_us()
            row = self._row(conn, case_id, lock=True)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            if self._active(row, now) and row["lease_holder"] != reviewer:
                raise FailedPrecondition(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            self._take(conn, case_id, reviewer, now, length)
            return self._entry_and_rank(conn, case_id, now)

    def lease_next(self, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Lease the highest-priority PENDING case of the open round to `reviewer`.

        If `reviewer` already holds an unexpired lease on an unreviewed case of the open round,
        that lease is renewed and returned. Errors: NO_OPEN_ROUND (FailedPrecondition),
        NO_CASE_AVAILABLE (NotFound), PRINCIPAL_REQUIRED, INVALID_LEASE_DURATION.
        """
        check_principal(reviewer)
        length = lease_seconds(seconds, self.default_lease_s)
        with self._db.transaction() as conn:
            now = self._now_us()
            rnd = self._open_round_number(conn)
            if rnd is None:
                raise FailedPrecondition("NO_OPEN_ROUND", "no review round is open; start one", domain=DOMAIN)
            held = one(
                conn,
                "SELECT case_id FROM worklist WHERE round_number = :r AND outcome = 0"
                " AND lease_holder = :who AND lease_expire_us > :now"
                " ORDER BY priority DESC, case_id LIMIT 1" + self._db.for_update(),
                {"r": rnd, "who": reviewer, "now": now},
            )
            if held is not None:
                case_id = held["case_id"]
            else:
                free = one(
                    conn,
                    "SELECT case_id FROM worklist WHERE round_number = :r AND outcome = 0"
                    " AND (lease_holder = '' OR lease_expire_us <= :now)"
                    " ORDER BY priority DESC, case_id LIMIT 1" + self._db.for_update(skip_locked=True),
                    {"r": rnd, "now": now},
                )
                if free is None:
                    raise NotFound(
                        "NO_CASE_AVAILABLE",
                        "no pending case left in the open round",
                        domain=DOMAIN,
                        metadata={"round_number": str(rnd)},
                    )
                case_id = free["case_id"]
            self._take(conn, case_id, reviewer, now, length)
            return self._entry_and_rank(conn, case_id, now)

    def renew(self, case_id: str, reviewer: str, seconds: float | None = None) -> tuple[WorklistEntry, int]:
        """Extend `reviewer`'s unexpired lease to now + `seconds` (None/0: the default).

        Errors: LEASE_HELD_BY_OTHER (PermissionDenied); LEASE_EXPIRED, LEASE_REQUIRED,
        CASE_ALREADY_REVIEWED (FailedPrecondition); CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        length = lease_seconds(seconds, self.default_lease_s)
        with self._db.transaction() as conn:
            now = self._now_us()
            row = self._row(conn, case_id, lock=True)
            if row["outcome"]:
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            self._take(conn, case_id, reviewer, now, length)
            return self._entry_and_rank(conn, case_id, now)

    def release(self, case_id: str, reviewer: str) -> tuple[WorklistEntry, int]:
        """Give `reviewer`'s lease back (the case becomes PENDING).

        Succeeds without change when nobody holds the case (or the lease expired, or the case
        was reviewed meanwhile). Errors: LEASE_HELD_BY_OTHER (PermissionDenied) when another
        reviewer holds an unexpired lease; CASE_NOT_FOUND; PRINCIPAL_REQUIRED.
        """
        check_principal(reviewer)
        with self._db.transaction() as conn:
            now = self._now_us()
            row = self._row(conn, case_id, lock=True)
            if row["lease_holder"] and row["lease_holder"] != reviewer and self._active(row, now):
                raise PermissionDenied(
                    "LEASE_HELD_BY_OTHER",
                    "another reviewer holds this case",
                    domain=DOMAIN,
                    metadata=self._lease_meta(row),
                )
            run(
                conn,
                "UPDATE worklist SET lease_holder = '', lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = :c AND lease_holder = :who",
                {"c": case_id, "who": reviewer},
            )
            return self._entry_and_rank(conn, case_id, now)

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
        with self._db.transaction() as conn:
            now = self._now_us()
            row = self._row(conn, case_id, lock=True)
            if row["outcome"]:
                if (row["outcome"], row["reviewer"], row["label_version_id"]) == (
                    int(outcome),
                    reviewer,
                    label_version_id,
                ):
                    return self._entry_and_rank(conn, case_id, now)
                raise self._already_reviewed(case_id)
            self._require_holder(row, reviewer, now)
            changed = run(
                conn,
                "UPDATE worklist SET outcome = :o, reviewer = :who, label_version_id = :v,"
                " review_us = :now, review_round = round_number, lease_holder = '',"
                " lease_start_us = 0, lease_expire_us = 0"
                " WHERE case_id = :c AND outcome = 0 AND lease_holder = :who AND lease_expire_us > :now",
                {"o": int(outcome), "who": reviewer, "v": label_version_id, "now": now, "c": case_id},
            )
            if changed != 1:  # cannot happen: the row is locked (or the database); never complete twice
                raise FailedPrecondition("LEASE_REQUIRED", "the lease changed meanwhile", domain=DOMAIN)
            return self._entry_and_rank(conn, case_id, now)

    @staticmethod
    def _active(row: Row, now: int) -> bool:
        return bool(row["lease_holder"]) and int(row["lease_expire_us"]) > now

    @staticmethod
    def _lease_meta(row: Row) -> dict[str, str]:
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

    def _require_holder(self, row: Row, reviewer: str, now: int) -> None:
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

    def _take(self, conn: sa.Connection, case_id: str, reviewer: str, now: int, seconds: float) -> None:
        expire = now + int(round(seconds * 1_000_000))
        changed = run(
            conn,
            "UPDATE worklist SET lease_holder = :who, lease_start_us = :now, lease_expire_us = :exp"
            " WHERE case_id = :c AND outcome = 0"
            " AND (lease_holder = '' OR lease_holder = :who OR lease_expire_us <= :now)",
            {"who": reviewer, "now": now, "exp": expire, "c": case_id},
        )
        if changed != 1:  # cannot happen: the row is locked (or the database); never two holders
            raise FailedPrecondition(
                "LEASE_HELD_BY_OTHER",
                "the case was leased meanwhile",
                domain=DOMAIN,
                metadata={"case_id": case_id[:80]},
            )
