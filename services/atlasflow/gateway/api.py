"""The review app's JSON API under ``/api/v1`` (docs/gateway.md lists every endpoint and its roles).

Every handler identifies the caller (`Sessions.caller`: 401 without a valid token), then calls the
services AS THE CALLER; what a role may do is the services' policy (a role it does not allow
comes back PERMISSION_DENIED -> 403). Blob downloads (CT, labels, attention) read the shared
blob store only after a gRPC call made as the user named the blob.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import uuid
from typing import Any, cast

from google.protobuf import duration_pb2, timestamp_pb2
from prometheus_client import Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.ids import is_valid_id
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.common.v1 import common_pb2
from atlasflow.gateway.backends import Backends, HttpError
from atlasflow.gateway.blobs import blob_response
from atlasflow.gateway.session import Caller, Sessions
from atlasflow.ingest.v1 import ingest_pb2
from atlasflow.labels.v1 import labels_pb2
from atlasflow.ranking.v1 import ranking_pb2

log = logging.getLogger(__name__)

#: the method's key figure: human time per case and per organ, from the revisions saved
REVIEW_SECONDS = Histogram(
    "atlasflow_gateway_review_seconds",
    "Time a reviewer spent, per saved revision: the whole case or one organ",
    ["scope"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
STATUSES = {
    "pending": ranking_pb2.WORKLIST_STATUS_PENDING,
    "leased": ranking_pb2.WORKLIST_STATUS_LEASED,
    "accepted": ranking_pb2.WORKLIST_STATUS_ACCEPTED,
    "revised": ranking_pb2.WORKLIST_STATUS_REVISED,
}
_STATUS_NAMES = {v: k for k, v in STATUSES.items()}


class BadRequest(Exception):
    def __init__(self, reason: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.error = HttpError(400, reason, message, {"field": field} if field else {})


# ---------------------------------------------------------------------------- JSON shapes
def _time(ts: timestamp_pb2.Timestamp) -> str | None:
    return ts.ToJsonString() if ts.seconds or ts.nanos else None


def organ_name(value: int) -> str:
    return ORGANS.get(value, "unspecified")


def organ_value(name: str) -> common_pb2.Organ:
    if name not in ORGAN_IDS:
        raise BadRequest("INVALID_ORGAN", f"unknown organ {name[:40]!r}; one of {sorted(ORGAN_IDS)}", "organ")
    return cast(common_pb2.Organ, ORGAN_IDS[name])  # the enum values are the organ ids


def item_json(item: ranking_pb2.WorklistItem) -> dict[str, Any]:
    organs = []
    for o in item.organs:
        pointer = None
        if o.HasField("pointer"):
            v, w, s = o.pointer.voxel_box, o.pointer.world_box, o.pointer.slices
            pointer = {
                "voxel_box": {"min": [v.x_min, v.y_min, v.z_min], "max": [v.x_max, v.y_max, v.z_max]},
                "world_box_mm": {
                    "min": [w.x_min_mm, w.y_min_mm, w.z_min_mm],
                    "max": [w.x_max_mm, w.y_max_mm, w.z_max_mm],
                },
                "slices": {"first": s.first, "last": s.last},
            }
        organs.append(
            {
                "organ": organ_name(o.organ),
                "attention_ml": o.attention_ml,
                "heatmap_ml": o.heatmap_ml,
                "volume_ml": o.volume_ml,
                "score": o.score if o.HasField("score") else None,
                "reasons": list(o.reasons),
                "pointer": pointer,
            }
        )
    lease = (
        {
            "reviewer": item.lease.reviewer,
            "start_time": _time(item.lease.start_time),
            "expire_time": _time(item.lease.expire_time),
        }
        if item.HasField("lease")
        else None
    )
    review = (
        {
            "outcome": ranking_pb2.ReviewOutcome.Name(item.review.outcome).removeprefix("REVIEW_OUTCOME_").lower(),
            "reviewer": item.review.reviewer,
            "label_version_id": item.review.label_version_id,
            "complete_time": _time(item.review.complete_time),
            "round_number": item.review.round_number,
        }
        if item.HasField("review")
        else None
    )
    return {
        "case_id": item.case_id,
        "series_id": item.series_id,
        "rank": item.rank,
        "priority": item.priority,
        "status": _STATUS_NAMES.get(item.status, "unspecified"),
        "round_number": item.round_number,
        "organs": organs,
        "labelled_organs": [organ_name(o) for o in item.labelled_organs],
        "human_decided_organs": [organ_name(o) for o in item.human_decided_organs],
        "label_version_id": item.label_version_id,
        "source_job_id": item.source_job_id,
        "update_time": _time(item.update_time),
        "lease": lease,
        "review": review,
        "has_attention_map": bool(item.heatmap.digest),
    }


def version_json(v: labels_pb2.LabelVersion) -> dict[str, Any]:
    return {
        "version_id": v.version_id,
        "case_id": v.case_id,
        "parent_version_id": v.parent_version_id,
        "source": labels_pb2.LabelSource.Name(v.provenance.source).removeprefix("LABEL_SOURCE_").lower(),
        "reviewer": v.provenance.reviewer,
        "model_version": v.provenance.model_version,
        "organs": [organ_name(o) for o in v.organs],
        "organ_provenance": [
            {
                "organ": organ_name(p.organ),
                "source": labels_pb2.LabelSource.Name(p.provenance.source).removeprefix("LABEL_SOURCE_").lower(),
                "reviewer": p.provenance.reviewer,
                "version_id": p.version_id,
            }
            for p in v.organ_provenance
        ],
        "create_time": _time(v.create_time),
        "geometry": geometry_json(v.geometry),
    }


def geometry_json(g: common_pb2.VolumeGeometry) -> dict[str, Any] | None:
    if not g.shape:
        return None
    a = list(g.affine)
    return {
        "shape": list(g.shape),
        "affine": [a[i * 4 : i * 4 + 4] for i in range(4)],
        "spacing_mm": list(g.spacing_mm),
    }


def round_json(r: ranking_pb2.Round) -> dict[str, Any]:
    return {
        "round_number": r.round_number,
        "budget_fraction": r.budget_fraction,
        "candidate_count": r.candidate_count,
        "case_count": r.case_count,
        "accepted_count": r.accepted_count,
        "revised_count": r.revised_count,
        "unreviewed_count": r.unreviewed_count,
        "state": ranking_pb2.RoundState.Name(r.state).removeprefix("ROUND_STATE_").lower(),
        "creator": r.creator,
        "create_time": _time(r.create_time),
        "close_time": _time(r.close_time),
    }


def _int(request: Request, name: str, default: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest("INVALID_ARGUMENT", f"{name} must be an integer", name) from None


def _case_id(request: Request) -> str:
    case_id = str(request.path_params["case_id"])
    if not is_valid_id(case_id):
        raise BadRequest("INVALID_ID", "case_id is not a valid identifier", "case_id")
    return case_id


def _duration(seconds: Any) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest("INVALID_LEASE_DURATION", "duration_s must be a positive number of seconds", "duration_s")
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _seconds(value: Any, field: str) -> float:
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise BadRequest("INVALID_REVIEW_TIME", f"{field} must be a finite number of seconds >= 0", field)
    return float(value)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        import json

        doc = json.loads(body)
    except ValueError:
        raise BadRequest("INVALID_JSON", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("INVALID_JSON", "the body must be a JSON object")
    return doc


# ---------------------------------------------------------------------------- handlers
class Api:
    def __init__(self, backends: Backends, sessions: Sessions, blobs: BlobStore) -> None:
        self.b = backends
        self.sessions = sessions
        self.blobs = blobs

    def _caller(self, request: Request) -> Caller:
        return self.sessions.caller(request)

    async def me(self, request: Request) -> Response:
        c = self._caller(request)
        return JSONResponse(
            {
                "subject": c.identity.subject,
                "roles": sorted(c.identity.roles),
                "via": "cookie" if c.via_cookie else "bearer",
            }
        )

    async def worklist(self, request: Request) -> Response:
        c = self._caller(request)
        q = request.query_params
        statuses = []
        for s in q.getlist("status"):
            if s not in STATUSES:
                raise BadRequest("INVALID_STATUS", f"status must be one of {sorted(STATUSES)}", "status")
            statuses.append(STATUSES[s])
        req = ranking_pb2.ListWorklistRequest(
            page_size=_int(request, "page_size", 50),
            page_token=q.get("page_token", ""),
            organs=[organ_value(o) for o in q.getlist("organ")],
            round_number=_int(request, "round", 0),
            statuses=statuses,
        )
        resp = await self.b.unary(self.b.ranking.ListWorklist, req, c.token)
        return JSONResponse(
            {
                "items": [item_json(i) for i in resp.items],
                "next_page_token": resp.next_page_token,
                "total_size": resp.total_size,
            }
        )

    async def rounds(self, request: Request) -> Response:
        c = self._caller(request)
        req = ranking_pb2.ListRoundsRequest(
            page_size=_int(request, "page_size", 50), page_token=request.query_params.get("page_token", "")
        )
        resp = await self.b.unary(self.b.ranking.ListRounds, req, c.token)
        return JSONResponse(
            {
                "rounds": [round_json(r) for r in resp.rounds],
                "next_page_token": resp.next_page_token,
                "total_size": resp.total_size,
            }
        )

    async def round(self, request: Request) -> Response:
        c = self._caller(request)
        raw = str(request.path_params["round"])
        number = 0 if raw == "current" else int(raw) if raw.isdigit() else -1
        if number < 0:
            raise BadRequest("INVALID_ARGUMENT", "round must be a number or 'current'", "round")
        resp = await self.b.unary(self.b.ranking.GetRound, ranking_pb2.GetRoundRequest(round_number=number), c.token)
        return JSONResponse(round_json(resp.round))

    async def _head_version(self, c: Caller, case_id: str) -> labels_pb2.LabelVersion | None:
        resp = await self.b.unary(
            self.b.labels.ListLabelVersions, labels_pb2.ListLabelVersionsRequest(case_id=case_id, page_size=1), c.token
        )
        return resp.versions[0] if resp.versions else None

    async def case(self, request: Request) -> Response:
        c = self._caller(request)
        case_id = _case_id(request)
        item = (
            await self.b.unary(
                self.b.ranking.GetWorklistItem, ranking_pb2.GetWorklistItemRequest(case_id=case_id), c.token
            )
        ).item
        head = await self._head_version(c, case_id)
        base = f"/api/v1/cases/{case_id}"
        return JSONResponse(
            {
                **item_json(item),
                "label_version": version_json(head) if head is not None else None,
                "links": {
                    "ct": f"{base}/ct.nii.gz",
                    "labels": f"{base}/labels.nii.gz",
                    "attention": f"{base}/attention.nii.gz",
                    "lease": f"{base}/lease",
                    "revisions": f"{base}/revisions",
                    "complete": f"{base}/complete",
                },
            }
        )

    async def versions(self, request: Request) -> Response:
        c = self._caller(request)
        req = labels_pb2.ListLabelVersionsRequest(
            case_id=_case_id(request),
            page_size=_int(request, "page_size", 50),
            page_token=request.query_params.get("page_token", ""),
        )
        resp = await self.b.unary(self.b.labels.ListLabelVersions, req, c.token)
        return JSONResponse(
            {"versions": [version_json(v) for v in resp.versions], "next_page_token": resp.next_page_token}
        )

    async def lease(self, request: Request) -> Response:
        c = self._caller(request)
        doc = await _json_body(request)
        req = ranking_pb2.LeaseCaseRequest(case_id=_case_id(request), lease_duration=_duration(doc.get("duration_s")))
        return JSONResponse(item_json((await self.b.unary(self.b.ranking.LeaseCase, req, c.token)).item))

    async def renew(self, request: Request) -> Response:
        c = self._caller(request)
        doc = await _json_body(request)
        req = ranking_pb2.RenewLeaseRequest(case_id=_case_id(request), lease_duration=_duration(doc.get("duration_s")))
        return JSONResponse(item_json((await self.b.unary(self.b.ranking.RenewLease, req, c.token)).item))

    async def release(self, request: Request) -> Response:
        c = self._caller(request)
        req = ranking_pb2.ReleaseLeaseRequest(case_id=_case_id(request))
        return JSONResponse(item_json((await self.b.unary(self.b.ranking.ReleaseLease, req, c.token)).item))

    async def lease_next(self, request: Request) -> Response:
        c = self._caller(request)
        doc = await _json_body(request)
        req = ranking_pb2.LeaseNextCaseRequest(lease_duration=_duration(doc.get("duration_s")))
        return JSONResponse(item_json((await self.b.unary(self.b.ranking.LeaseNextCase, req, c.token)).item))

    async def complete(self, request: Request) -> Response:
        c = self._caller(request)
        doc = await _json_body(request)
        outcomes = {"accepted": ranking_pb2.REVIEW_OUTCOME_ACCEPTED, "revised": ranking_pb2.REVIEW_OUTCOME_REVISED}
        outcome = doc.get("outcome")
        if outcome not in outcomes:
            raise BadRequest("INVALID_OUTCOME", "outcome must be 'accepted' or 'revised'", "outcome")
        req = ranking_pb2.CompleteReviewRequest(
            case_id=_case_id(request),
            outcome=outcomes[str(outcome)],
            label_version_id=str(doc.get("label_version_id", "")),
        )
        return JSONResponse(item_json((await self.b.unary(self.b.ranking.CompleteReview, req, c.token)).item))

    # -------------------------------------------------------------- volumes
    async def ct(self, request: Request) -> Response:
        c = self._caller(request)
        case_id = _case_id(request)
        head = await self._head_version(c, case_id)
        if head is not None and head.ct.digest:
            digest = head.ct.digest
        else:
            item = (
                await self.b.unary(
                    self.b.ranking.GetWorklistItem, ranking_pb2.GetWorklistItemRequest(case_id=case_id), c.token
                )
            ).item
            series = (
                await self.b.unary(
                    self.b.ingest.GetSeries, ingest_pb2.GetSeriesRequest(series_id=item.series_id), c.token
                )
            ).series
            digest = series.volume.digest
        if not digest:
            return HttpError(
                404, "VOLUME_NOT_FOUND", "the case has no assembled CT volume yet", {"case_id": case_id}
            ).response()
        return blob_response(self.blobs, digest, f"{case_id}_ct")

    async def labels(self, request: Request) -> Response:
        c = self._caller(request)
        case_id = _case_id(request)
        version_id = request.query_params.get("version_id", "")
        if version_id:
            if not is_valid_id(version_id):
                raise BadRequest("INVALID_ID", "version_id is not a valid identifier", "version_id")
            version = (
                await self.b.unary(
                    self.b.labels.GetLabelVersion, labels_pb2.GetLabelVersionRequest(version_id=version_id), c.token
                )
            ).version
            if version.case_id != case_id:
                return HttpError(
                    404, "VERSION_NOT_FOUND", "no such version of this case", {"version_id": version_id}
                ).response()
        else:
            head = await self._head_version(c, case_id)
            if head is None:
                return HttpError(
                    404, "CASE_NOT_FOUND", "the case has no label version", {"case_id": case_id}
                ).response()
            version = head
        return blob_response(
            self.blobs, version.label_map.digest, f"{case_id}_labels", {"X-Atlasflow-Label-Version": version.version_id}
        )

    async def attention(self, request: Request) -> Response:
        c = self._caller(request)
        case_id = _case_id(request)
        item = (
            await self.b.unary(
                self.b.ranking.GetWorklistItem, ranking_pb2.GetWorklistItemRequest(case_id=case_id), c.token
            )
        ).item
        if not item.heatmap.digest:
            return HttpError(
                404, "ATTENTION_NOT_FOUND", "the case has no attention map", {"case_id": case_id}
            ).response()
        return blob_response(self.blobs, item.heatmap.digest, f"{case_id}_attention")

    # -------------------------------------------------------------- revisions
    async def revise(self, request: Request) -> Response:
        """Body: ``{"parent_version_id", "request_id"?, "review_seconds"?, "complete"?: bool,
        "organs": [{"organ": "liver", "mask_nifti_b64" | "xor_delta_b64", "review_seconds"?}]}``.
        A whole mask is stored as a blob and referenced (mask_blob); a delta is passed as is."""
        c = self._caller(request)
        case_id = _case_id(request)
        doc = await _json_body(request)
        parent = str(doc.get("parent_version_id", ""))
        if not parent or not is_valid_id(parent):
            raise BadRequest(
                "INVALID_ARGUMENT",
                "parent_version_id is required (the version the reviewer corrected)",
                "parent_version_id",
            )
        request_id = str(doc.get("request_id") or uuid.uuid4().hex)
        if not is_valid_id(request_id):
            raise BadRequest("INVALID_ID", "request_id is not a valid identifier", "request_id")
        organs = doc.get("organs")
        if not isinstance(organs, list) or not organs:
            raise BadRequest("EMPTY_REVISION", "organs must list at least one revised organ", "organs")
        case_seconds = _seconds(doc.get("review_seconds"), "review_seconds")
        revisions = []
        for i, o in enumerate(organs):
            if not isinstance(o, dict):
                raise BadRequest("INVALID_ARGUMENT", "each organ must be an object", f"organs[{i}]")
            rev = labels_pb2.OrganRevision(
                organ=organ_value(str(o.get("organ", ""))),
                review_seconds=_seconds(o.get("review_seconds"), f"organs[{i}].review_seconds"),
            )
            try:
                if "mask_nifti_b64" in o:
                    data = base64.b64decode(str(o["mask_nifti_b64"]), validate=True)
                    info = self.blobs.put(data)
                    rev.mask_blob.CopyFrom(common_pb2.BlobRef(digest=info.digest, size_bytes=info.size_bytes))
                elif "xor_delta_b64" in o:
                    rev.xor_delta = base64.b64decode(str(o["xor_delta_b64"]), validate=True)
                else:
                    raise BadRequest(
                        "INVALID_ARGUMENT", "each organ needs mask_nifti_b64 or xor_delta_b64", f"organs[{i}]"
                    )
            except binascii.Error:
                raise BadRequest("INVALID_BASE64", "the mask is not valid base64", f"organs[{i}]") from None
            revisions.append(rev)
        req = labels_pb2.ReviseLabelsRequest(
            case_id=case_id,
            expected_parent_version_id=parent,
            revisions=revisions,
            request_id=request_id,
            review_seconds=case_seconds,
        )
        version = (await self.b.unary(self.b.labels.ReviseLabels, req, c.token)).version
        if case_seconds:
            REVIEW_SECONDS.labels("case").observe(case_seconds)
        for rev in revisions:
            if rev.review_seconds:
                REVIEW_SECONDS.labels("organ").observe(rev.review_seconds)
        log.info(
            "revision saved",
            extra={
                "case_id": case_id,
                "version_id": version.version_id,
                "review_seconds": case_seconds,
                "organs": ",".join(organ_name(r.organ) for r in revisions),
            },
        )
        out: dict[str, Any] = {"version": version_json(version)}
        if doc.get("complete"):
            done = await self.b.unary(
                self.b.ranking.CompleteReview,
                ranking_pb2.CompleteReviewRequest(
                    case_id=case_id, outcome=ranking_pb2.REVIEW_OUTCOME_REVISED, label_version_id=version.version_id
                ),
                c.token,
            )
            out["item"] = item_json(done.item)
        return JSONResponse(out, status_code=201)

    def routes(self) -> list[Route]:
        p = "/api/v1"
        return [
            Route(f"{p}/me", self.me, methods=["GET"]),
            Route(f"{p}/worklist", self.worklist, methods=["GET"]),
            Route(f"{p}/rounds", self.rounds, methods=["GET"]),
            Route(f"{p}/rounds/{{round}}", self.round, methods=["GET"]),
            Route(f"{p}/lease-next", self.lease_next, methods=["POST"]),
            Route(f"{p}/cases/{{case_id}}", self.case, methods=["GET"]),
            Route(f"{p}/cases/{{case_id}}/versions", self.versions, methods=["GET"]),
            Route(f"{p}/cases/{{case_id}}/lease", self.lease, methods=["POST"]),
            Route(f"{p}/cases/{{case_id}}/lease/renew", self.renew, methods=["POST"]),
            Route(f"{p}/cases/{{case_id}}/lease", self.release, methods=["DELETE"]),
            Route(f"{p}/cases/{{case_id}}/complete", self.complete, methods=["POST"]),
            Route(f"{p}/cases/{{case_id}}/ct.nii.gz", self.ct, methods=["GET"]),
            Route(f"{p}/cases/{{case_id}}/labels.nii.gz", self.labels, methods=["GET"]),
            Route(f"{p}/cases/{{case_id}}/attention.nii.gz", self.attention, methods=["GET"]),
            Route(f"{p}/cases/{{case_id}}/revisions", self.revise, methods=["POST"]),
        ]
