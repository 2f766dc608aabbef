"""The ranked worklist of cases for radiologists, on SQLite (no grpc).

Case priority (DESIGN.md, AbdomenAtlas `create_attention.py`): the total attention volume, in
ml, over the organs the case's source did NOT label (partial-label template); per case, organs
are ordered by heatmap mass (ml) descending. Volumes are in ml, never voxel counts, so cases of
different spacing compare fairly.

Rank: 1-based position by (priority descending, case_id ascending) at read time.

Idempotency: one entry per case. Submissions are keyed by (case_id, source_job_id): a repeat
of a key already seen changes nothing and returns the case's current entry (the first write of
a key wins, also after a restart); a submission with a NEW job id for the case replaces the
case's entry (the newer segmentation supersedes the older one, in order of arrival).

Paging: keyset cursor on (priority, case_id) of the last item returned, so moving through the
pages never duplicates or skips an entry whose priority does not change meanwhile.

Threading: one `SqliteWorklist` holds one connection and serialises its calls with a lock; open
one instance per thread/process for parallel writers (see atlasflow.common.sqlite).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from atlasflow.common import sqlite as sq
from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.common.organs import ORGANS

DOMAIN = "atlasflow.ranking"


@dataclass(frozen=True)
class OrganAttention:
    """Attention summary of one organ in one case.

    attention_ml: volume of the attention region (union of inconsistency, uncertainty and
    overlap masks), ml. heatmap_ml: heatmap mass over the region (sum of heatmap values in
    [0, 1] times the voxel volume), ml. volume_ml: ensemble mask volume, ml.
    """

    organ: int
    attention_ml: float
    heatmap_ml: float
    volume_ml: float


@dataclass(frozen=True)
class WorklistEntry:
    """One case on the worklist; `organs` ordered by heatmap_ml descending (ties: organ id)."""

    case_id: str
    series_id: str
    source_job_id: str
    priority: float
    organs: tuple[OrganAttention, ...]
    heatmap_digest: str
    heatmap_size: int
    update_time: datetime
    labelled_organs: tuple[int, ...] = ()


def _invalid(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("INVALID_ATTENTION", message, domain=DOMAIN, metadata=metadata)


def validate_organs(organs: Iterable[OrganAttention]) -> tuple[OrganAttention, ...]:
    """Check organ ids (1..9, no repeats) and volumes (finite, >= 0 ml); return them ordered
    by heatmap_ml descending, ties by organ id. Raises InvalidArgument("INVALID_ATTENTION")."""
    out: list[OrganAttention] = []
    seen: set[int] = set()
    for oa in organs:
        organ = int(oa.organ)
        if organ not in ORGANS:
            raise _invalid("organ must be one of the nine AbdomenAtlas organs",
                           organ=str(oa.organ))
        if organ in seen:
            raise _invalid("organ listed twice", organ=str(organ))
        seen.add(organ)
        values = (float(oa.attention_ml), float(oa.heatmap_ml), float(oa.volume_ml))
        if not all(math.isfinite(v) and v >= 0.0 for v in values):
            raise _invalid("attention volumes must be finite and >= 0 ml", organ=str(organ))
        out.append(OrganAttention(organ, *values))
    return tuple(sorted(out, key=lambda o: (-o.heatmap_ml, o.organ)))


def case_priority(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> float:
    """Total attention_ml (ml) over the organs NOT labelled by the case's source.

    organs: per-organ attention summaries; labelled_organs: organ ids the source dataset
    labelled (their labels are trusted, so their attention does not call for review).
    """
    known = {int(o) for o in labelled_organs}
    return float(math.fsum(o.attention_ml for o in organs if int(o.organ) not in known))


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE worklist (
        case_id TEXT PRIMARY KEY,
        series_id TEXT NOT NULL,
        source_job_id TEXT NOT NULL,
        priority REAL NOT NULL,
        organs TEXT NOT NULL,
        labelled_organs TEXT NOT NULL,
        heatmap_digest TEXT NOT NULL DEFAULT '',
        heatmap_size INTEGER NOT NULL DEFAULT 0,
        update_time TEXT NOT NULL
    );
    CREATE INDEX worklist_by_rank ON worklist(priority DESC, case_id);
    CREATE TABLE worklist_submissions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        case_id TEXT NOT NULL,
        source_job_id TEXT NOT NULL,
        submit_time TEXT NOT NULL,
        UNIQUE (case_id, source_job_id)
    );
    """,
)


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidArgument("INVALID_ARGUMENT", f"{name} is required (printable, <= 256 chars)",
                              domain=DOMAIN, metadata={"field": name})


class SqliteWorklist:
    """The worklist store on an SQLite file (the embedded default)."""

    def __init__(self, path: str | Path) -> None:
        self._conn = sq.connect(path)
        self._lock = threading.RLock()
        with self._lock:
            sq.migrate(self._conn, MIGRATIONS)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteWorklist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, case_id: str, series_id: str, source_job_id: str,
               organs: Sequence[OrganAttention], labelled_organs: Sequence[int] = (),
               heatmap_digest: str = "", heatmap_size: int = 0) -> tuple[WorklistEntry, int]:
        """Record the attention summary of `case_id` from segmentation job `source_job_id`.

        Returns (the case's entry after re-ranking, its 1-based rank). Idempotent by
        (case_id, source_job_id); see the module docstring for replacement.
        """
        _check_id("case_id", case_id)
        _check_id("series_id", series_id)
        _check_id("source_job_id", source_job_id)
        ordered = validate_organs(organs)
        labelled = tuple(sorted({int(o) for o in labelled_organs}))
        if any(o not in ORGANS for o in labelled):
            raise _invalid("labelled_organs must be AbdomenAtlas organ ids")
        if heatmap_size < 0:
            raise _invalid("heatmap size must be >= 0")
        priority = case_priority(ordered, labelled)
        now = sq.utc_now().isoformat()
        with self._lock, sq.transaction(self._conn):
            seen = self._conn.execute(
                "SELECT 1 FROM worklist_submissions WHERE case_id = ? AND source_job_id = ?",
                (case_id, source_job_id)).fetchone()
            if not seen:
                self._conn.execute(
                    "INSERT INTO worklist_submissions(case_id, source_job_id, submit_time)"
                    " VALUES (?, ?, ?)", (case_id, source_job_id, now))
                self._conn.execute(
                    "INSERT INTO worklist(case_id, series_id, source_job_id, priority, organs,"
                    " labelled_organs, heatmap_digest, heatmap_size, update_time)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(case_id) DO UPDATE SET series_id = excluded.series_id,"
                    " source_job_id = excluded.source_job_id, priority = excluded.priority,"
                    " organs = excluded.organs, labelled_organs = excluded.labelled_organs,"
                    " heatmap_digest = excluded.heatmap_digest,"
                    " heatmap_size = excluded.heatmap_size, update_time = excluded.update_time",
                    (case_id, series_id, source_job_id, priority,
                     json.dumps([[o.organ, o.attention_ml, o.heatmap_ml, o.volume_ml]
                                 for o in ordered]),
                     json.dumps(labelled), heatmap_digest, int(heatmap_size), now))
            row = self._conn.execute("SELECT * FROM worklist WHERE case_id = ?",
                                     (case_id,)).fetchone()
            return self._entry(row), self._rank(row["priority"], row["case_id"])

    def get(self, case_id: str) -> tuple[WorklistEntry, int]:
        """(entry, 1-based rank) of `case_id`, or NotFound("CASE_NOT_FOUND")."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM worklist WHERE case_id = ?",
                                     (case_id,)).fetchone()
            if row is None:
                raise NotFound("CASE_NOT_FOUND", "case is not on the worklist", domain=DOMAIN,
                               metadata={"case_id": case_id[:80]})
            return self._entry(row), self._rank(row["priority"], row["case_id"])

    def list(self, page_size: int = 0, page_token: str = ""
             ) -> tuple[list[tuple[WorklistEntry, int]], str, int]:
        """A page of the worklist, highest priority first.

        page_size: 0 -> 50, max 1000, negative -> INVALID_PAGE_SIZE. Returns
        ([(entry, rank), ...], next_page_token ("" at the end), total number of cases).
        """
        size = sq.clamp_page_size(page_size, domain=DOMAIN)
        cursor = sq.decode_page_token(page_token, "worklist", domain=DOMAIN)
        with self._lock:
            if cursor is None:
                rows = self._conn.execute(
                    "SELECT * FROM worklist ORDER BY priority DESC, case_id LIMIT ?",
                    (size + 1,)).fetchall()
            else:
                p, c = cursor.get("p"), cursor.get("c")
                if (not isinstance(p, (int, float)) or isinstance(p, bool)
                        or not isinstance(c, str)):
                    raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid",
                                          domain=DOMAIN)
                rows = self._conn.execute(
                    "SELECT * FROM worklist WHERE priority < ? OR (priority = ? AND case_id > ?)"
                    " ORDER BY priority DESC, case_id LIMIT ?", (p, p, c, size + 1)).fetchall()
            total = int(self._conn.execute("SELECT COUNT(*) FROM worklist").fetchone()[0])
            first_rank = self._rank(rows[0]["priority"], rows[0]["case_id"]) if rows else 0
        more = len(rows) > size
        rows = rows[:size]
        items = [(self._entry(r), first_rank + i) for i, r in enumerate(rows)]
        token = (sq.encode_page_token("worklist", {"p": rows[-1]["priority"],
                                                   "c": rows[-1]["case_id"]})
                 if more else "")
        return items, token, total

    def _rank(self, priority: float, case_id: str) -> int:
        ahead = self._conn.execute(
            "SELECT COUNT(*) FROM worklist WHERE priority > ? OR (priority = ? AND case_id < ?)",
            (priority, priority, case_id)).fetchone()[0]
        return int(ahead) + 1

    @staticmethod
    def _entry(row: sqlite3.Row) -> WorklistEntry:
        return WorklistEntry(
            case_id=row["case_id"], series_id=row["series_id"],
            source_job_id=row["source_job_id"], priority=float(row["priority"]),
            organs=tuple(OrganAttention(int(o), float(a), float(h), float(v))
                         for o, a, h, v in json.loads(row["organs"])),
            heatmap_digest=row["heatmap_digest"], heatmap_size=int(row["heatmap_size"]),
            update_time=datetime.fromisoformat(row["update_time"]),
            labelled_organs=tuple(json.loads(row["labelled_organs"])),
        )
