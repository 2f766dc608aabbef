"""DICOMweb under ``/dicomweb``: QIDO-RS, WADO-RS and STOW-RS over the ingest service's gRPC API,
as the user (docs/gateway.md "DICOMweb conformance").

Reads (QIDO-RS, WADO-RS) need the stored instances' headers and pixel data: ingest's
StreamSeriesInstances, which the policy allows to ``admin`` (and ``service``) only; a reviewer
works on the pseudonymous NIfTI of ``/api/v1`` (docs/security.md "Gateway"). Every DICOMweb
read is logged with the caller (logger ``atlasflow.gateway.audit``). Writes (STOW-RS) go
through UploadInstances, the reception path C-STORE uses (``connector``, ``admin``), one
instance per call so that each gets its own status.

The series are found with ListSeries and their headers with StreamSeriesInstances
(headers_only) on every request: nothing is cached, so the services' policy is asked each
time (a study search costs one header stream per series).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
import pydicom
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from atlasflow.gateway import dicomparts as dp
from atlasflow.gateway.backends import Backends, HttpError, http_error_of
from atlasflow.gateway.session import Caller, Sessions
from atlasflow.ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)
audit = logging.getLogger("atlasflow.gateway.audit")
DICOM_JSON = "application/dicom+json"
UPLOAD_CHUNK = 4 << 20
#: STOW-RS FailureReason (PS3.4 Annex GG / PS3.18 Table I.2-3)
FAILURE_PROCESSING = 0x0110
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_REFUSED = 0x0124  # not authorized


def _json(doc: Any, status: int = 200) -> Response:
    return JSONResponse(doc, status_code=status, media_type=DICOM_JSON)


class DicomWeb:
    def __init__(self, backends: Backends, sessions: Sessions) -> None:
        self.b = backends
        self.sessions = sessions

    # ------------------------------------------------------------------ the catalogue
    async def _series_ids(self, c: Caller) -> list[ingest_pb2.Series]:
        out: list[ingest_pb2.Series] = []
        token = ""
        while True:
            resp = await self.b.unary(
                self.b.ingest.ListSeries, ingest_pb2.ListSeriesRequest(page_size=1000, page_token=token), c.token
            )
            out.extend(s for s in resp.series if s.instance_count > 0)
            token = resp.next_page_token
            if not token:
                return out

    async def _instances(
        self, c: Caller, series_id: str, *, headers_only: bool
    ) -> AsyncGenerator[tuple[bytes, ingest_pb2.StreamSeriesInstancesResponse], None]:
        """(whole bytes as sent, last message) of each instance of ``series_id``."""
        buf = bytearray()
        call = self.b.stream_instances(c.token, series_id, headers_only=headers_only)
        done = False
        try:
            async for msg in call:
                buf += msg.chunk
                if msg.last_chunk:
                    yield bytes(buf), msg
                    buf = bytearray()
            done = True
        finally:
            if not done:
                # a caller that stops early (one instance, one header) reads the rest instead of
                # cancelling: a cancelled StreamSeriesInstances made ingest log "rpc crashed"
                # (an OpenTelemetry context ValueError) here; reported in docs/gateway.md
                async for _msg in call:
                    pass

    async def _catalogue(self, c: Caller, study_uid: str = "", series_uid: str = "") -> list[dp.Instance]:
        """Headers of every stored instance (of one study / series when given)."""
        out: list[dp.Instance] = []
        for s in await self._series_ids(c):
            async with aclosing(self._instances(c, s.series_id, headers_only=True)) as it:
                async for data, _msg in it:
                    inst = dp.Instance(s.series_id, dp.read_header(data))
                    if (study_uid and inst.value("StudyInstanceUID") != study_uid) or (
                        series_uid and inst.value("SeriesInstanceUID") != series_uid
                    ):
                        break  # a series belongs to one study: its first instance decides
                    out.append(inst)
        return out

    # ------------------------------------------------------------------ QIDO-RS
    async def _search(self, request: Request, level: str) -> Response:
        c = self.sessions.caller(request)
        study_uid = request.path_params.get("study", "")
        series_uid = request.path_params.get("series", "")
        keys = {"studies": dp.STUDY_KEYS, "series": dp.SERIES_KEYS, "instances": dp.INSTANCE_KEYS}[level]
        try:
            query, limit, offset, include = dp.parse_query(request.query_params.multi_items(), keys)
        except dp.QueryError as exc:
            return HttpError(400, "INVALID_QUERY", str(exc), {}).response()
        instances = [i for i in await self._catalogue(c, study_uid, series_uid) if dp.matches(i, query)]
        audit.info(
            "dicomweb search", extra={"principal": c.identity.subject, "level": level, "results": len(instances)}
        )
        groups: dict[str, list[dp.Instance]] = defaultdict(list)
        if level == "instances":
            results = [dp.instance_result(i, include) for i in instances]
        else:
            uid = "StudyInstanceUID" if level == "studies" else "SeriesInstanceUID"
            for i in instances:
                groups[i.value(uid)].append(i)
            make = dp.study_result if level == "studies" else dp.series_result
            results = [make(g, include) for g in groups.values()]
            if level == "studies" and "ModalitiesInStudy" in query:
                want = query["ModalitiesInStudy"]
                results = [r for r in results if want in r["00080061"]["Value"]]
        results = results[offset:]
        if limit:
            results = results[:limit]
        return _json(results) if results else Response(status_code=204)

    async def search_studies(self, request: Request) -> Response:
        return await self._search(request, "studies")

    async def search_series(self, request: Request) -> Response:
        return await self._search(request, "series")

    async def search_instances(self, request: Request) -> Response:
        return await self._search(request, "instances")

    # ------------------------------------------------------------------ WADO-RS
    async def _series_of(self, c: Caller, study_uid: str, series_uid: str) -> list[str]:
        """The atlasflow series ids holding the study (and series)."""
        ids = []
        for s in await self._series_ids(c):
            async with aclosing(self._instances(c, s.series_id, headers_only=True)) as it:
                async for data, _msg in it:
                    h = dp.read_header(data)
                    if h.get("StudyInstanceUID") == study_uid and (
                        not series_uid or h.get("SeriesInstanceUID") == series_uid
                    ):
                        ids.append(s.series_id)
                    break  # the first instance names the series' study and series
        return ids

    async def _retrieve(self, request: Request) -> Response:
        c = self.sessions.caller(request)
        study, series, sop = (request.path_params.get(k, "") for k in ("study", "series", "instance"))
        ids = await self._series_of(c, study, series)
        if not ids:
            return HttpError(404, "NOT_FOUND", "no such study or series", {}).response()
        audit.info(
            "dicomweb retrieve",
            extra={"principal": c.identity.subject, "series_ids": ",".join(ids), "instance": bool(sop)},
        )
        boundary = dp.new_boundary()

        async def body() -> AsyncIterator[bytes]:
            first = True
            for sid in ids:
                async for data, _msg in self._instances(c, sid, headers_only=False):
                    if sop and dp.read_header(data).get("SOPInstanceUID") != sop:
                        continue
                    ts = dp.read_header(data).file_meta.get("TransferSyntaxUID", "")
                    yield dp.part_header(boundary, f"application/dicom; transfer-syntax={ts}", first)
                    yield data
                    first = False
            if first:
                return
            yield dp.closing(boundary)

        # the first instance is read before answering, so that a refusal is an HTTP status
        stream = body()
        try:
            head = await anext(stream)
        except StopAsyncIteration:
            return HttpError(404, "NOT_FOUND", "no such instance", {}).response()

        async def all_parts() -> AsyncIterator[bytes]:
            yield head
            async for part in stream:
                yield part

        return StreamingResponse(
            all_parts(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}'
        )

    async def _metadata(self, request: Request) -> Response:
        c = self.sessions.caller(request)
        study, series, sop = (request.path_params.get(k, "") for k in ("study", "series", "instance"))
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        out = []
        for inst in await self._catalogue(c, study, series):
            if sop and inst.value("SOPInstanceUID") != sop:
                continue
            uri = f"{base}/studies/{study}/series/{inst.value('SeriesInstanceUID')}/instances/{inst.value('SOPInstanceUID')}/frames/1"
            out.append(dp.to_json(inst.header, bulk_uri=uri))
        audit.info("dicomweb metadata", extra={"principal": c.identity.subject, "instances": len(out)})
        if not out:
            return HttpError(404, "NOT_FOUND", "no such study, series or instance", {}).response()
        return _json(out)

    async def _frames(self, request: Request) -> Response:
        """Frames of an uncompressed single- or multi-frame instance (native pixel data)."""
        c = self.sessions.caller(request)
        study, series, sop = (request.path_params[k] for k in ("study", "series", "instance"))
        try:
            wanted = [int(f) for f in str(request.path_params["frames"]).split(",")]
        except ValueError:
            return HttpError(
                400, "INVALID_FRAME_LIST", "frames must be 1-based numbers separated by commas", {}
            ).response()
        found: pydicom.Dataset | None = None
        for sid in await self._series_of(c, study, series):
            async with aclosing(self._instances(c, sid, headers_only=False)) as it:
                async for data, _msg in it:
                    ds: pydicom.Dataset = pydicom.dcmread(io.BytesIO(data), force=True)
                    if ds.get("SOPInstanceUID") == sop:
                        found = ds
                        break
            if found is not None:
                break
        if found is None:
            return HttpError(404, "NOT_FOUND", "no such instance", {}).response()
        ds = found
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return HttpError(
                406, "FRAMES_COMPRESSED", "frames of compressed instances are not served; retrieve the instance", {}
            ).response()
        n = int(ds.get("NumberOfFrames", 1) or 1)
        size = len(ds.PixelData) // n
        if any(f < 1 or f > n for f in wanted):
            return HttpError(404, "FRAME_NOT_FOUND", f"frames are 1..{n}", {}).response()
        boundary = dp.new_boundary()
        parts = b"".join(
            dp.part_header(boundary, "application/octet-stream", i == 0) + ds.PixelData[(f - 1) * size : f * size]
            for i, f in enumerate(wanted)
        ) + dp.closing(boundary)
        audit.info("dicomweb frames", extra={"principal": c.identity.subject, "instance": sop})
        return Response(parts, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')

    # ------------------------------------------------------------------ STOW-RS
    async def store(self, request: Request) -> Response:
        c = self.sessions.caller(request)
        try:
            boundary = dp.boundary_of(request.headers.get("content-type", ""))
        except dp.QueryError as exc:
            return HttpError(415, "UNSUPPORTED_MEDIA_TYPE", str(exc), {}).response()
        body = await request.body()
        study_filter = request.path_params.get("study", "")
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for index, (headers, data) in enumerate(dp.split_parts(body, boundary)):
            ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            sop_class = sop_uid = study_uid = series_uid = ""
            try:
                h = dp.read_header(data)
                sop_class, sop_uid = str(h.get("SOPClassUID", "")), str(h.get("SOPInstanceUID", ""))
                study_uid, series_uid = str(h.get("StudyInstanceUID", "")), str(h.get("SeriesInstanceUID", ""))
            except Exception:  # noqa: BLE001 - not DICOM: reported per instance, ingest decides
                pass
            ref = {
                "00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
                "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"},
            }
            if ctype != "application/dicom" or (study_filter and study_uid != study_filter):
                failed.append({**ref, "00081197": {"vr": "US", "Value": [FAILURE_CANNOT_UNDERSTAND]}})
                continue
            digest = hashlib.sha256(data).hexdigest()
            reqs = [
                ingest_pb2.UploadInstancesRequest(
                    client_ref=f"stow-{index}",
                    chunk=data[o : o + UPLOAD_CHUNK],
                    last_chunk=o + UPLOAD_CHUNK >= len(data),
                    sha256=digest if o + UPLOAD_CHUNK >= len(data) else "",
                )
                for o in range(0, max(len(data), 1), UPLOAD_CHUNK)
            ]
            try:
                await self.b.upload(c.token, reqs)
            except grpc.RpcError as exc:
                err = http_error_of(exc)
                if err.status in (401, 403):
                    return err.response()  # the caller may not store at all
                reason = (
                    FAILURE_OUT_OF_RESOURCES
                    if err.status == 429
                    else FAILURE_CANNOT_UNDERSTAND
                    if err.status == 400
                    else FAILURE_PROCESSING
                )
                log.info("stow instance refused", extra={"reason": err.reason})
                failed.append({**ref, "00081197": {"vr": "US", "Value": [reason]}})
                continue
            url = f"{base}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
            stored.append({**ref, "00081190": {"vr": "UR", "Value": [url]}})
        audit.info(
            "dicomweb store", extra={"principal": c.identity.subject, "stored": len(stored), "failed": len(failed)}
        )
        doc: dict[str, Any] = {}
        if stored:
            doc["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            doc["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if stored and not failed else 202 if stored else 409
        return _json(doc, status)

    def routes(self) -> list[Route]:
        d = "/dicomweb"
        st, se, ins = "/studies/{study}", "/series/{series}", "/instances/{instance}"
        return [
            Route(f"{d}/studies", self.search_studies, methods=["GET"]),
            Route(f"{d}/studies", self.store, methods=["POST"]),
            Route(f"{d}{st}", self._retrieve, methods=["GET"]),
            Route(f"{d}{st}", self.store, methods=["POST"]),
            Route(f"{d}{st}/metadata", self._metadata, methods=["GET"]),
            Route(f"{d}/series", self.search_series, methods=["GET"]),
            Route(f"{d}{st}/series", self.search_series, methods=["GET"]),
            Route(f"{d}{st}{se}", self._retrieve, methods=["GET"]),
            Route(f"{d}{st}{se}/metadata", self._metadata, methods=["GET"]),
            Route(f"{d}/instances", self.search_instances, methods=["GET"]),
            Route(f"{d}{st}/instances", self.search_instances, methods=["GET"]),
            Route(f"{d}{st}{se}/instances", self.search_instances, methods=["GET"]),
            Route(f"{d}{st}{se}{ins}", self._retrieve, methods=["GET"]),
            Route(f"{d}{st}{se}{ins}/metadata", self._metadata, methods=["GET"]),
            Route(f"{d}{st}{se}{ins}/frames/{{frames}}", self._frames, methods=["GET"]),
        ]
