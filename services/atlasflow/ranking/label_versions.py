"""Label versions (`record_label_version`, fed by the labels service's outbox) and the geometry
of human-decided organs that the learned population prior is built from (no grpc).

Every label version the labels service stores is reported here with the organs a human decided
in it (a radiologist's revision, in that version or an ancestor, or the source's original
label). Those organs leave the priority exactly like source-labelled organs: the attention
asked a question a human has answered. Delivery is at least once and in any order: an event is
kept only when its `version_number` (1-based position in the case's chain of versions) is
higher than the recorded one, so a replay or a late older event changes nothing. A case
without attention yet is remembered (`case_labels`) and its first submission uses it. Review
status, lease and rounds are untouched (CompleteReview closes a review).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import sqlalchemy as sa

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import ORGANS
from atlasflow.method.strategy import OrganDecision
from atlasflow.ranking.entries import DOMAIN, ModelState, OrganAttention, WorklistEntry
from atlasflow.ranking.prior import OrganSummary
from atlasflow.ranking.priority import attention_mask, case_priority
from atlasflow.ranking.schema import organ_json, organ_of
from atlasflow.ranking.store import WorklistStore, one, rows, run, scalar

#: advisory lock: recording decisions (shared) vs reading the decision horizon (exclusive)
DECISIONS_LOCK = "ranking-organ-decisions"


def invalid_event(message: str, **metadata: str) -> InvalidArgument:
    """InvalidArgument("INVALID_LABEL_VERSION") for a malformed label-version event."""
    return InvalidArgument("INVALID_LABEL_VERSION", message, domain=DOMAIN, metadata=metadata)


class LabelVersions(WorklistStore):
    """The label-version operations of the worklist store."""

    def record_label_version(
        self,
        case_id: str,
        label_version_id: str,
        version_number: int,
        human_organs: Iterable[int] = (),
        revised_organs: Iterable[int] = (),
        reviewer: str = "",
        geometry: Iterable[OrganSummary] = (),
        organ_changes: Mapping[int, float] | None = None,
    ) -> tuple[WorklistEntry, int] | None:
        """Record that `case_id` has label version `label_version_id` (see the module docstring).

        version_number: 1-based position in the case's chain (orders late events);
        human_organs: organ ids decided by a human in that version (they leave the priority);
        revised_organs: ids a radiologist revised in that very version; reviewer: its author;
        geometry: summaries of human-decided organs present in the version (the learned prior);
        organ_changes: revised organ id -> ml the revision changed (0 = accepted): each becomes an
        organ decision (with the organ's current features, when the case's attention has them)
        for the `learned` strategy, once per (case, organ, version) whatever the event order.
        Returns (entry, rank) after re-ranking, or None while the case has no attention.
        """
        for name, value in (("case_id", case_id), ("label_version_id", label_version_id)):
            if not value or len(value) > 256 or not value.isprintable():
                raise invalid_event(f"{name} is required (printable, <= 256 chars)", field=name)
        if int(version_number) < 1:
            raise invalid_event("version_number must be >= 1", field="version_number")
        human = tuple(sorted({int(o) for o in human_organs}))
        revised = tuple(sorted({int(o) for o in revised_organs}))
        if any(o not in ORGANS for o in human + revised):
            raise invalid_event("organs must be AbdomenAtlas organ ids")
        if not set(revised) <= set(human):
            raise invalid_event("revised_organs must be among human_decided_organs")
        if len(reviewer) > 256 or not reviewer.isprintable():
            raise invalid_event("reviewer must be printable, <= 256 chars", field="reviewer")
        geoms: dict[int, OrganSummary] = {}
        for g in geometry:
            if g.organ not in human or g.organ in geoms or not g.valid():
                raise invalid_event(
                    "organ geometry must be finite, volume > 0, one per human-decided organ",
                    field="human_organ_geometry",
                )
            geoms[g.organ] = g
        changes = {int(o): float(ml) for o, ml in (organ_changes or {}).items()}
        if not set(changes) <= set(revised) or not all(math.isfinite(ml) and ml >= 0 for ml in changes.values()):
            raise invalid_event(
                "organ_changes must name revised organs once, with finite ml >= 0", field="organ_changes"
            )
        with self._db.transaction() as conn:
            self._db.lock(conn, f"ranking-case:{case_id}")  # vs submit of the case
            if changes:
                self._record_decisions(conn, case_id, label_version_id, changes, reviewer)
            known = one(conn, "SELECT version_number FROM case_labels WHERE case_id = :c", {"c": case_id})
            if known is None or int(known["version_number"]) < int(version_number):
                run(
                    conn,
                    "INSERT INTO case_labels(case_id, label_version_id, version_number,"
                    " human_organs, revised_organs, reviewer, record_time, geometry)"
                    " VALUES (:c, :v, :n, :human, :revised, :who, :t, :geometry) ON CONFLICT(case_id) DO UPDATE SET"
                    " label_version_id = excluded.label_version_id,"
                    " version_number = excluded.version_number,"
                    " human_organs = excluded.human_organs,"
                    " revised_organs = excluded.revised_organs, reviewer = excluded.reviewer,"
                    " record_time = excluded.record_time, geometry = excluded.geometry",
                    {
                        "c": case_id,
                        "v": label_version_id,
                        "n": int(version_number),
                        "human": json.dumps(human),
                        "revised": json.dumps(revised),
                        "who": reviewer,
                        "t": self._clock().isoformat(),
                        "geometry": json.dumps({str(k): g.to_list() for k, g in sorted(geoms.items())}),
                    },
                )
                row = one(conn, "SELECT * FROM worklist WHERE case_id = :c", {"c": case_id})
                if row is not None:
                    organs = [organ_of(o) for o in json.loads(row["organs"])]
                    excluded = set(json.loads(row["labelled_organs"])) | set(human)
                    run(
                        conn,
                        "UPDATE worklist SET priority = :p, attention_mask = :mask,"
                        " latest_label_version_id = :v, human_organs = :human WHERE case_id = :c",
                        {
                            "p": case_priority(organs, excluded),
                            "mask": attention_mask(organs, excluded),
                            "v": label_version_id,
                            "human": json.dumps(human),
                            "c": case_id,
                        },
                    )
            if one(conn, "SELECT 1 FROM worklist WHERE case_id = :c", {"c": case_id}) is None:
                return None
            return self._entry_and_rank(conn, case_id, self._now_us())

    def _record_decisions(
        self, conn: sa.Connection, case_id: str, label_version_id: str, changes: Mapping[int, float], reviewer: str
    ) -> None:
        row = one(conn, "SELECT organs FROM worklist WHERE case_id = :c", {"c": case_id})
        features = {o.organ: o.features for o in (organ_of(r) for r in json.loads(row["organs"]))} if row else {}
        now = self._clock().isoformat()
        if any(features.get(organ) for organ in changes):
            # vs `decision_horizon`: a decision's seq is visible before a model is fitted past it
            self._db.lock(conn, DECISIONS_LOCK, shared=True)
        for organ, ml in sorted(changes.items()):
            if not features.get(organ):
                continue  # the attention carried no features: nothing to learn from
            run(
                conn,
                "INSERT INTO organ_decisions(case_id, organ, label_version_id, changed_ml, features,"
                " reviewer, record_time) VALUES (:c, :o, :v, :ml, :f, :who, :t)"
                " ON CONFLICT (case_id, organ, label_version_id) DO NOTHING",
                {
                    "c": case_id,
                    "o": organ,
                    "v": label_version_id,
                    "ml": ml,
                    "f": json.dumps(dict(sorted(features[organ].items()))),
                    "who": reviewer,
                    "t": now,
                },
            )

    def organ_decisions(self, through_seq: int | None = None) -> list[OrganDecision]:
        """The recorded organ decisions (those with ``seq <= through_seq``; None: all), oldest
        first (what the `learned` strategy fits on)."""
        with self._db.read() as conn:
            found = rows(
                conn,
                "SELECT features, changed_ml FROM organ_decisions WHERE seq <= :s ORDER BY seq",
                {"s": 2**62 if through_seq is None else int(through_seq)},
            )
        return [OrganDecision(json.loads(r["features"]), float(r["changed_ml"])) for r in found]

    def model_state(self) -> ModelState:
        """The learned model in force (table ``learned_model``; `atlasflow.ranking.learned`)."""
        with self._db.read() as conn:
            return self._model_state(conn)

    def decision_horizon(self) -> tuple[int, int]:
        """(the highest decision seq, the number of decisions newer than the model in force).

        Every decision up to that seq is committed and no later one gets a lower seq (the read
        waits for decisions being recorded: an exclusive lock against their shared one), so the
        decisions ``seq <= horizon`` are a fixed set any replica can fit the same model on."""
        with self._db.transaction() as conn:
            self._db.lock(conn, DECISIONS_LOCK)
            state = self._model_state(conn)
            top = int(scalar(conn, "SELECT COALESCE(MAX(seq), 0) FROM organ_decisions"))
            new = int(scalar(conn, "SELECT COUNT(*) FROM organ_decisions WHERE seq > :s", {"s": state.fitted_seq}))
        return top, new

    def publish_model(self, fitted_seq: int, fitted: bool) -> ModelState:
        """Make the model fitted on the decisions ``seq <= fitted_seq`` the one in force, unless
        one fitted on as many or more already is (a replica that refitted at the same time);
        its generation is bumped when scores may change (the new or the old one is fitted).
        Returns the model in force afterwards (ours or the newer one)."""
        with self._db.transaction() as conn:
            row = one(conn, "SELECT * FROM learned_model WHERE id = 1" + self._db.for_update())
            if row is None:
                raise RuntimeError("learned_model has no row (migration 0003 inserts it)")
            if int(row["fitted_seq"]) >= fitted_seq:
                return ModelState(int(row["fitted_seq"]), int(row["generation"]), bool(row["fitted"]))
            generation = int(row["generation"]) + int(fitted or bool(row["fitted"]))
            run(
                conn,
                "UPDATE learned_model SET fitted_seq = :s, generation = :g, fitted = :f, update_time = :t WHERE id = 1",
                {"s": fitted_seq, "g": generation, "f": int(fitted), "t": self._clock().isoformat()},
            )
            return ModelState(fitted_seq, generation, fitted)

    def rescore(self, score: Callable[[Sequence[OrganAttention]], Sequence[OrganAttention]], generation: int) -> int:
        """Score again, with ``score`` (the learned model of `generation`, e.g.
        `atlasflow.ranking.learned.LearnedScorer.score`), the organs of every case whose
        attention carries features and was scored with an older generation; priorities and
        organ masks follow. Stops when another generation is in force (whoever published it
        rescores); a rescore cut short (the replica was killed) is finished by the next one.
        Returns the number of cases whose priority changed."""
        with self._db.read() as conn:
            ids = [
                r["case_id"]
                for r in rows(
                    conn, "SELECT case_id, organs FROM worklist WHERE scored_generation < :g", {"g": generation}
                )
                if any(organ_of(o).features for o in json.loads(r["organs"]))
            ]
        changed = 0
        for case_id in ids:
            with self._db.transaction() as conn:
                self._db.lock(conn, f"ranking-case:{case_id}")
                if self._model_state(conn, share=True).generation != generation:
                    break  # superseded
                row = one(conn, "SELECT * FROM worklist WHERE case_id = :c", {"c": case_id})
                if row is None or int(row["scored_generation"]) >= generation:
                    continue
                organs = [organ_of(o) for o in json.loads(row["organs"])]
                scored = list(score(organs))
                excluded = set(json.loads(row["labelled_organs"])) | set(json.loads(row["human_organs"]))
                priority = case_priority(scored, excluded)
                run(
                    conn,
                    "UPDATE worklist SET organs = :organs, priority = :p, attention_mask = :mask,"
                    " scored_generation = :g WHERE case_id = :c",
                    {
                        "organs": json.dumps([organ_json(o) for o in scored]),
                        "p": priority,
                        "mask": attention_mask(scored, excluded),
                        "g": generation,
                        "c": case_id,
                    },
                )
                changed += int(priority != float(row["priority"]))
        return changed

    def learned_geometry(self) -> tuple[list[dict[int, OrganSummary]], str]:
        """(per case, the human-decided organ summaries of its latest recorded label version,
        ordered by case_id; a change tag that differs whenever any of them changed)."""
        with self._db.read() as conn:
            found = rows(
                conn,
                "SELECT case_id, label_version_id, geometry FROM case_labels WHERE geometry != '{}' ORDER BY case_id",
            )
        cases = [
            {int(k): OrganSummary.from_list(int(k), v) for k, v in json.loads(r["geometry"]).items()} for r in found
        ]
        tag = hashlib.sha256(",".join(r["label_version_id"] for r in found).encode()).hexdigest()
        return cases, tag
