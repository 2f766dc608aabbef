"""Ranking gRPC servicer: converts messages, calls `worklist` domain code."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from atlasflow.common.metrics import Metrics
from atlasflow.common.v1 import common_pb2
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.ranking.worklist import OrganAttention, SqliteWorklist, WorklistEntry


def item_to_proto(entry: WorklistEntry, rank: int) -> ranking_pb2.WorklistItem:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(entry.update_time)
    item = ranking_pb2.WorklistItem(
        case_id=entry.case_id, series_id=entry.series_id, rank=rank, priority=entry.priority,
        organs=[ranking_pb2.OrganAttention(organ=o.organ, attention_ml=o.attention_ml,
                                           heatmap_ml=o.heatmap_ml, volume_ml=o.volume_ml)
                for o in entry.organs],
        source_job_id=entry.source_job_id, update_time=ts)
    if entry.heatmap_digest:
        item.heatmap.CopyFrom(common_pb2.BlobRef(digest=entry.heatmap_digest,
                                                 size_bytes=entry.heatmap_size,
                                                 media_type="application/x-nifti+gzip"))
    return item


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, worklist: SqliteWorklist, metrics: Metrics) -> None:
        self.worklist = worklist
        self.metrics = metrics

    async def SubmitAttention(self, request: ranking_pb2.SubmitAttentionRequest,
                              context: grpc.aio.ServicerContext) -> ranking_pb2.SubmitAttentionResponse:
        entry, rank = self.worklist.submit(
            request.case_id, request.series_id, request.source_job_id,
            [OrganAttention(int(o.organ), o.attention_ml, o.heatmap_ml, o.volume_ml)
             for o in request.organs],
            [int(o) for o in request.labelled_organs],
            request.heatmap.digest, request.heatmap.size_bytes)
        _items, _token, total = self.worklist.list(page_size=1)
        self.metrics.set_queue_depth("worklist", total)
        return ranking_pb2.SubmitAttentionResponse(item=item_to_proto(entry, rank))

    async def ListWorklist(self, request: ranking_pb2.ListWorklistRequest,
                           context: grpc.aio.ServicerContext) -> ranking_pb2.ListWorklistResponse:
        items, token, total = self.worklist.list(request.page_size, request.page_token)
        return ranking_pb2.ListWorklistResponse(
            items=[item_to_proto(e, r) for e, r in items], next_page_token=token,
            total_size=total)

    async def GetWorklistItem(self, request: ranking_pb2.GetWorklistItemRequest,
                              context: grpc.aio.ServicerContext) -> ranking_pb2.GetWorklistItemResponse:
        entry, rank = self.worklist.get(request.case_id)
        return ranking_pb2.GetWorklistItemResponse(item=item_to_proto(entry, rank))
