"""Authorisation as data: which roles may call which RPC (docs/security.md shows this table).

Deny by default: an RPC missing from `POLICY` is refused to everyone (PERMISSION_DENIED), and
`tests/common/test_common_policy.py` checks that every RPC of every atlasflow service is listed
and that docs/security.md shows exactly this table. Health and reflection need no token
(`EXEMPT_SERVICES`). The internal hand-offs (segmentation -> labels/ranking, labels -> ranking,
ingest -> segmentation, labels -> ingest for the SEG's source headers, training -> labels for
the decisions) accept only ``service``,
and each only from the services that make it (`HANDOFF_CALLERS`: one identity per service).

Roles (`atlasflow.common.auth.ROLES`):
- ``connector``: a PACS connector or modality gateway: sends studies, follows their processing;
- ``annotator``: reads cases and labels, works the worklist, revises labels;
- ``reviewer``: as annotator (the senior read);
- ``admin``: runs the campaign (rounds), exports, reads the audit, cancels jobs;
- ``service``: atlasflow's own workloads calling each other.
"""

from __future__ import annotations

from collections.abc import Mapping

from atlasflow.common.auth import Identity
from atlasflow.common.errors import PermissionDenied

DOMAIN = "atlasflow.auth"

#: RPCs callable without a token (full service names).
EXEMPT_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

_FOLLOW = frozenset({"connector", "annotator", "reviewer", "admin"})
_READ = frozenset({"annotator", "reviewer", "admin"})
_WORK = frozenset({"annotator", "reviewer"})
_SEND = frozenset({"connector", "admin"})
_ADMIN = frozenset({"admin"})
_SERVICE = frozenset({"service"})

_INGEST = "atlasflow.ingest.v1.IngestService"
_SEG = "atlasflow.segmentation.v1.SegmentationService"
_LABELS = "atlasflow.labels.v1.LabelService"
_RANK = "atlasflow.ranking.v1.RankingService"
_AUDIT = "atlasflow.common.v1.AuditService"
_TRAIN = "atlasflow.training.v1.TrainingService"

#: ``/<package>.<Service>/<Method>`` -> the roles allowed to call it.
POLICY: Mapping[str, frozenset[str]] = {
    # ingest
    f"/{_INGEST}/UploadInstances": _SEND,
    f"/{_INGEST}/GetUploadStatus": _SEND,
    f"/{_INGEST}/CommitSeries": _SEND,
    f"/{_INGEST}/GetSeries": _FOLLOW,
    f"/{_INGEST}/ListSeries": _FOLLOW,
    # full DICOM headers (patient data): the labels service building a SEG, or an admin
    f"/{_INGEST}/StreamSeriesInstances": _SERVICE | _ADMIN,
    # deletion of a whole study (docs/security.md "Deletion"); PurgeStudy are its hand-offs
    f"/{_INGEST}/DeleteStudy": _ADMIN,
    f"/{_INGEST}/GetDeletion": _ADMIN,
    # segmentation
    f"/{_SEG}/SegmentSeries": _SERVICE | _ADMIN,
    f"/{_SEG}/GetSegmentationJob": _FOLLOW | _SERVICE,
    f"/{_SEG}/ListSegmentationJobs": _FOLLOW,
    f"/{_SEG}/WaitSegmentationJob": _FOLLOW,
    f"/{_SEG}/CancelSegmentationJob": _ADMIN | _SERVICE,
    f"/{_SEG}/PurgeStudy": _SERVICE,
    # the roll-out of a promoted ensemble version and the re-inference of the undecided cases
    # (the training service, docs/training.md)
    f"/{_SEG}/ActivateEnsembleVersion": _SERVICE,
    f"/{_SEG}/ReinferCases": _SERVICE,
    # labels
    f"/{_LABELS}/CreateLabelVersion": _SERVICE | _ADMIN,
    f"/{_LABELS}/GetLabelVersion": _READ,
    # the training service reads the decisions (heads of all cases) as svc:training
    f"/{_LABELS}/ListLabelVersions": _READ | _SERVICE,
    f"/{_LABELS}/ReviseLabels": _WORK,
    f"/{_LABELS}/ExportDataset": _ADMIN,
    f"/{_LABELS}/GetExportJob": _ADMIN,
    f"/{_LABELS}/ListAuditRecords": _ADMIN,
    f"/{_LABELS}/PurgeStudy": _SERVICE,
    # the identified SEG of a version (DICOMweb through the gateway, as the user): it carries the
    # study's patient data, like StreamSeriesInstances, which only admin may read as a person
    f"/{_LABELS}/StreamLabelVersionSeg": _ADMIN,
    # ranking
    f"/{_RANK}/SubmitAttention": _SERVICE,
    f"/{_RANK}/RecordLabelVersion": _SERVICE,
    f"/{_RANK}/GetPopulationPrior": _SERVICE | _ADMIN,
    f"/{_RANK}/PurgeStudy": _SERVICE,
    f"/{_RANK}/ListWorklist": _WORK | _ADMIN | _SERVICE,
    # labels checks the reviewer's lease before accepting a revision (labels/ranking_leases.py)
    f"/{_RANK}/GetWorklistItem": _WORK | _ADMIN | _SERVICE,
    f"/{_RANK}/LeaseCase": _WORK,
    f"/{_RANK}/LeaseNextCase": _WORK,
    f"/{_RANK}/RenewLease": _WORK,
    f"/{_RANK}/ReleaseLease": _WORK,
    f"/{_RANK}/CompleteReview": _WORK,
    f"/{_RANK}/StartRound": _ADMIN,
    f"/{_RANK}/GetRound": _WORK | _ADMIN,
    f"/{_RANK}/ListRounds": _WORK | _ADMIN,
    # training: rounds of the loop (fine-tune, gate, promote) are an admin's campaign decision;
    # reviewers follow them (the model that labels their worklist)
    f"/{_TRAIN}/StartTrainingRun": _ADMIN,
    f"/{_TRAIN}/GetTrainingRun": _ADMIN | frozenset({"reviewer"}),
    f"/{_TRAIN}/ListTrainingRuns": _ADMIN | frozenset({"reviewer"}),
    f"/{_TRAIN}/CancelTrainingRun": _ADMIN,
    # the audit log every service serves on its own records (atlasflow.common.audit)
    f"/{_AUDIT}/ListAuditRecords": _ADMIN,
    f"/{_AUDIT}/ExportAuditRecords": _ADMIN,
}


def is_exempt(method: str) -> bool:
    """Health and reflection: ``method`` is ``/<service>/<Method>``."""
    return method.lstrip("/").split("/", 1)[0] in EXEMPT_SERVICES


_SVC_INGEST = "svc:ingest"
_SVC_SEG = "svc:segmentation"
_SVC_LABELS = "svc:labels"
_SVC_RANK = "svc:ranking"
_SVC_TRAIN = "svc:training"

#: The internal hand-offs: ``/<package>.<Service>/<Method>`` -> the service identities
#: (`atlasflow.common.auth.service_subject`) whose ``service`` role may call it. Every RPC
#: that POLICY allows to ``service`` is here, and only the services that really call it are
#: listed (least privilege: ingest, which parses untrusted DICOM, calls segmentation and the
#: deletion purges, nothing else). docs/security.md "Hand-off callers" shows this table.
HANDOFF_CALLERS: Mapping[str, frozenset[str]] = {
    # ingest's outbox: a committed series to segment; DeleteStudy's purges
    f"/{_SEG}/SegmentSeries": frozenset({_SVC_INGEST}),
    f"/{_SEG}/PurgeStudy": frozenset({_SVC_INGEST}),
    f"/{_LABELS}/PurgeStudy": frozenset({_SVC_INGEST}),
    f"/{_RANK}/PurgeStudy": frozenset({_SVC_INGEST}),
    # segmentation's outbox: the machine label version and the attention; its prior source
    f"/{_LABELS}/CreateLabelVersion": frozenset({_SVC_SEG}),
    f"/{_RANK}/SubmitAttention": frozenset({_SVC_SEG}),
    f"/{_RANK}/GetPopulationPrior": frozenset({_SVC_SEG}),
    # labels: the version-event outbox; the lease check of ReviseLabels; a DICOM SEG export's
    # source headers
    f"/{_RANK}/RecordLabelVersion": frozenset({_SVC_LABELS}),
    f"/{_RANK}/GetWorklistItem": frozenset({_SVC_LABELS}),
    f"/{_INGEST}/StreamSeriesInstances": frozenset({_SVC_LABELS}),
    # training: the decisions a round trains on (heads of all cases, with organ provenance)
    f"/{_LABELS}/ListLabelVersions": frozenset({_SVC_TRAIN}),
    # training's roll-out: activate the promoted version, re-segment the undecided cases in
    # the worklist's order, follow (and on cancel stop) those jobs
    f"/{_SEG}/ActivateEnsembleVersion": frozenset({_SVC_TRAIN}),
    f"/{_SEG}/ReinferCases": frozenset({_SVC_TRAIN}),
    f"/{_SEG}/GetSegmentationJob": frozenset({_SVC_TRAIN}),
    f"/{_SEG}/CancelSegmentationJob": frozenset({_SVC_TRAIN}),
    f"/{_RANK}/ListWorklist": frozenset({_SVC_TRAIN}),
}


def authorize(method: str, identity: Identity) -> None:
    """Raise PERMISSION_DENIED unless one of ``identity``'s roles may call ``method``: a role
    other than ``service`` that POLICY allows, or ``service`` from a service identity that
    `HANDOFF_CALLERS` lists for ``method`` (CALLER_NOT_ALLOWED otherwise)."""
    allowed = POLICY.get(method, frozenset())
    if (identity.roles - {"service"}) & allowed:
        return
    if "service" in identity.roles and "service" in allowed:
        if identity.service and identity.service in HANDOFF_CALLERS.get(method, frozenset()):
            return
        raise PermissionDenied(
            "CALLER_NOT_ALLOWED",
            "this service may not make this call",
            domain=DOMAIN,
            metadata={"method": method, "service": identity.service or "(none)"},
        )
    raise PermissionDenied(
        "ROLE_NOT_ALLOWED",
        "the caller's roles do not allow this call",
        domain=DOMAIN,
        metadata={"method": method, "roles": ",".join(sorted(identity.roles))},
    )
