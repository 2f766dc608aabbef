"""Query/retrieve a study or series from a PACS into atlasflow (C-FIND + C-MOVE, or C-GET).

    atlasflow retrieve --pacs HOST:PORT --pacs-aet AET --study-uid UID [--series-uid UID]
                       [--move-dest AET] [--calling-aet AET] [--get --target HOST:PORT]

1. C-FIND, Study Root, STUDY level: the study must exist (else NO_MATCH); then SERIES level
   (optionally restricted to `--series-uid`): the CT series and their instance counts.
2. C-MOVE, Study Root, one request per matched series, to `--move-dest` (default ATLASFLOW,
   the ingest service's own SCP AE title: the PACS must know it as a DICOM modality with the
   SCP's host and port). The PACS opens its own association to that SCP, which files the
   instances durably (and deduplicates them) before it answers each C-STORE.
   With `--get`: C-GET instead, the instances arrive on this association (no PACS-side
   configuration of atlasflow) and are uploaded to the ingest gRPC API at `--target`.

The result is printed as JSON on stdout: the matched series (UID, modality, instance count as
the PACS reports it) and per series the sub-operation counts (completed, failed, warning).
Errors go to stderr with a reason and exit status 1: ASSOCIATION_REJECTED (with the
rejection's source and reason, e.g. "called AE title not recognised"), ASSOCIATION_FAILED (no
DICOM peer at the address), NO_MATCH, MOVE_FAILED / GET_FAILED (final status and sub-operation
counts), UPLOAD_FAILED (C-GET path). UIDs of the query appear only on stdout/stderr of this
command, never in log lines (pynetdicom's identifier logging is off).

Library use: `find_series`, `move_series`, `get_series` (no grpc in this module except the
C-GET upload, done through `atlasflow.ingest.client`).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # SOP classes are generated at import time
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from atlasflow.common.errors import AtlasflowError, FailedPrecondition, NotFound, Unavailable

DOMAIN = "atlasflow.ingest"
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
CT_STORAGE = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (source, reason) -> words.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: host, port, AE title."""

    host: str
    port: int
    ae_title: str


@dataclass
class SeriesMatch:
    """One SERIES-level C-FIND match."""

    series_uid: str
    modality: str
    instance_count: int | None  # (0020,1209) NumberOfSeriesRelatedInstances, if the PACS says


@dataclass
class TransferResult:
    """Outcome of a C-MOVE or C-GET of one series: final status and sub-operation counts
    ((0000,1021) completed, (0000,1022) failed, (0000,1023) warning)."""

    series_uid: str
    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    received: list[str] = field(default_factory=list)  # C-GET: files written


def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(ae: AE, pacs: Peer, handlers: list | None = None, ext_neg: list | None = None) -> Association:
    acse: list = []
    assoc = ae.associate(
        pacs.host,
        pacs.port,
        ae_title=pacs.ae_title,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, _nodelay),
            (evt.EVT_ACSE_RECV, lambda e: acse.append(e.primitive)),
            *(handlers or []),
        ],
        ext_neg=ext_neg,
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rj = acse[-1] if acse else None
        source, reason = (int(getattr(rj, "result_source", 0) or 0), int(getattr(rj, "diagnostic", 0) or 0))
        words = _REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
        raise Unavailable(
            "ASSOCIATION_REJECTED",
            f"the PACS rejected the association: {words}",
            domain=DOMAIN,
            metadata={"source": str(source), "reason": str(reason), "called_aet": pacs.ae_title},
        )
    if assoc.is_aborted:
        raise Unavailable(
            "ASSOCIATION_ABORTED",
            "the PACS aborted the association",
            domain=DOMAIN,
            metadata={"called_aet": pacs.ae_title},
        )
    raise Unavailable(
        "ASSOCIATION_FAILED",
        f"no DICOM association with {pacs.host}:{pacs.port}",
        domain=DOMAIN,
        metadata={"called_aet": pacs.ae_title},
    )


def _query(assoc: Association, ds: Dataset) -> Iterator[Dataset]:
    for status, identifier in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise Unavailable("FIND_FAILED", "C-FIND got no response", domain=DOMAIN)
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if identifier is not None:
                yield identifier
        elif code != 0x0000:
            raise FailedPrecondition(
                "FIND_FAILED",
                f"C-FIND failed with status 0x{code:04X}",
                domain=DOMAIN,
                metadata={"status": f"0x{code:04X}"},
            )


def find_series(pacs: Peer, calling_aet: str, study_uid: str, series_uid: str | None = None) -> list[SeriesMatch]:
    """C-FIND at STUDY then SERIES level. Raises NotFound NO_MATCH when the study (or the
    series) is not on the PACS."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, pacs)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        q.NumberOfStudyRelatedSeries = ""
        if not list(_query(assoc, q)):
            raise NotFound(
                "NO_MATCH",
                "the PACS has no study with this StudyInstanceUID",
                domain=DOMAIN,
                metadata={"level": "STUDY"},
            )
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid or ""
        q.Modality = ""
        q.NumberOfSeriesRelatedInstances = ""
        matches = []
        for ident in _query(assoc, q):
            n = ident.get("NumberOfSeriesRelatedInstances", None)
            matches.append(
                SeriesMatch(
                    str(ident.get("SeriesInstanceUID", "")),
                    str(ident.get("Modality", "") or ""),
                    int(n) if n not in (None, "") else None,
                )
            )
    finally:
        assoc.release()
    if not matches:
        raise NotFound(
            "NO_MATCH", "the PACS has no such series in the study", domain=DOMAIN, metadata={"level": "SERIES"}
        )
    return matches


def _identifier(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _track(result: TransferResult, responses: Iterator, what: str) -> TransferResult:
    """Consume C-MOVE/C-GET responses; the final one's status and counts go in `result`."""
    last = None
    for status, _identifier in responses:
        if not status:
            raise Unavailable(
                f"{what}_FAILED",
                f"C-{what} got no response (association lost)",
                domain=DOMAIN,
                metadata=_counts(result),
            )
        last = status
        result.status = int(status.Status)
        for attr, name in (
            ("completed", "NumberOfCompletedSuboperations"),
            ("failed", "NumberOfFailedSuboperations"),
            ("warning", "NumberOfWarningSuboperations"),
        ):
            if name in status:
                setattr(result, attr, int(status[name].value or 0))
    if last is None:
        raise Unavailable(f"{what}_FAILED", f"C-{what} got no response", domain=DOMAIN)
    if result.status not in (0x0000, 0xB000) or result.failed:
        raise FailedPrecondition(
            f"{what}_FAILED",
            f"C-{what} ended with status 0x{result.status:04X} ({_describe(result.status)}):"
            f" {result.completed} completed, {result.failed} failed, {result.warning} warning",
            domain=DOMAIN,
            metadata=_counts(result),
        )
    return result


def _counts(r: TransferResult) -> dict[str, str]:
    return {
        "status": f"0x{r.status:04X}",
        "completed": str(r.completed),
        "failed": str(r.failed),
        "warning": str(r.warning),
    }


def _describe(status: int) -> str:
    if status == 0xA801:
        return "move destination unknown"
    if status >> 8 == 0xA7:
        return "out of resources"
    if status == 0xB000:
        return "some sub-operations failed"
    if status == 0xFE00:
        return "cancelled"
    if status >> 8 == 0xA9:
        return "identifier does not match SOP class"
    if status >> 12 == 0xC:
        return "unable to process"
    return "failure"


def move_series(pacs: Peer, calling_aet: str, move_dest: str, study_uid: str, series_uid: str) -> TransferResult:
    """C-MOVE one series to `move_dest`; raises FailedPrecondition MOVE_FAILED unless every
    sub-operation completed (or only warnings)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = _associate(ae, pacs)
    try:
        return _track(
            TransferResult(series_uid),
            assoc.send_c_move(
                _identifier(study_uid, series_uid), move_dest, StudyRootQueryRetrieveInformationModelMove
            ),
            "MOVE",
        )
    finally:
        if assoc.is_established:
            assoc.release()


def get_series(
    pacs: Peer,
    calling_aet: str,
    study_uid: str,
    series_uid: str,
    out_dir: Path,
    on_file: Callable[[Path], None] = lambda _p: None,
) -> TransferResult:
    """C-GET one series; every instance received is written to `out_dir` as a Part-10 file
    (the sub-operation is answered Success only after the file is written)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop in CT_STORAGE:
        ae.add_requested_context(sop)
    roles = [build_role(sop, scp_role=True) for sop in CT_STORAGE]
    result = TransferResult(series_uid)
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        path = out_dir / f"{len(result.received):06d}.dcm"
        path.write_bytes(event.encoded_dataset(include_meta=True))
        result.received.append(str(path))
        on_file(path)
        return 0x0000

    assoc = _associate(ae, pacs, [(evt.EVT_C_STORE, on_store)], ext_neg=roles)
    try:
        return _track(
            result,
            assoc.send_c_get(_identifier(study_uid, series_uid), StudyRootQueryRetrieveInformationModelGet),
            "GET",
        )
    finally:
        if assoc.is_established:
            assoc.release()


def _peer(value: str, aet: str) -> Peer:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return Peer(host, int(port), aet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atlasflow retrieve", description=__doc__.splitlines()[0])
    p.add_argument("--pacs", required=True, help="HOST:PORT of the PACS's DICOM service")
    p.add_argument("--pacs-aet", required=True, help="AE title of the PACS (called AE)")
    p.add_argument("--study-uid", required=True)
    p.add_argument("--series-uid", help="retrieve only this series of the study")
    p.add_argument(
        "--move-dest",
        default="ATLASFLOW",
        help="C-MOVE destination AE title (atlasflow ingest's SCP, known to the PACS)",
    )
    p.add_argument("--calling-aet", default="ATLASFLOW_QR", help="our AE title towards the PACS")
    p.add_argument(
        "--get", action="store_true", help="C-GET instead of C-MOVE; instances are uploaded to --target over gRPC"
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="ingest gRPC address (--get)")
    p.add_argument(
        "--token-file", default="", help="bearer token for the upload (--get; default $ATLASFLOW_TOKEN_FILE)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pacs = _peer(args.pacs, args.pacs_aet)
    except argparse.ArgumentTypeError as exc:
        print(f"atlasflow retrieve: {exc}", file=sys.stderr)
        return 2
    report: dict = {"study_uid": args.study_uid, "series": [], "transfers": []}
    try:
        matches = find_series(pacs, args.calling_aet, args.study_uid, args.series_uid)
        report["series"] = [asdict(m) for m in matches]
        for m in matches:
            if args.get:
                with tempfile.TemporaryDirectory(prefix="atlasflow-get-") as tmp:
                    r = get_series(pacs, args.calling_aet, args.study_uid, m.series_uid, Path(tmp))
                    receipts = _upload([Path(p) for p in r.received], args.target, args.token_file)
                    r.received = []
                    entry = {**asdict(r), "uploaded": len(receipts)}
            else:
                r = move_series(pacs, args.calling_aet, args.move_dest, args.study_uid, m.series_uid)
                entry = asdict(r)
            entry.pop("received", None)
            report["transfers"].append(entry)
    except AtlasflowError as exc:
        print(json.dumps(report, indent=2))
        detail = ", ".join(f"{k}={v}" for k, v in exc.metadata.items())
        print(f"atlasflow retrieve: {exc.reason}: {exc.message}" + (f" ({detail})" if detail else ""), file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def _upload(paths: list[Path], target: str, token_file: str = "") -> list:
    from atlasflow.common.auth import TokenSource
    from atlasflow.ingest.client import UploadError, send_files

    try:
        return send_files(paths, target, token=TokenSource(path=token_file) if token_file else None)
    except UploadError as exc:
        raise Unavailable(
            "UPLOAD_FAILED", f"upload to ingest failed: {exc}", domain=DOMAIN, metadata={"target": target}
        ) from None


if __name__ == "__main__":
    sys.exit(main())
