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

from atlasflow.common.errors import DataLoss
from atlasflow.gateway import dicomparts as dp
from atlasflow.gateway.backends import Backends, HttpError, http_error_of
from atlasflow.gateway.session import Caller, Sessions
from atlasflow.ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)
audit = logging.getLogger("atlasflow.gateway.audit")
DICOM_JSON = "application/dicom+json"
#: bytes per UploadInstances message (ingest accepts at most 4 MiB)
UPLOAD_CHUNK = 1 << 20
#: a STOW-RS part is buffered up to its (7FE0,0010) PixelData tag, at most this many bytes
HEADER_PREFIX_BYTES = 16 << 20
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
#: STOW-RS FailureReason (PS3.4 Annex GG / PS3.18 Table I.2-3)
FAILURE_PROCESSING = 0x0110
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_REFUSED = 0x0124  # not authorized


class InstanceTooLarge(Exception):
    """A STOW-RS instance over the gateway's MAX_INSTANCE_BYTES."""


async def _header_prefix(content: AsyncIterator[bytes]) -> bytes:
    """The first bytes of a part: at least its DICOM header up to (7FE0,0010) PixelData, or the
    whole part when shorter, or `HEADER_PREFIX_BYTES` (a header larger than that is read as far
    as it goes)."""
    buf = bytearray()
    async for piece in content:
        buf += piece
        at = buf.find(PIXEL_DATA_TAG)
        if (at >= 0 and len(buf) >= at + 12) or len(buf) >= HEADER_PREFIX_BYTES:
            break
    return bytes(buf)


#: the catalogue's series id of a case's SEG (no ingest series holds it)
SEG_SERIES_PREFIX = "seg:"


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
        """(whole bytes as sent, last message) of each instance of ``series_id``. A caller that
        stops early (one instance, one header; close it with `aclosing`) cancels the rest of
        the stream: ingest sends nothing more."""
        buf = bytearray()
        call = self.b.stream_instances(c.token, series_id, headers_only=headers_only)
        try:
            async for msg in call:
                buf += msg.chunk
                if msg.last_chunk:
                    yield bytes(buf), msg
                    buf = bytearray()
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def _seg(self, c: Caller, case_id: str, *, headers_only: bool) -> bytes | None:
        """The identified DICOM SEG of the case's head label version (labels
        StreamLabelVersionSeg, as the user), or None when the case has none: no label version
        (404) or none that a SEG can be made of (409: e.g. a volume resampled from its source
        grid). Other refusals and failures raise."""
        buf = bytearray()
        sha = ""
        try:
            async for msg in self.b.stream_seg(c.token, case_id, headers_only=headers_only):
                buf += msg.chunk
                if msg.last_chunk:
                    sha = msg.sha256
        except grpc.RpcError as exc:
            err = http_error_of(exc)
            if err.status in (404, 409):
                log.info("no DICOM SEG for a case", extra={"reason": err.reason})
                return None
            raise
        if hashlib.sha256(buf).hexdigest() != sha:
            raise DataLoss("SEG_STREAM_BROKEN", "the DICOM SEG stream is incomplete", domain="atlasflow.gateway")
        return bytes(buf)

    async def _segs(self, c: Caller, case_ids: list[str], series_uid: str, sop_uid: str = "") -> list[dp.Instance]:
        """The SEG headers of ``case_ids`` (of one series / instance when given)."""
        out = []
        for case_id in case_ids:
            data = await self._seg(c, case_id, headers_only=True)
            if data is None:
                continue
            inst = dp.Instance(SEG_SERIES_PREFIX + case_id, dp.read_header(data))
            if (series_uid and inst.value("SeriesInstanceUID") != series_uid) or (
                sop_uid and inst.value("SOPInstanceUID") != sop_uid
            ):
                continue
            out.append(inst)
        return out

    async def _catalogue(self, c: Caller, study_uid: str = "", series_uid: str = "") -> list[dp.Instance]:
        """Headers of every stored instance (of one study / series when given), then the DICOM
        SEG of each study's head label version (a SEG series of the study: Modality SEG)."""
        out: list[dp.Instance] = []
        cases: dict[str, None] = {}  # the studies seen, in order
        for s in await self._series_ids(c):
            async with aclosing(self._instances(c, s.series_id, headers_only=True)) as it:
                async for data, _msg in it:
                    inst = dp.Instance(s.series_id, dp.read_header(data))
                    if study_uid and inst.value("StudyInstanceUID") != study_uid:
                        break  # a series belongs to one study: its first instance decides
                    cases[s.case_id] = None
                    if series_uid and inst.value("SeriesInstanceUID") != series_uid:
                        break
                    out.append(inst)
        return out + await self._segs(c, list(cases), series_uid)

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
    async def _study_series(self, c: Caller, study_uid: str) -> list[tuple[ingest_pb2.Series, str]]:
        """(atlasflow series, SeriesInstanceUID) of each stored series of the study."""
        out = []
        for s in await self._series_ids(c):
            async with aclosing(self._instances(c, s.series_id, headers_only=True)) as it:
                async for data, _msg in it:
                    h = dp.read_header(data)
                    if h.get("StudyInstanceUID") == study_uid:
                        out.append((s, str(h.get("SeriesInstanceUID", ""))))
                    break  # the first instance names the series' study and series
        return out

    async def _series_of(self, c: Caller, study_uid: str, series_uid: str) -> list[str]:
        """The atlasflow series ids holding the study (and series)."""
        return [s.series_id for s, uid in await self._study_series(c, study_uid) if not series_uid or uid == series_uid]

    async def _retrieve(self, request: Request) -> Response:
        c = self.sessions.caller(request)
        study, series, sop = (request.path_params.get(k, "") for k in ("study", "series", "instance"))
        in_study = await self._study_series(c, study)
        ids = [s.series_id for s, uid in in_study if not series or uid == series]
        segs: list[bytes] = []
        if not series or not ids:
            # the study's SEG (whole study, or a series that is no stored CT series)
            for case_id in dict.fromkeys(s.case_id for s, _uid in in_study):
                data = await self._seg(c, case_id, headers_only=False)
                if data is None:
                    continue
                h = dp.read_header(data)
                if (not series or h.get("SeriesInstanceUID") == series) and (not sop or h.get("SOPInstanceUID") == sop):
                    segs.append(data)
        if not ids and not segs:
            return HttpError(404, "NOT_FOUND", "no such study or series", {}).response()
        audit.info(
            "dicomweb retrieve",
            extra={
                "principal": c.identity.subject,
                "series_ids": ",".join(ids),
                "segs": len(segs),
                "instance": bool(sop),
            },
        )
        boundary = dp.new_boundary()

        async def body() -> AsyncIterator[bytes]:
            first = True
            for sid in ids:
                async with aclosing(self._instances(c, sid, headers_only=False)) as it:
                    async for data, _msg in it:
                        header = dp.read_header(data)
                        if sop and header.get("SOPInstanceUID") != sop:
                            continue
                        ts = header.file_meta.get("TransferSyntaxUID", "")
                        yield dp.part_header(boundary, f"application/dicom; transfer-syntax={ts}", first)
                        yield data
                        first = False
                        if sop:
                            break  # one instance: the rest of the series is not read
                if sop and not first:
                    break
            for data in segs:
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
        """STOW-RS: the multipart body is parsed as it arrives (`dp.MultipartReader`) and each
        instance streamed to ingest's UploadInstances (one call per instance, so that each gets
        its own status); the gateway holds one instance at a time (at most MAX_INSTANCE_BYTES),
        never the whole body."""
        c = self.sessions.caller(request)
        try:
            boundary = dp.boundary_of(request.headers.get("content-type", ""))
        except dp.QueryError as exc:
            return HttpError(415, "UNSUPPORTED_MEDIA_TYPE", str(exc), {}).response()
        study_filter = request.path_params.get("study", "")
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        max_bytes = self.b.settings.max_instance_bytes
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        reader = dp.MultipartReader(request.stream(), boundary)
        index = 0
        try:
            while (headers := await reader.next_part()) is not None:
                index += 1
                ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
                content = reader.content()
                prefix = await _header_prefix(content)
                sop_class = sop_uid = study_uid = series_uid = ""
                try:
                    h = dp.read_header(prefix)
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
                    continue  # next_part skips the rest of it
                try:
                    await self._upload(c, f"stow-{index}", prefix, content, max_bytes)
                except InstanceTooLarge:
                    log.info("stow instance refused", extra={"reason": "INSTANCE_TOO_LARGE"})
                    failed.append({**ref, "00081197": {"vr": "US", "Value": [FAILURE_OUT_OF_RESOURCES]}})
                    continue
                except grpc.RpcError as exc:
                    err = http_error_of(exc)
                    if err.status in (401, 403):
                        return err.response()  # the caller may not store at all
                    reason = (
                        FAILURE_OUT_OF_RESOURCES
                        if err.status == 429 or err.reason == "INSTANCE_TOO_LARGE"
                        else FAILURE_CANNOT_UNDERSTAND
                        if err.status == 400
                        else FAILURE_PROCESSING
                    )
                    log.info("stow instance refused", extra={"reason": err.reason})
                    failed.append({**ref, "00081197": {"vr": "US", "Value": [reason]}})
                    continue
                url = f"{base}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
                stored.append({**ref, "00081190": {"vr": "UR", "Value": [url]}})
        except dp.MultipartError as exc:
            # what was stored stays stored (acknowledged by ingest); the answer says what was not
            log.info("stow body malformed", extra={"reason": "INVALID_MULTIPART"})
            if not stored and not failed:
                return HttpError(400, "INVALID_MULTIPART", str(exc), {}).response()
            failed.append({"00081197": {"vr": "US", "Value": [FAILURE_CANNOT_UNDERSTAND]}})
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

    async def _upload(
        self, c: Caller, client_ref: str, prefix: bytes, rest: AsyncIterator[bytes], max_bytes: int
    ) -> ingest_pb2.UploadInstancesResponse:
        """One instance (``prefix`` then ``rest``, read up to ``max_bytes``: `InstanceTooLarge`
        past it, the rest of the part is skipped) sent to UploadInstances in messages of at most
        `UPLOAD_CHUNK` bytes, its SHA-256 on the last; the call's grpc.RpcError when ingest
        refuses it. One instance is held at a time, never the body."""
        buf = bytearray(prefix)
        if len(buf) > max_bytes:
            raise InstanceTooLarge(max_bytes)
        async for piece in rest:
            buf += piece
            if len(buf) > max_bytes:
                raise InstanceTooLarge(max_bytes)
        data = bytes(buf)
        del buf
        digest = hashlib.sha256(data).hexdigest()
        reqs = [
            ingest_pb2.UploadInstancesRequest(
                client_ref=client_ref,
                chunk=data[o : o + UPLOAD_CHUNK],
                last_chunk=o + UPLOAD_CHUNK >= len(data),
                sha256=digest if o + UPLOAD_CHUNK >= len(data) else "",
            )
            for o in range(0, max(len(data), 1), UPLOAD_CHUNK)
        ]
        return await self.b.upload(c.token, reqs)

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
