"""The review loop on a running stack: `atlasflow worklist`, `lease`, `review`, `versions`, `export`.

A radiologist's loop, from a terminal:

    atlasflow token --role reviewer --subject dr.lee > lee.token
    export ATLASFLOW_TOKEN_FILE=$PWD/lee.token
    atlasflow worklist --status pending            # ranked cases, per-organ reasons
    atlasflow lease case-3f2a...                   # take the case (or: lease --next)
    atlasflow review case-3f2a... --accept spleen,aorta --revise liver=liver_fixed.nii.gz
    atlasflow versions case-3f2a...                # the new version, author dr.lee
    atlasflow export --dest .atlasflow/exports/ds1 --wait   (role admin)

`review` writes ONE new label version through the labels service (ReviseLabels): accepted
organs as a confirmation (an all-zero XOR delta: the organ stays as drawn, now decided by a
human), revised organs as whole masks. A mask must already lie on the case's CT grid (same
(X, Y, Z) shape, same affine within 1e-4 mm): it is checked here, before anything is sent, and
never resampled. The mask file is stored in the stack's blob store (``<state-dir>/blobs``, the
embedded deployment's shared store, as the web gateway does) and referenced by digest. Then
ranking's CompleteReview closes the case (ACCEPTED when only organs were accepted, else
REVISED), unless ``--keep-lease``. `submit_review` is the same code path the demo's simulated
reviewer takes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import click
import grpc
import numpy as np

from atlasflow.cli.exitcodes import CliError, ExitCode, rpc_error
from atlasflow.cli.stack import (
    Stack,
    emit_json,
    json_option,
    poll,
    progress,
    progress_enabled,
    state_dir_option,
    token_file_option,
)
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc

#: the affine tolerance of the labels service (labels.proto, OrganRevision.mask_blob)
AFFINE_ATOL_MM = 1e-4
STATUSES = {
    name.removeprefix("WORKLIST_STATUS_").lower(): value
    for name, value in ranking_pb2.WorklistStatus.items()
    if value != ranking_pb2.WORKLIST_STATUS_UNSPECIFIED
}
OP_STATE = {v: k.removeprefix("OPERATION_STATE_").lower() for k, v in common_pb2.OperationState.items()}
DATES = {"removed": 1, "modified": 2, "full": 3}
RUNNING = (common_pb2.OPERATION_STATE_QUEUED, common_pb2.OPERATION_STATE_RUNNING)


# ----------------------------------------------------------------------------- conversions


def organ_of(name: str) -> int:
    """``liver`` (or ``ORGAN_LIVER``, ``5``) -> 5; `click.BadParameter` otherwise."""
    key = name.strip().lower().removeprefix("organ_").replace("-", "_").replace(" ", "_")
    if key.isdigit() and int(key) in ORGANS:
        return int(key)
    if key not in ORGAN_IDS:
        raise click.BadParameter(f"unknown organ {name!r}; one of {', '.join(ORGAN_IDS)}")
    return ORGAN_IDS[key]


def organs_of(values: Sequence[str]) -> list[int]:
    """Repeated and comma-separated organ names -> ids, in order, without repeats."""
    out: list[int] = []
    for value in values:
        for name in value.split(","):
            if name.strip() and (organ := organ_of(name)) not in out:
                out.append(organ)
    return out


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="seconds")


def _status(value: int) -> str:
    return ranking_pb2.WorklistStatus.Name(value).removeprefix("WORKLIST_STATUS_").lower()


def item_json(item: ranking_pb2.WorklistItem) -> dict[str, Any]:
    organs = []
    for o in item.organs:
        entry: dict[str, Any] = {
            "organ": ORGANS.get(o.organ, str(o.organ)),
            "attention_ml": round(o.attention_ml, 3),
            "heatmap_ml": round(o.heatmap_ml, 3),
            "volume_ml": round(o.volume_ml, 3),
            "reasons": list(o.reasons),
        }
        if o.HasField("score"):
            entry["score"] = o.score
        if o.HasField("pointer"):
            entry["slices"] = [o.pointer.slices.first, o.pointer.slices.last]
        organs.append(entry)
    doc: dict[str, Any] = {
        "case_id": item.case_id,
        "rank": item.rank,
        "priority": round(item.priority, 3),
        "status": _status(item.status),
        "round": item.round_number,
        "label_version_id": item.label_version_id,
        "organs": organs,
        "labelled_organs": [ORGANS.get(o, str(o)) for o in item.labelled_organs],
        "human_decided_organs": [ORGANS.get(o, str(o)) for o in item.human_decided_organs],
    }
    if item.HasField("lease"):
        doc["lease"] = {"reviewer": item.lease.reviewer, "expires": _time(item.lease.expire_time)}
    if item.HasField("review"):
        doc["review"] = {
            "outcome": ranking_pb2.ReviewOutcome.Name(item.review.outcome).removeprefix("REVIEW_OUTCOME_").lower(),
            "reviewer": item.review.reviewer,
            "label_version_id": item.review.label_version_id,
        }
    return doc


def author_of(p: labels_pb2.Provenance) -> str:
    if p.source == labels_pb2.LABEL_SOURCE_RADIOLOGIST:
        return p.reviewer or "radiologist"
    if p.source == labels_pb2.LABEL_SOURCE_AI:
        return f"ai:{p.model_version}" if p.model_version else "ai"
    if p.source == labels_pb2.LABEL_SOURCE_ORIGINAL:
        return "original"
    return ""


def version_json(v: labels_pb2.LabelVersion) -> dict[str, Any]:
    return {
        "version_id": v.version_id,
        "case_id": v.case_id,
        "parent_version_id": v.parent_version_id,
        "author": author_of(v.provenance),
        "source": labels_pb2.LabelSource.Name(v.provenance.source).removeprefix("LABEL_SOURCE_").lower(),
        "created": _time(v.create_time),
        "organs": [ORGANS.get(o, str(o)) for o in v.organs],
        "label_map_digest": v.label_map.digest,
        "shape": list(v.geometry.shape),
        "organ_authors": {ORGANS.get(p.organ, str(p.organ)): author_of(p.provenance) for p in v.organ_provenance},
    }


def job_json(job: labels_pb2.ExportJob) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "state": OP_STATE.get(job.state, str(job.state)),
        "cases_done": job.progress.cases_done,
        "cases_total": job.progress.cases_total,
        "destination_uri": job.destination_uri,
        "identity": labels_pb2.ExportIdentity.Name(job.identity).removeprefix("EXPORT_IDENTITY_").lower(),
        "pacs_destination_id": job.pacs_destination_id,
        "error_reason": job.error_reason,
        "dicom_seg": [
            {
                "case_id": s.case_id,
                "state": labels_pb2.DicomSegState.Name(s.state).removeprefix("DICOM_SEG_STATE_").lower(),
                "path": s.path,
                "reason": s.reason,
            }
            for s in job.dicom_seg_outcomes
        ],
    }


# ----------------------------------------------------------------------------- the review itself


def check_mask(
    array: np.ndarray, affine: np.ndarray, geometry: common_pb2.VolumeGeometry, organ: int, source: str
) -> None:
    """Refuse (`CliError` INVALID) a mask that is not on the case's grid or holds other values.

    array: (X, Y, Z) as stored in the NIfTI; affine: its (4, 4) voxel-to-world (RAS+ mm);
    geometry: the label version's (shape (X, Y, Z), 16 affine values row-major). Same rules as
    the labels service (shape equal, affine within 1e-4 mm, values 0 and 1 or the organ id):
    nothing is resampled or reoriented.
    """
    name = ORGANS[organ]
    want_shape = tuple(int(s) for s in geometry.shape)
    if array.ndim != 3 or tuple(array.shape) != want_shape:
        raise CliError(
            f"mask {source} for {name} has shape {tuple(array.shape)}, the case's volume is {want_shape}: "
            "the mask must lie on the CT's grid (it is not resampled)",
            ExitCode.INVALID,
        )
    want = np.asarray(geometry.affine, dtype=np.float64).reshape(4, 4)
    got = np.asarray(affine, dtype=np.float64)
    if not np.allclose(got, want, rtol=0.0, atol=AFFINE_ATOL_MM):
        worst = float(np.max(np.abs(got - want)))
        raise CliError(
            f"mask {source} for {name} has another affine than the case's volume (largest difference "
            f"{worst:.4g} mm, tolerance {AFFINE_ATOL_MM} mm): the mask must lie on the CT's grid "
            "(it is not resampled or reoriented)",
            ExitCode.INVALID,
        )
    if array.dtype.kind == "f" and not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
        raise CliError(f"mask {source} for {name} holds non-integer values", ExitCode.INVALID)
    if array.dtype.kind not in "iubf":
        raise CliError(f"mask {source} for {name} must hold integers, not {array.dtype}", ExitCode.INVALID)
    values = set(np.unique(array).tolist())
    if not values <= {0, 1, organ}:
        extra = sorted(values - {0, 1, organ})[:5]
        raise CliError(
            f"mask {source} for {name} must hold 0 and 1 (or {organ}, the organ's id); it holds {extra}",
            ExitCode.INVALID,
        )


def confirmation_delta(geometry: common_pb2.VolumeGeometry) -> bytes:
    """An all-zero XOR delta (labels.proto OrganRevision.xor_delta): the organ stays as drawn,
    and is now a human decision."""
    voxels = math.prod(int(s) for s in geometry.shape)
    return gzip.compress(bytes((voxels + 7) // 8), mtime=0)


def submit_review(
    labels: labels_pb2_grpc.LabelServiceStub,
    ranking: ranking_pb2_grpc.RankingServiceStub | None,
    parent: labels_pb2.LabelVersion,
    *,
    accept: Sequence[int] = (),
    masks: Mapping[int, common_pb2.BlobRef] | None = None,
    outcome: ranking_pb2.ReviewOutcome | None = None,
    request_id: str = "",
) -> tuple[labels_pb2.LabelVersion, ranking_pb2.WorklistItem | None]:
    """One reviewer's decision on a case, as a new label version whose parent is ``parent``:
    ``accept`` organs confirmed as drawn, ``masks`` organs replaced by these NIfTI blobs (on the
    CT grid, checked by the caller). With ``ranking``, CompleteReview closes the case with
    ``outcome`` (default ACCEPTED when nothing was revised, else REVISED). The caller holds the
    case's lease. Idempotent: the request id derives from the decision (a retry returns the
    version made the first time). Returns the new version and the completed worklist item."""
    masks = dict(masks or {})
    if not accept and not masks:
        raise CliError("nothing to submit: give --accept and/or --revise", ExitCode.USAGE)
    both = set(accept) & set(masks)
    if both:
        raise CliError(f"{', '.join(ORGANS[o] for o in sorted(both))}: both accepted and revised", ExitCode.USAGE)
    revisions = [labels_pb2.OrganRevision(organ=cast(common_pb2.Organ, o), mask_blob=masks[o]) for o in sorted(masks)]
    delta = confirmation_delta(parent.geometry) if accept else b""
    revisions += [labels_pb2.OrganRevision(organ=cast(common_pb2.Organ, o), xor_delta=delta) for o in sorted(accept)]
    if not request_id:
        key = "|".join([parent.case_id, parent.version_id, *(f"{o}:{masks[o].digest}" for o in sorted(masks))])
        key += "|" + ",".join(str(o) for o in sorted(accept))
        request_id = "cli-review-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    version = labels.ReviseLabels(
        labels_pb2.ReviseLabelsRequest(
            case_id=parent.case_id,
            expected_parent_version_id=parent.version_id,
            request_id=request_id,
            revisions=revisions,
        ),
        timeout=120,
    ).version
    if ranking is None:
        return version, None
    if outcome is None:
        outcome = ranking_pb2.REVIEW_OUTCOME_REVISED if masks else ranking_pb2.REVIEW_OUTCOME_ACCEPTED
    item = ranking.CompleteReview(
        ranking_pb2.CompleteReviewRequest(case_id=parent.case_id, outcome=outcome, label_version_id=version.version_id),
        timeout=60,
    ).item
    return version, item


def _reason(exc: grpc.RpcError) -> str:
    from atlasflow.common.server import error_info_of

    info = error_info_of(exc)
    return info.reason if info is not None else ""


def head_version(labels: labels_pb2_grpc.LabelServiceStub, case_id: str) -> labels_pb2.LabelVersion:
    versions = labels.ListLabelVersions(
        labels_pb2.ListLabelVersionsRequest(case_id=case_id, page_size=1), timeout=60
    ).versions
    if not versions:
        raise CliError(f"case {case_id} has no label version", ExitCode.NOT_FOUND)
    return versions[0]


# ----------------------------------------------------------------------------- commands

EPILOG_WORKLIST = """\b
Examples:
  atlasflow worklist
  atlasflow worklist --status pending --organ liver,pancreas --limit 10
  atlasflow worklist --round 3 --json | jq '.items[0].case_id'
"""


@click.command(epilog=EPILOG_WORKLIST)
@click.option(
    "--round", "round_number", type=click.IntRange(min=0), default=0, help="only cases of this round (0: any)"
)
@click.option(
    "--organ", "organ_names", multiple=True, help="only cases where this organ counts (repeat or comma-separate)"
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(list(STATUSES), case_sensitive=False),
    help="only cases with this status (repeatable)",
)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="at most this many cases")
@json_option
@state_dir_option()
@token_file_option()
def worklist(
    round_number: int,
    organ_names: tuple[str, ...],
    statuses: tuple[str, ...],
    limit: int,
    as_json: bool,
    state_dir: Path,
    token_file: Path | None,
) -> int:
    """The ranked worklist: rank, case, priority, status and per-organ reasons (ranking
    ListWorklist). Role reviewer, annotator or admin."""
    organs = organs_of(organ_names)
    stack = Stack.open(state_dir, token_file)
    stub = ranking_pb2_grpc.RankingServiceStub(stack.channel("ranking"))
    items: list[ranking_pb2.WorklistItem] = []
    token, total = "", 0
    while len(items) < limit:
        resp = stub.ListWorklist(
            ranking_pb2.ListWorklistRequest(
                page_size=min(limit - len(items), 1000),
                page_token=token,
                organs=[cast(common_pb2.Organ, o) for o in organs],
                round_number=round_number,
                statuses=[cast(ranking_pb2.WorklistStatus, STATUSES[s.lower()]) for s in statuses],
            ),
            timeout=60,
        )
        items.extend(resp.items)
        token, total = resp.next_page_token, resp.total_size
        if not token:
            break
    if as_json:
        emit_json({"total_size": total, "items": [item_json(i) for i in items]})
        return 0
    click.echo(f"{len(items)} of {total} case(s), highest priority first")
    click.echo(f"{'rank':>4}  {'case':30s} {'priority':>9}  {'status':9s} organs to review first")
    for item in items:
        top = ", ".join(f"{ORGANS.get(o.organ, o.organ)} {o.heatmap_ml:.1f} ml" for o in item.organs[:3])
        who = f" ({item.lease.reviewer})" if item.HasField("lease") else ""
        click.echo(f"{item.rank:>4}  {item.case_id:30s} {item.priority:>9.1f}  {_status(item.status):9s} {top}{who}")
        for o in item.organs[:3]:
            if o.reasons:
                where = ""
                if o.HasField("pointer"):
                    where = f" [slices {o.pointer.slices.first}-{o.pointer.slices.last}]"
                click.echo(f"{'':47s}- {'; '.join(o.reasons[:2])}{where}")
    return 0


EPILOG_LEASE = """\b
Examples:
  atlasflow lease case-3f2a...              take this case (or renew your lease on it)
  atlasflow lease --next                    take the top pending case of the open round
  atlasflow lease --renew                   renew every lease you hold
  atlasflow lease --release case-3f2a...    give it back (it becomes pending)
"""


@click.command(epilog=EPILOG_LEASE)
@click.argument("case_id", required=False)
@click.option("--next", "next_", is_flag=True, help="the highest-priority pending case of the open round")
@click.option("--release", is_flag=True, help="give the lease on CASE back")
@click.option("--renew", is_flag=True, help="extend the lease on CASE (without CASE: every lease you hold)")
@click.option(
    "--minutes",
    type=click.FloatRange(min=1 / 60, max=480),
    default=None,
    help="lease length (default: the server's, 15 min)",
)
@json_option
@state_dir_option()
@token_file_option()
def lease(
    case_id: str | None,
    next_: bool,
    release: bool,
    renew: bool,
    minutes: float | None,
    as_json: bool,
    state_dir: Path,
    token_file: Path | None,
) -> int:
    """Lease a case for review (ranking LeaseCase / LeaseNextCase / RenewLease / ReleaseLease).
    Role reviewer or annotator; a case leased by someone else is refused (exit 7)."""
    from google.protobuf.duration_pb2 import Duration

    if sum((next_, release, renew)) > 1:
        raise click.UsageError("give at most one of --next, --release, --renew")
    if next_ and case_id:
        raise click.UsageError("--next takes no CASE")
    if not case_id and not (next_ or renew):
        raise click.UsageError("give CASE, or --next, or --renew")
    duration = Duration(seconds=int(minutes * 60)) if minutes else None
    stack = Stack.open(state_dir, token_file)
    stub = ranking_pb2_grpc.RankingServiceStub(stack.channel("ranking"))
    items: list[ranking_pb2.WorklistItem] = []
    if next_:
        items.append(stub.LeaseNextCase(ranking_pb2.LeaseNextCaseRequest(lease_duration=duration), timeout=60).item)
    elif release:
        items.append(stub.ReleaseLease(ranking_pb2.ReleaseLeaseRequest(case_id=case_id), timeout=60).item)
    elif renew:
        cases = [case_id] if case_id else _my_leases(stub, stack.subject)
        for c in cases:
            items.append(
                stub.RenewLease(ranking_pb2.RenewLeaseRequest(case_id=c, lease_duration=duration), timeout=60).item
            )
        if not cases and not as_json:
            click.echo("you hold no lease")
    else:
        items.append(
            stub.LeaseCase(ranking_pb2.LeaseCaseRequest(case_id=case_id, lease_duration=duration), timeout=60).item
        )
    if as_json:
        emit_json({"items": [item_json(i) for i in items]})
        return 0
    for item in items:
        if item.HasField("lease"):
            click.echo(
                f"{item.case_id}: leased by {item.lease.reviewer} until {_time(item.lease.expire_time)} "
                f"(rank {item.rank}, priority {item.priority:.1f})"
            )
        else:
            click.echo(f"{item.case_id}: {_status(item.status)}")
    return 0


def _my_leases(stub: ranking_pb2_grpc.RankingServiceStub, subject: str) -> list[str]:
    mine, token = [], ""
    while True:
        resp = stub.ListWorklist(
            ranking_pb2.ListWorklistRequest(
                page_size=1000, page_token=token, statuses=[ranking_pb2.WORKLIST_STATUS_LEASED]
            ),
            timeout=60,
        )
        mine += [i.case_id for i in resp.items if subject and i.lease.reviewer == subject]
        token = resp.next_page_token
        if not token:
            return mine


def _revise_pairs(values: Sequence[str]) -> list[tuple[int, Path]]:
    out = []
    for value in values:
        organ, sep, path = value.partition("=")
        if not sep or not path:
            raise click.BadParameter(f"{value!r}: expected ORGAN=MASK.nii.gz", param_hint="--revise")
        p = Path(path)
        if not p.is_file():
            raise click.BadParameter(f"{path}: no such file", param_hint="--revise")
        out.append((organ_of(organ), p))
    return out


EPILOG_REVIEW = """\b
Examples:
  atlasflow review case-3f2a... --accept liver,spleen
  atlasflow review case-3f2a... --revise liver=liver_fixed.nii.gz --accept aorta
  atlasflow review case-3f2a... --revise pancreas=p.nii.gz --keep-lease --json

\b
A mask is a NIfTI (gzip allowed) on the case's CT grid: the same (X, Y, Z) shape and affine
(within 1e-4 mm) as the case's volume (`atlasflow versions CASE --json` shows the shape),
voxels 0 and 1 (or the organ id). A mask off the grid is refused before anything is sent
(exit 6); nothing is resampled. Lease the case first (`atlasflow lease CASE`).
"""


@click.command(epilog=EPILOG_REVIEW)
@click.argument("case_id")
@click.option("--accept", "accept_names", multiple=True, metavar="ORGAN[,ORGAN]", help="organs accepted as drawn")
@click.option("--revise", "revise_values", multiple=True, metavar="ORGAN=MASK.nii.gz", help="an organ's corrected mask")
@click.option("--parent", default="", help="the version you reviewed (default: the case's newest)")
@click.option("--keep-lease", is_flag=True, help="do not complete the review (more decisions follow)")
@click.option(
    "--blob-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="the stack's blob store, where masks are put (default: <state-dir>/blobs)",
)
@json_option
@state_dir_option()
@token_file_option()
def review(
    case_id: str,
    accept_names: tuple[str, ...],
    revise_values: tuple[str, ...],
    parent: str,
    keep_lease: bool,
    blob_dir: Path | None,
    as_json: bool,
    state_dir: Path,
    token_file: Path | None,
) -> int:
    """Accept organs of a case, or revise them from NIfTI masks: one new label version (labels
    ReviseLabels, you as its author), then ranking CompleteReview. Role reviewer or annotator,
    holding the case's lease."""
    accept = organs_of(accept_names)
    revise = _revise_pairs(revise_values)
    if not accept and not revise:
        raise click.UsageError("give --accept ORGAN[,ORGAN] and/or --revise ORGAN=MASK.nii.gz")
    if len({o for o, _ in revise}) != len(revise):
        raise click.UsageError("an organ is revised twice")
    stack = Stack.open(state_dir, token_file)
    labels = labels_pb2_grpc.LabelServiceStub(stack.channel("labels"))
    if parent:
        head = labels.GetLabelVersion(labels_pb2.GetLabelVersionRequest(version_id=parent), timeout=60).version
        if head.case_id != case_id:
            raise CliError(f"version {parent} belongs to {head.case_id}, not {case_id}", ExitCode.INVALID)
    else:
        head = head_version(labels, case_id)
    loaded = []
    for organ, path in revise:  # every mask checked before anything is stored or sent
        data = path.read_bytes()
        try:
            array, affine = from_nifti_bytes(data)
        except Exception as exc:  # nibabel raises several types for a file that is not NIfTI
            raise CliError(f"{path} is not a NIfTI file: {exc}", ExitCode.INVALID) from None
        check_mask(array, affine, head.geometry, organ, str(path))
        loaded.append((organ, data))
    masks: dict[int, common_pb2.BlobRef] = {}
    if loaded:
        from atlasflow.common.blobstore import LocalBlobStore

        store = LocalBlobStore(blob_dir or Path(state_dir) / "blobs")
        for organ, data in loaded:
            info = store.put(data)
            masks[organ] = common_pb2.BlobRef(digest=info.digest, size_bytes=info.size_bytes)
    ranking = None if keep_lease else ranking_pb2_grpc.RankingServiceStub(stack.channel("ranking"))
    try:
        version, item = submit_review(labels, ranking, head, accept=accept, masks=masks)
    except grpc.RpcError as exc:
        hint = ""
        if _reason(exc) == "LEASE_NOT_HELD":
            hint = f"lease the case first: atlasflow lease {case_id}"
        elif _reason(exc) == "PARENT_MISMATCH":
            hint = f"someone saved a newer version: `atlasflow versions {case_id}`, then review that one"
        raise rpc_error(exc, hint) from None
    if as_json:
        doc: dict[str, Any] = {"version": version_json(version)}
        if item is not None:
            doc["item"] = item_json(item)
        emit_json(doc)
        return 0
    decided = [f"revised {ORGANS[o]}" for o in sorted(masks)] + [f"accepted {ORGANS[o]}" for o in accept]
    click.echo(f"{case_id}: version {version.version_id} (parent {head.version_id}): {', '.join(decided)}")
    if item is not None:
        click.echo(f"{case_id}: review completed, status {_status(item.status)}")
    return 0


EPILOG_VERSIONS = """\b
Examples:
  atlasflow versions case-3f2a...
  atlasflow versions case-3f2a... --json | jq '.versions[0].version_id'
"""


@click.command(epilog=EPILOG_VERSIONS)
@click.argument("case_id")
@json_option
@state_dir_option()
@token_file_option()
def versions(case_id: str, as_json: bool, state_dir: Path, token_file: Path | None) -> int:
    """A case's label versions, newest first: id, author, created, organs, parent (labels
    ListLabelVersions). Role reviewer, annotator or admin."""
    stack = Stack.open(state_dir, token_file)
    stub = labels_pb2_grpc.LabelServiceStub(stack.channel("labels"))
    found: list[labels_pb2.LabelVersion] = []
    token = ""
    while True:
        resp = stub.ListLabelVersions(
            labels_pb2.ListLabelVersionsRequest(case_id=case_id, page_size=1000, page_token=token), timeout=60
        )
        found += resp.versions
        token = resp.next_page_token
        if not token:
            break
    if not found:
        raise CliError(f"case {case_id} has no label version", ExitCode.NOT_FOUND)
    if as_json:
        emit_json({"case_id": case_id, "versions": [version_json(v) for v in found]})
        return 0
    click.echo(f"{'version':34s} {'author':22s} {'created':25s} {'parent':34s} organs")
    for v in found:
        click.echo(
            f"{v.version_id:34s} {author_of(v.provenance):22s} {_time(v.create_time):25s} "
            f"{v.parent_version_id or '-':34s} {','.join(ORGANS.get(o, str(o)) for o in v.organs)}"
        )
    return 0


EPILOG_EXPORT = """\b
Examples:
  atlasflow export --dest .atlasflow/exports/ds1 --wait
  atlasflow export --dest .atlasflow/exports/ds2 --case case-3f2a... --seg --dates modified --wait
  atlasflow export --pacs research-pacs --wait          (a PACS the labels service configures)
  atlasflow export --dest .atlasflow/exports/ds3 --identified --wait   (admin; audited)

\b
The destination must lie inside the labels service's EXPORT_DIR (<state-dir>/exports for
`atlasflow up`); without --dest the export goes to <state-dir>/exports/export-<time>.
De-identified unless --identified. Role admin.
"""


@click.command(epilog=EPILOG_EXPORT)
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None, help="destination folder")
@click.option(
    "--pacs", "pacs_id", default="", help="also send each case's DICOM SEG to this configured PACS (implies --seg)"
)
@click.option("--case", "case_ids", multiple=True, help="only this case (repeatable; default: every case)")
@click.option("--seg", is_flag=True, help="also write a DICOM SEG per case")
@click.option("--identified", is_flag=True, help="keep patient identity (admin only, audited)")
@click.option("--dates", type=click.Choice(list(DATES)), default=None, help="de-identified dates (default removed)")
@click.option("--clean-descriptors", is_flag=True, help="keep cleaned descriptions (PS3.15 113105)")
@click.option("--wait", is_flag=True, help="follow the export until it ends (progress bar)")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="with --wait: give up after S seconds")
@json_option
@state_dir_option()
@token_file_option()
def export(
    dest: Path | None,
    pacs_id: str,
    case_ids: tuple[str, ...],
    seg: bool,
    identified: bool,
    dates: str | None,
    clean_descriptors: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
    state_dir: Path,
    token_file: Path | None,
) -> int:
    """Export the dataset in the AbdomenAtlas layout (labels ExportDataset, then GetExportJob)."""
    if identified and (dates or clean_descriptors):
        raise click.UsageError("--dates and --clean-descriptors apply to a de-identified export only")
    stack = Stack.open(state_dir, token_file)
    if dest is None:
        dest = Path(state_dir) / "exports" / time.strftime("export-%Y%m%d-%H%M%S")
    request = labels_pb2.ExportDatasetRequest(
        case_ids=list(case_ids),
        destination_uri=dest.resolve().as_uri(),
        include_dicom_seg=seg or bool(pacs_id),
        pacs_destination_id=pacs_id,
        identity=labels_pb2.EXPORT_IDENTITY_IDENTIFIED if identified else labels_pb2.EXPORT_IDENTITY_DEIDENTIFIED,
    )
    if not identified:
        request.deidentification.CopyFrom(
            labels_pb2.DeidentificationOptions(
                dates=cast(labels_pb2.DeidentificationDates, DATES[dates or "removed"]),
                clean_descriptors=clean_descriptors,
            )
        )
    stub = labels_pb2_grpc.LabelServiceStub(stack.channel("labels"))
    try:
        job = stub.ExportDataset(request, timeout=120).job
    except grpc.RpcError as exc:
        hint = ""
        if _reason(exc) in ("INVALID_DESTINATION", "DESTINATION_NOT_ALLOWED"):
            hint = "--dest must lie inside the labels service's EXPORT_DIR (<state-dir>/exports for `atlasflow up`)"
        raise rpc_error(exc, hint) from None
    if not as_json:
        click.echo(f"export {job.job_id} -> {dest} ({OP_STATE.get(job.state, job.state)})", err=wait)
    if wait:
        with progress("exporting", job.progress.cases_total, progress_enabled(as_json)) as bar:
            job = poll(
                lambda: stub.GetExportJob(labels_pb2.GetExportJobRequest(job_id=job.job_id), timeout=60).job,
                lambda j: j.state not in RUNNING,
                timeout_s=timeout,
                on_update=lambda j: bar.set(j.progress.cases_done, j.progress.cases_total),
            )
    if as_json:
        emit_json({"job": job_json(job), "destination": str(dest)})
    elif wait:
        click.echo(
            f"export {job.job_id}: {OP_STATE.get(job.state, job.state)}, "
            f"{job.progress.cases_done}/{job.progress.cases_total} case(s) in {dest}"
        )
        for s in job.dicom_seg_outcomes:
            state = labels_pb2.DicomSegState.Name(s.state).removeprefix("DICOM_SEG_STATE_").lower()
            click.echo(f"  {s.case_id}: DICOM SEG {state} {s.path or s.reason}")
    if wait and job.state != common_pb2.OPERATION_STATE_SUCCEEDED:
        raise CliError(f"export {job.job_id} {OP_STATE.get(job.state, job.state)}: {job.error_reason}")
    return 0


COMMANDS = (worklist, lease, review, versions, export)
