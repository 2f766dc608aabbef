"""Ranking gRPC servicer: converts messages, calls `worklist` domain code.

The reviewer of every review RPC is the caller's principal (`principal_of(context)`: the
verified token's subject; the server's interceptor has already refused calls without a valid
token or an allowed role); the domain code rejects a missing one (PRINCIPAL_REQUIRED, possible
only with authentication disabled). Store
calls run in a worker thread (`asyncio.to_thread`) so SQLite's fsync never blocks the event
loop; the store serialises them itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar, cast

from google.protobuf import duration_pb2, timestamp_pb2

from atlasflow.common.errors import Aborted, InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import Context, principal_of
from atlasflow.common.v1 import common_pb2
from atlasflow.ranking.entries import (
    DOMAIN,
    AttentionPointer,
    ModelChanged,
    OrganAttention,
    Round,
    Status,
    WorklistEntry,
    WorklistFilter,
)
from atlasflow.ranking.learned import LearnedScorer
from atlasflow.ranking.prior import LearnedPriorCache, OrganSummary
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.ranking.worklist import SqlWorklist

T = TypeVar("T")

_OUTCOME_TO_STATUS = {
    ranking_pb2.REVIEW_OUTCOME_ACCEPTED: Status.ACCEPTED,
    ranking_pb2.REVIEW_OUTCOME_REVISED: Status.REVISED,
}
_STATUS_TO_OUTCOME = {v: k for k, v in _OUTCOME_TO_STATUS.items()}
#: a submission scored again this often when newer learned models keep appearing meanwhile
_SUBMIT_TRIES = 5


def _organ(organ: int) -> common_pb2.Organ:
    """An organ id (1..9) as the proto enum (the same numbers)."""
    return cast("common_pb2.Organ", organ)


def _organs(organs: Iterable[int]) -> list[common_pb2.Organ]:
    return [_organ(o) for o in organs]


def _ts(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def _seconds(request_duration: duration_pb2.Duration, present: bool) -> float | None:
    if not present:
        return None
    return request_duration.seconds + request_duration.nanos / 1e9


def pointer_to_proto(p: AttentionPointer) -> ranking_pb2.AttentionPointer:
    return ranking_pb2.AttentionPointer(
        voxel_box=ranking_pb2.VoxelBox(
            x_min=p.voxel_min[0],
            y_min=p.voxel_min[1],
            z_min=p.voxel_min[2],
            x_max=p.voxel_max[0],
            y_max=p.voxel_max[1],
            z_max=p.voxel_max[2],
        ),
        world_box=ranking_pb2.WorldBox(
            x_min_mm=p.world_min_mm[0],
            y_min_mm=p.world_min_mm[1],
            z_min_mm=p.world_min_mm[2],
            x_max_mm=p.world_max_mm[0],
            y_max_mm=p.world_max_mm[1],
            z_max_mm=p.world_max_mm[2],
        ),
        slices=ranking_pb2.SliceRange(first=p.slices[0], last=p.slices[1]),
    )


def pointer_from_proto(p: ranking_pb2.AttentionPointer) -> AttentionPointer:
    v, w = p.voxel_box, p.world_box
    return AttentionPointer(
        (v.x_min, v.y_min, v.z_min),
        (v.x_max, v.y_max, v.z_max),
        (w.x_min_mm, w.y_min_mm, w.z_min_mm),
        (w.x_max_mm, w.y_max_mm, w.z_max_mm),
        (p.slices.first, p.slices.last),
    )


def organ_to_proto(o: OrganAttention) -> ranking_pb2.OrganAttention:
    msg = ranking_pb2.OrganAttention(
        organ=_organ(o.organ),
        attention_ml=o.attention_ml,
        heatmap_ml=o.heatmap_ml,
        volume_ml=o.volume_ml,
        reasons=list(o.reasons),
    )
    if o.pointer is not None:
        msg.pointer.CopyFrom(pointer_to_proto(o.pointer))
    if o.score is not None:
        msg.score = o.score
    msg.features.update(o.features)
    return msg


def organ_from_proto(o: ranking_pb2.OrganAttention) -> OrganAttention:
    return OrganAttention(
        int(o.organ),
        o.attention_ml,
        o.heatmap_ml,
        o.volume_ml,
        tuple(o.reasons),
        pointer_from_proto(o.pointer) if o.HasField("pointer") else None,
        o.score if o.HasField("score") else None,
        dict(o.features),
    )


def _organ_changes(changes: Iterable[ranking_pb2.OrganChange]) -> dict[int, float]:
    """organ id -> changed ml; an organ given twice is INVALID_LABEL_VERSION."""
    out: dict[int, float] = {}
    for c in changes:
        if int(c.organ) in out:
            raise InvalidArgument(
                "INVALID_LABEL_VERSION",
                "organ_changes names an organ twice",
                domain=DOMAIN,
                metadata={"field": "organ_changes"},
            )
        out[int(c.organ)] = c.changed_ml
    return out


def geometry_from_proto(g: ranking_pb2.OrganGeometry) -> OrganSummary:
    """An OrganGeometry message as an `OrganSummary`; a centroid without exactly three values
    becomes NaNs, which the worklist rejects (INVALID_LABEL_VERSION)."""
    m = g.centroid_mm
    c = (m[0], m[1], m[2]) if len(m) == 3 else (math.nan, math.nan, math.nan)
    return OrganSummary(int(g.organ), g.volume_ml, c, g.fov_cut)


def item_to_proto(entry: WorklistEntry, rank: int) -> ranking_pb2.WorklistItem:
    item = ranking_pb2.WorklistItem(
        case_id=entry.case_id,
        series_id=entry.series_id,
        rank=rank,
        priority=entry.priority,
        organs=[organ_to_proto(o) for o in entry.organs],
        source_job_id=entry.source_job_id,
        update_time=_ts(entry.update_time),
        status=cast("ranking_pb2.WorklistStatus", int(entry.status)),  # same numbers (entries.Status)
        round_number=entry.round_number,
        labelled_organs=_organs(entry.labelled_organs),
        label_version_id=entry.label_version_id,
        human_decided_organs=_organs(entry.human_decided_organs),
    )
    if entry.heatmap_digest:
        item.heatmap.CopyFrom(
            common_pb2.BlobRef(
                digest=entry.heatmap_digest, size_bytes=entry.heatmap_size, media_type="application/x-nifti+gzip"
            )
        )
    if entry.lease is not None:
        item.lease.CopyFrom(
            ranking_pb2.Lease(
                reviewer=entry.lease.reviewer,
                start_time=_ts(entry.lease.start_time),
                expire_time=_ts(entry.lease.expire_time),
            )
        )
    if entry.review is not None:
        r = entry.review
        item.review.CopyFrom(
            ranking_pb2.Review(
                outcome=_STATUS_TO_OUTCOME[r.outcome],
                reviewer=r.reviewer,
                label_version_id=r.label_version_id,
                complete_time=_ts(r.complete_time),
                round_number=r.round_number,
            )
        )
    return item


def round_to_proto(r: Round) -> ranking_pb2.Round:
    msg = ranking_pb2.Round(
        round_number=r.round_number,
        budget_fraction=r.budget_fraction,
        candidate_count=r.candidate_count,
        case_count=r.case_count,
        accepted_count=r.accepted_count,
        revised_count=r.revised_count,
        unreviewed_count=r.unreviewed_count,
        state=ranking_pb2.ROUND_STATE_OPEN if r.is_open else ranking_pb2.ROUND_STATE_CLOSED,
        creator=r.creator,
        create_time=_ts(r.create_time),
    )
    if r.close_time is not None:
        msg.close_time.CopyFrom(_ts(r.close_time))
    return msg


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Thin transport over `SqlWorklist`; updates the queue-depth gauges after every call:
    `worklist` (all cases) and `worklist_pending` (status PENDING)."""

    def __init__(self, worklist: SqlWorklist, metrics: Metrics, learned: LearnedScorer | None = None) -> None:
        self.worklist = worklist
        self.metrics = metrics
        self._prior = LearnedPriorCache(worklist.learned_geometry)
        self.learned = learned or LearnedScorer(worklist)

    def _refit(self, force: bool = False) -> None:
        """Refit the learned strategy when enough decisions are new, adopt the model in force and
        rescore the cases scored with an older one (`LearnedScorer.refit`). Blocking."""
        self.learned.refit(force=force)

    def _submit(self, request: ranking_pb2.SubmitAttentionRequest) -> tuple[WorklistEntry, int]:
        """Score the attention with the learned model in force and store it; when another
        replica published a newer model meanwhile (`ModelChanged`), adopt it and score again.
        Blocking."""
        organs = [organ_from_proto(o) for o in request.organs]
        for _ in range(_SUBMIT_TRIES):
            scored, generation = self.learned.score(organs)
            try:
                return self.worklist.submit(
                    request.case_id,
                    request.series_id,
                    request.source_job_id,
                    scored,
                    [int(o) for o in request.labelled_organs],
                    request.heatmap.digest,
                    request.heatmap.size_bytes,
                    model_generation=generation,
                )
            except ModelChanged as changed:
                self.learned.adopt(changed.state)
        raise Aborted("MODEL_CHANGING", "the learned model kept changing; retry", domain=DOMAIN)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            await asyncio.to_thread(self._update_gauges)

    def _update_gauges(self) -> None:
        counts = self.worklist.count_by_status()
        self.metrics.set_queue_depth("worklist", sum(counts.values()))
        self.metrics.set_queue_depth("worklist_pending", counts[Status.PENDING])

    async def SubmitAttention(
        self, request: ranking_pb2.SubmitAttentionRequest, context: Context
    ) -> ranking_pb2.SubmitAttentionResponse:
        t0 = time.perf_counter()
        entry, rank = await self._call(self._submit, request)
        self.metrics.observe_stage("ranking_update", time.perf_counter() - t0)
        return ranking_pb2.SubmitAttentionResponse(item=item_to_proto(entry, rank))

    async def RecordLabelVersion(
        self, request: ranking_pb2.RecordLabelVersionRequest, context: Context
    ) -> ranking_pb2.RecordLabelVersionResponse:
        t0 = time.perf_counter()
        result = await self._call(
            self.worklist.record_label_version,
            request.case_id,
            request.label_version_id,
            request.version_number,
            [int(o) for o in request.human_decided_organs],
            [int(o) for o in request.revised_organs],
            request.reviewer,
            [geometry_from_proto(g) for g in request.human_organ_geometry],
            _organ_changes(request.organ_changes),
        )
        if request.organ_changes:  # new decisions: refit once enough are new
            await asyncio.to_thread(self._refit)
        self.metrics.observe_stage("ranking_update", time.perf_counter() - t0)
        if result is None:
            return ranking_pb2.RecordLabelVersionResponse()
        return ranking_pb2.RecordLabelVersionResponse(item=item_to_proto(*result))

    async def GetPopulationPrior(
        self, request: ranking_pb2.GetPopulationPriorRequest, context: Context
    ) -> ranking_pb2.GetPopulationPriorResponse:
        prior_json, added = await asyncio.to_thread(self._prior.current)
        return ranking_pb2.GetPopulationPriorResponse(prior_json=prior_json, learned_cases=added)

    async def ListWorklist(
        self, request: ranking_pb2.ListWorklistRequest, context: Context
    ) -> ranking_pb2.ListWorklistResponse:
        flt = WorklistFilter(
            frozenset(int(o) for o in request.organs), request.round_number, frozenset(int(s) for s in request.statuses)
        )
        items, token, total = await self._call(self.worklist.list, request.page_size, request.page_token, flt)
        return ranking_pb2.ListWorklistResponse(
            items=[item_to_proto(e, r) for e, r in items], next_page_token=token, total_size=total
        )

    async def GetWorklistItem(
        self, request: ranking_pb2.GetWorklistItemRequest, context: Context
    ) -> ranking_pb2.GetWorklistItemResponse:
        entry, rank = await asyncio.to_thread(self.worklist.get, request.case_id)
        return ranking_pb2.GetWorklistItemResponse(item=item_to_proto(entry, rank))

    async def LeaseCase(self, request: ranking_pb2.LeaseCaseRequest, context: Context) -> ranking_pb2.LeaseCaseResponse:
        entry, rank = await self._call(
            self.worklist.lease,
            request.case_id,
            principal_of(context),
            _seconds(request.lease_duration, request.HasField("lease_duration")),
        )
        return ranking_pb2.LeaseCaseResponse(item=item_to_proto(entry, rank))

    async def LeaseNextCase(
        self, request: ranking_pb2.LeaseNextCaseRequest, context: Context
    ) -> ranking_pb2.LeaseNextCaseResponse:
        entry, rank = await self._call(
            self.worklist.lease_next,
            principal_of(context),
            _seconds(request.lease_duration, request.HasField("lease_duration")),
        )
        return ranking_pb2.LeaseNextCaseResponse(item=item_to_proto(entry, rank))

    async def RenewLease(
        self, request: ranking_pb2.RenewLeaseRequest, context: Context
    ) -> ranking_pb2.RenewLeaseResponse:
        entry, rank = await self._call(
            self.worklist.renew,
            request.case_id,
            principal_of(context),
            _seconds(request.lease_duration, request.HasField("lease_duration")),
        )
        return ranking_pb2.RenewLeaseResponse(item=item_to_proto(entry, rank))

    async def ReleaseLease(
        self, request: ranking_pb2.ReleaseLeaseRequest, context: Context
    ) -> ranking_pb2.ReleaseLeaseResponse:
        entry, rank = await self._call(self.worklist.release, request.case_id, principal_of(context))
        return ranking_pb2.ReleaseLeaseResponse(item=item_to_proto(entry, rank))

    async def CompleteReview(
        self, request: ranking_pb2.CompleteReviewRequest, context: Context
    ) -> ranking_pb2.CompleteReviewResponse:
        entry, rank = await self._call(
            self.worklist.complete,
            request.case_id,
            principal_of(context),
            _OUTCOME_TO_STATUS.get(request.outcome, 0),
            request.label_version_id,
        )
        return ranking_pb2.CompleteReviewResponse(item=item_to_proto(entry, rank))

    async def StartRound(
        self, request: ranking_pb2.StartRoundRequest, context: Context
    ) -> ranking_pb2.StartRoundResponse:
        await asyncio.to_thread(self._refit, True)  # the round's candidates by the latest model
        rnd = await self._call(
            self.worklist.start_round, request.budget_fraction, principal_of(context), request.request_id
        )
        return ranking_pb2.StartRoundResponse(round=round_to_proto(rnd))

    async def GetRound(self, request: ranking_pb2.GetRoundRequest, context: Context) -> ranking_pb2.GetRoundResponse:
        rnd = await asyncio.to_thread(self.worklist.get_round, request.round_number)
        return ranking_pb2.GetRoundResponse(round=round_to_proto(rnd))

    async def ListRounds(
        self, request: ranking_pb2.ListRoundsRequest, context: Context
    ) -> ranking_pb2.ListRoundsResponse:
        rounds, token, total = await asyncio.to_thread(self.worklist.list_rounds, request.page_size, request.page_token)
        return ranking_pb2.ListRoundsResponse(
            rounds=[round_to_proto(r) for r in rounds], next_page_token=token, total_size=total
        )

    async def PurgeStudy(
        self, request: ranking_pb2.PurgeStudyRequest, context: Context
    ) -> ranking_pb2.PurgeStudyResponse:
        if not request.case_id:
            raise InvalidArgument(
                "INVALID_REQUEST", "case_id is required", domain=DOMAIN, metadata={"field": "case_id"}
            )
        counts, released = await self._call(self.worklist.purge_study, request.case_id)
        referenced = await asyncio.to_thread(self.worklist.referenced, list(request.check_digests))
        return ranking_pb2.PurgeStudyResponse(
            deleted_rows=counts, released_digests=released, referenced_digests=referenced
        )
