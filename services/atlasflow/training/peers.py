"""The roll-out's calls to segmentation and ranking over gRPC, as ``svc:training``
(`atlasflow.training.reinfer.Peers`; `atlasflow.common.policy.HANDOFF_CALLERS` admits
``svc:training`` to exactly these: segmentation's ActivateEnsembleVersion, ReinferCases,
GetSegmentationJob, CancelSegmentationJob and ranking's ListWorklist). The calls carry the
caller's trace context (the common client interceptors), so segmentation's jobs join the
training round's trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from atlasflow.common.auth import TokenSource
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import AtlasflowError, Unavailable
from atlasflow.common.server import error_info_of
from atlasflow.common.tls import ClientTLS
from atlasflow.common.v1 import common_pb2
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from atlasflow.training.dataset import DOMAIN

_SegStub: Callable[[grpc.Channel], Any] = segmentation_pb2_grpc.SegmentationServiceStub
_RankStub: Callable[[grpc.Channel], Any] = ranking_pb2_grpc.RankingServiceStub
_STATE = {v: k.removeprefix("OPERATION_STATE_") for k, v in common_pb2.OperationState.items()}


def _error(what: str, exc: grpc.RpcError) -> AtlasflowError:
    info = error_info_of(exc)
    reason = info.reason if info is not None and info.reason else "PEER_UNAVAILABLE"
    return Unavailable(
        "ROLLOUT_FAILED" if what == "activate" else "REINFER_FAILED",
        f"segmentation or ranking refused or did not answer ({what})",
        domain=DOMAIN,
        metadata={"call": what, "reason": reason, "code": exc.code().name if exc.code() else ""},
    )


class ServicePeers:
    """`Peers` over ``segmentation_target`` and ``ranking_target``."""

    def __init__(
        self,
        segmentation_target: str,
        ranking_target: str,
        token: TokenSource,
        tls: ClientTLS,
        *,
        timeout_s: float = 60.0,
        activate_timeout_s: float = 900.0,
    ) -> None:
        self._seg_channel = sync_channel(segmentation_target, token=token, tls=tls)
        self._rank_channel = sync_channel(ranking_target, token=token, tls=tls)
        self._seg = _SegStub(self._seg_channel)
        self._rank = _RankStub(self._rank_channel)
        self.timeout_s = timeout_s
        self.activate_timeout_s = activate_timeout_s

    def close(self) -> None:
        self._seg_channel.close()
        self._rank_channel.close()

    def activate(self, version: str) -> str:
        try:
            r = self._seg.ActivateEnsembleVersion(
                segmentation_pb2.ActivateEnsembleVersionRequest(ensemble_version=version),
                timeout=self.activate_timeout_s,
            )
        except grpc.RpcError as exc:
            raise _error("activate", exc) from None
        if r.already_active:
            return f"segmentation: {r.ensemble_version} already active"
        return f"segmentation: activated {r.ensemble_version} (model {r.model_name}, was {r.previous_version})"

    def worklist_order(self) -> list[str]:
        out: list[str] = []
        token = ""
        try:
            while True:
                page = self._rank.ListWorklist(
                    ranking_pb2.ListWorklistRequest(page_size=1000, page_token=token), timeout=self.timeout_s
                )
                out.extend(item.case_id for item in page.items)
                token = page.next_page_token
                if not token:
                    return out
        except grpc.RpcError as exc:
            raise _error("worklist", exc) from None

    def reinfer(self, version: str, case_ids: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
        try:
            r = self._seg.ReinferCases(
                segmentation_pb2.ReinferCasesRequest(ensemble_version=version, case_ids=list(case_ids)),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise _error("reinfer", exc) from None
        return [(j.job_id, j.case_id) for j in r.jobs], list(r.unknown_case_ids)

    def job_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        out = {}
        try:
            for job_id in job_ids:
                job = self._seg.GetSegmentationJob(
                    segmentation_pb2.GetSegmentationJobRequest(job_id=job_id), timeout=self.timeout_s
                ).job
                out[job_id] = _STATE.get(job.state, "")
        except grpc.RpcError as exc:
            raise _error("job", exc) from None
        return out

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            try:
                self._seg.CancelSegmentationJob(
                    segmentation_pb2.CancelSegmentationJobRequest(job_id=job_id), timeout=self.timeout_s
                )
            except grpc.RpcError:
                continue  # best effort: the job finishes, its result is kept
