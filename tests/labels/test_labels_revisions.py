"""Label assembly, revisions (whole masks and XOR deltas), per-organ provenance, the audit
trail, through a real LabelService gRPC server (in-process, port 0) on both backends."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from atlasflow.common.auth import TokenVerifier
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.server import build_server, error_info_of
from atlasflow.common.v1 import common_pb2
from atlasflow.labels.assembly import apply_revision, assemble, decode_mask_delta, encode_mask_delta
from atlasflow.labels.deid import Pseudonymizer
from atlasflow.labels.events import ranking_request
from atlasflow.labels.repository import OrganProvenance, Provenance
from atlasflow.labels.servicer import LabelServicer, review_seconds_histogram
from atlasflow.labels.storage import open_repository
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.labels.worker import Exporter
from atlasflow.testing import auth

AFFINE = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -40.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
SHAPE = (12, 10, 8)
AI = Provenance("ai", model_version="trio-v1")
ORIG = Provenance("original", model_version="btcv")
RAD = Provenance("radiologist", reviewer="dr-a")


# ------------------------------------------------------------------ array logic


def _map(**boxes: tuple[slice, ...]) -> np.ndarray:
    ids = {"liver": 5, "spleen": 8, "aorta": 1, "stomach": 9}
    m = np.zeros(SHAPE, np.uint8)
    for name, box in boxes.items():
        m[box] = ids[name]
    return m


@pytest.mark.parametrize(
    "head_source,new_source,labelled,liver_from",
    [
        (None, "ai", (), "new"),
        ("ai", "ai", (), "new"),  # AI replaces AI
        ("ai", "original", (), "new"),  # original supersedes AI
        ("original", "ai", (), "head"),  # AI never overrides a human label
        ("radiologist", "ai", (), "head"),
        ("original", "radiologist", (), "new"),  # the revision supersedes the original
        ("radiologist", "original", (), "new"),  # latest human decision wins
        ("ai", "original", (8,), "head"),  # partial labels: liver not labelled
    ],
)
def test_assembly_precedence(head_source, new_source, labelled, liver_from):
    head = _map(liver=np.s_[0:6, 0:5, :], spleen=np.s_[8:12, 0:4, :])
    new = _map(liver=np.s_[0:5, 0:5, :], spleen=np.s_[7:12, 0:4, :], aorta=np.s_[5:7, 5:7, :])
    new_prov = Provenance(new_source)
    head_prov = (
        None if head_source is None else {o: OrganProvenance(Provenance(head_source), "h") for o in range(1, 10)}
    )
    out, prov = assemble(None if head_source is None else head, head_prov, new, new_prov, labelled)
    want_liver = (head if liver_from == "head" else new) == 5
    assert np.array_equal(out == 5, want_liver)
    assert prov[5] == (head_prov[5] if liver_from == "head" else OrganProvenance(new_prov, ""))
    if 8 in (labelled or range(1, 10)) and not (head_source in ("original", "radiologist") and new_source == "ai"):
        assert np.array_equal(out == 8, new == 8)


def test_kept_human_organ_wins_contested_voxels():
    head = _map(liver=np.s_[0:6, :, :])
    new = _map(liver=np.s_[0:3, :, :], spleen=np.s_[3:8, :, :])  # AI spleen eats the liver
    prov = {o: OrganProvenance(ORIG if o == 5 else AI, "h") for o in range(1, 10)}
    out, organ_prov = assemble(head, prov, new, AI)
    assert np.array_equal(out == 5, head == 5)
    assert np.array_equal(out == 8, (new == 8) & (head != 5))
    assert organ_prov[8] == OrganProvenance(AI, "") and organ_prov[5].provenance == ORIG


def test_apply_revision_and_overlap():
    parent = _map(liver=np.s_[0:6, :, :], spleen=np.s_[6:9, :, :])
    liver = np.zeros(SHAPE, bool)
    liver[0:7] = True  # grows into the spleen
    out = apply_revision(parent, {5: liver})
    assert np.array_equal(out == 5, liver)
    assert np.array_equal(out == 8, (parent == 8) & ~liver)
    with pytest.raises(InvalidArgument) as e:
        apply_revision(parent, {5: liver, 8: liver})
    assert e.value.reason == "REVISION_OVERLAP"


@pytest.mark.parametrize("shape", [(12, 10, 8), (7, 3, 5), (1, 1, 1)])
def test_delta_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    parent = rng.random(shape) > 0.7
    new = parent.copy()
    new[tuple(rng.integers(0, s) for s in shape)] ^= True
    delta = encode_mask_delta(parent, new)
    assert np.array_equal(decode_mask_delta(parent, delta), new)
    assert np.array_equal(decode_mask_delta(parent, encode_mask_delta(parent, parent)), parent)


def test_delta_layout_is_fortran_lsb_first():
    """The documented format, built by hand: voxel (1, 0, 0) is bit 1 of byte 0,
    voxel (0, 1, 0) is bit X of the stream."""
    parent = np.zeros((3, 4, 2), bool)
    flips = np.zeros(24, np.uint8)
    flips[1] = 1  # x=1, y=0, z=0
    flips[3 * 1] = 1  # x=0, y=1, z=0
    delta = gzip.compress(np.packbits(flips, bitorder="little").tobytes())
    new = decode_mask_delta(parent, delta)
    assert new[1, 0, 0] and new[0, 1, 0] and new.sum() == 2


@pytest.mark.parametrize(
    "delta",
    [
        b"not gzip",
        gzip.compress(b"\x00" * 2),  # too short (needs 3 bytes for 24 voxels)
        gzip.compress(b"\x00" * 4),  # too long
        gzip.compress(b"\x00" * 10_000_000),  # a bomb: refused without inflating it all
        gzip.compress(b"\x00" * 3)[:-4],  # truncated
    ],
)
def test_bad_deltas(delta):
    with pytest.raises(InvalidArgument) as e:
        decode_mask_delta(np.zeros((3, 4, 2), bool), delta, 5)
    assert e.value.reason == "INVALID_MASK_DELTA"


def test_delta_padding_bits_refused():
    with pytest.raises(InvalidArgument):
        decode_mask_delta(np.zeros((3, 3, 1), bool), gzip.compress(bytes([0, 0x80])), 5)


# ------------------------------------------------------------------ the service


@pytest.fixture(params=["sqlite", "postgres"])
def service(request, tmp_path):
    """(stub, blob store, repository, export dir) of a running LabelService."""
    url = request.getfixturevalue("pg_database")() if request.param == "postgres" else ""
    repo = open_repository(url, tmp_path / "data")
    blobs = LocalBlobStore(tmp_path / "blobs")
    metrics = Metrics("labels-test")
    exporter = Exporter(repo, blobs, metrics, pseudonymizer=Pseudonymizer(b"revisions-test-key-0123456789"))
    loop = asyncio.new_event_loop()

    async def start():
        def register(server):
            servicer = LabelServicer(repo, blobs, exporter, tmp_path)
            servicer.review_histogram = review_seconds_histogram(metrics.registry)  # as labels/app.py does
            labels_pb2_grpc.add_LabelServiceServicer_to_server(servicer, server)
            return [labels_pb2.DESCRIPTOR.services_by_name["LabelService"].full_name]

        built = build_server(register=register, metrics=metrics, port=0, verifier=TokenVerifier(auth.issuer().config()))
        await built.server.start()
        return built

    built = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{built.port}")
    yield labels_pb2_grpc.LabelServiceStub(channel), blobs, repo, exporter, tmp_path
    channel.close()
    asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    repo.close()


@functools.cache  # one token per person and role (minted once, before any racing threads use it)
def _who(name: str, role: str = "reviewer") -> tuple[tuple[str, str], ...]:
    """Call metadata: a token for ``name`` with ``role`` (the principal of the audit trail)."""
    return auth.metadata(role, subject=name)


def _ref(blobs, data: bytes) -> common_pb2.BlobRef:
    return common_pb2.BlobRef(digest=blobs.put(data).digest)


#: the author CreateLabelVersion records for segmentation's hand-off (the verified caller)
SEG = "svc:segmentation"


def _create(stub, blobs, case, labels, ct_ref, source, organs=(), who=SEG, parent=""):
    return stub.CreateLabelVersion(
        labels_pb2.CreateLabelVersionRequest(
            case_id=case,
            label_map=_ref(blobs, to_nifti_bytes(labels, AFFINE)),
            ct=ct_ref,
            provenance=labels_pb2.Provenance(source=source, model_version="m"),
            request_id=uuid.uuid4().hex,
            labelled_organs=list(organs),
            expected_parent_version_id=parent,
        ),
        metadata=_who(who, "service"),
    ).version


def _labels(blobs, version) -> np.ndarray:
    arr, aff = from_nifti_bytes(blobs.get(version.label_map.digest))
    assert np.allclose(aff, AFFINE)
    return arr


def _reason(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    info = error_info_of(e.value)
    return e.value.code(), info.reason if info else ""


def _prov(version) -> dict[int, tuple[int, str, str]]:
    return {op.organ: (op.provenance.source, op.provenance.reviewer, op.version_id) for op in version.organ_provenance}


def test_revision_lifecycle(service):
    stub, blobs, repo, exporter, tmp = service
    ct = np.full(SHAPE, -50, np.int16)
    ct_ref = _ref(blobs, to_nifti_bytes(ct, AFFINE))
    ai_map = _map(liver=np.s_[0:6, 0:5, :], spleen=np.s_[8:12, 0:4, :], stomach=np.s_[6:9, 6:10, :])
    v1 = _create(stub, blobs, "case-1", ai_map, ct_ref, labels_pb2.LABEL_SOURCE_AI)
    assert len(v1.organ_provenance) == 9
    assert set(_prov(v1).values()) == {(labels_pb2.LABEL_SOURCE_AI, SEG, v1.version_id)}

    # original labels for the liver only (partial labels): liver becomes "original"
    orig_map = _map(liver=np.s_[0:5, 0:6, :])
    v2 = _create(stub, blobs, "case-1", orig_map, ct_ref, labels_pb2.LABEL_SOURCE_ORIGINAL, organs=[5])
    got = _labels(blobs, v2)
    assert np.array_equal(got == 5, orig_map == 5)
    assert np.array_equal(got == 8, ai_map == 8)
    assert _prov(v2)[5] == (labels_pb2.LABEL_SOURCE_ORIGINAL, SEG, v2.version_id)
    assert _prov(v2)[8] == (labels_pb2.LABEL_SOURCE_AI, SEG, v1.version_id)

    # a new AI run must not overwrite the original liver
    ai2 = _map(liver=np.s_[0:8, :, :], spleen=np.s_[9:12, 0:4, :])
    v3 = _create(stub, blobs, "case-1", ai2, ct_ref, labels_pb2.LABEL_SOURCE_AI)
    got = _labels(blobs, v3)
    assert np.array_equal(got == 5, orig_map == 5)
    assert np.array_equal(got == 8, ai2 == 8)
    assert _prov(v3)[5] == (labels_pb2.LABEL_SOURCE_ORIGINAL, SEG, v2.version_id)
    assert _prov(v3)[8][0] == labels_pb2.LABEL_SOURCE_AI and _prov(v3)[8][2] == v3.version_id

    # the radiologist corrects the liver (whole mask) and the spleen (XOR delta)
    liver = np.zeros(SHAPE, bool)
    liver[0:4, 0:6, 1:7] = True
    spleen_parent = got == 8
    spleen = spleen_parent.copy()
    spleen[9:12, 0:2, :] = False
    req = labels_pb2.ReviseLabelsRequest(
        case_id="case-1",
        expected_parent_version_id=v3.version_id,
        request_id="rev-1",
        revisions=[
            labels_pb2.OrganRevision(
                organ=common_pb2.ORGAN_LIVER,
                mask_blob=_ref(blobs, to_nifti_bytes(liver.astype(np.uint8), AFFINE)),
                review_seconds=95.5,
            ),
            labels_pb2.OrganRevision(organ=common_pb2.ORGAN_SPLEEN, xor_delta=encode_mask_delta(spleen_parent, spleen)),
        ],
        review_seconds=184.0,
    )
    bad = labels_pb2.ReviseLabelsRequest()
    bad.CopyFrom(req)
    bad.request_id, bad.review_seconds = "rev-bad", float("nan")
    assert _reason(lambda: stub.ReviseLabels(bad, metadata=_who("dr-a"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REVIEW_SECONDS",
    )
    bad.review_seconds, bad.revisions[0].review_seconds = 10.0, -1.0
    assert _reason(lambda: stub.ReviseLabels(bad, metadata=_who("dr-a")))[1] == "INVALID_REVIEW_SECONDS"
    v4 = stub.ReviseLabels(req, metadata=_who("dr-a")).version
    assert v4.parent_version_id == v3.version_id
    assert v4.provenance.source == labels_pb2.LABEL_SOURCE_RADIOLOGIST
    assert v4.provenance.reviewer == "dr-a"
    got = _labels(blobs, v4)
    assert np.array_equal(got == 5, liver) and np.array_equal(got == 8, spleen)
    assert np.array_equal(got == 9, (_labels(blobs, v3) == 9) & ~liver)
    assert _prov(v4)[5] == (labels_pb2.LABEL_SOURCE_RADIOLOGIST, "dr-a", v4.version_id)
    assert _prov(v4)[8] == (labels_pb2.LABEL_SOURCE_RADIOLOGIST, "dr-a", v4.version_id)
    assert _prov(v4)[9] == _prov(v3)[9]
    # idempotent: the same request again (even by the same reviewer later) -> same version
    assert stub.ReviseLabels(req, metadata=_who("dr-a")).version == v4

    # the reviewer's time is stored with the version (case, and the organs with a time) ...
    times = (184.0, [(common_pb2.ORGAN_LIVER, 95.5)])
    assert (v4.review_seconds, [(o.organ, o.seconds) for o in v4.organ_review_seconds]) == times
    for v in (
        stub.GetLabelVersion(
            labels_pb2.GetLabelVersionRequest(version_id=v4.version_id), metadata=_who("dr-c")
        ).version,
        stub.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id="case-1"), metadata=_who("dr-c")).versions[
            0
        ],
    ):
        assert v.version_id == v4.version_id
        assert (v.review_seconds, [(o.organ, o.seconds) for o in v.organ_review_seconds]) == times
    assert v3.review_seconds == 0 and not v3.organ_review_seconds
    # how much the revision changed each organ it decided (ml; what the learned ranking fits on),
    # stored with the version and handed to ranking with the version event
    voxel_ml = abs(np.linalg.det(AFFINE[:3, :3])) / 1000.0
    parent = _labels(blobs, v3)
    changed = {
        common_pb2.ORGAN_LIVER: np.count_nonzero((parent == 5) != liver) * voxel_ml,
        common_pb2.ORGAN_SPLEEN: np.count_nonzero(spleen_parent != spleen) * voxel_ml,
    }
    assert all(ml > 0 for ml in changed.values())
    assert {o.organ: o.ml for o in v4.organ_changed_ml} == pytest.approx(changed)
    assert not v3.organ_changed_ml
    event = ranking_request(repo.get_version(v4.version_id), 4)
    assert {c.organ: c.changed_ml for c in event.organ_changes} == pytest.approx(changed)
    # ... and counted once (not again for the repeated request) in atlasflow_review_seconds
    registry = exporter.metrics.registry
    assert registry.get_sample_value("atlasflow_review_seconds_count", {"scope": "case"}) == 1
    assert registry.get_sample_value("atlasflow_review_seconds_sum", {"scope": "case"}) == 184.0
    assert registry.get_sample_value("atlasflow_review_seconds_count", {"scope": "organ"}) == 1
    assert registry.get_sample_value("atlasflow_review_seconds_sum", {"scope": "organ"}) == 95.5

    # the export reports the per-organ provenance
    out = tmp / "export"
    job = stub.ExportDataset(
        labels_pb2.ExportDatasetRequest(case_ids=["case-1"], destination_uri=out.as_uri()),
        metadata=_who("dr-b", "admin"),
    ).job
    exporter.run_job(repo.get_export_job(job.job_id))
    manifest = json.loads((out / "manifest.json").read_text())
    organs = manifest["cases"][0]["organs"]
    assert organs["liver"]["provenance"]["source"] == "radiologist"
    assert organs["liver"]["provenance"]["reviewer"] == "dr-a"
    assert organs["liver"]["decided_in_version"] == v4.version_id
    assert organs["stomach"]["provenance"]["source"] == "ai"
    assert manifest["cases"][0]["marking"] == "AI-generated labels, research use"
    # human minutes per case (the method's key figure)
    assert manifest["cases"][0]["review"] == {
        "minutes": round(184.0 / 60, 3),
        "revisions": 1,
        "measured_revisions": 1,
        "organ_minutes": {"liver": round(95.5 / 60, 3)},
    }

    # the audit trail has every call, with who and what
    stub.GetLabelVersion(labels_pb2.GetLabelVersionRequest(version_id=v2.version_id), metadata=_who("dr-c"))
    records = stub.ListAuditRecords(
        labels_pb2.ListAuditRecordsRequest(page_size=1000), metadata=_who("auditor", "admin")
    ).records
    trail = [(r.principal, r.method, list(r.version_ids), r.outcome) for r in records]
    assert trail[0] == ("dr-c", "GetLabelVersion", [v2.version_id], "OK")
    assert ("dr-a", "ReviseLabels", [v4.version_id], "OK") in trail
    assert trail.count(("dr-a", "ReviseLabels", [v4.version_id], "OK")) == 2
    assert (SEG, "CreateLabelVersion", [v1.version_id], "OK") in trail
    assert [r.method for r in records if r.principal == "dr-b"] == ["ExportDataset"]
    export = [r for r in records if r.method == "ExportDataset"]
    assert [(r.job_id, list(r.version_ids)) for r in export] == [(job.job_id, [v4.version_id])]
    page = stub.ListAuditRecords(
        labels_pb2.ListAuditRecordsRequest(principal="dr-a", page_size=1), metadata=_who("auditor", "admin")
    )
    assert len(page.records) == 1 and page.next_page_token


def test_revision_errors_are_refused_and_audited(service):
    stub, blobs, repo, _, _ = service
    ct_ref = _ref(blobs, to_nifti_bytes(np.zeros(SHAPE, np.int16), AFFINE))
    v1 = _create(stub, blobs, "c", _map(liver=np.s_[0:6, :, :]), ct_ref, labels_pb2.LABEL_SOURCE_AI)
    good = to_nifti_bytes(np.ones(SHAPE, np.uint8), AFFINE)

    def revise(who="dr-a", parent=v1.version_id, **rev):
        rev = rev or {"mask_blob": _ref(blobs, good)}
        return lambda: stub.ReviseLabels(
            labels_pb2.ReviseLabelsRequest(
                case_id="c",
                expected_parent_version_id=parent,
                request_id=uuid.uuid4().hex,
                revisions=[labels_pb2.OrganRevision(organ=common_pb2.ORGAN_LIVER, **rev)],
            ),
            metadata=_who(who) if who else None,
        )

    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    cases = [
        # no token: refused by the server's authentication before the servicer runs
        (revise(who=""), grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"),
        (
            revise(mask_blob=_ref(blobs, to_nifti_bytes(np.ones((12, 10, 7), np.uint8), AFFINE))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REVISION_MASK",
        ),
        (
            revise(mask_blob=_ref(blobs, to_nifti_bytes(np.ones(SHAPE, np.uint8), shifted))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REVISION_MASK",
        ),
        (
            revise(mask_blob=_ref(blobs, to_nifti_bytes(np.full(SHAPE, 8, np.uint8), AFFINE))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REVISION_MASK",
        ),
        (revise(xor_delta=b"\x1f\x8bnope"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MASK_DELTA"),
        (revise(parent="0" * 32), grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND"),
        (revise(parent=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ]
    for call, code, reason in cases:
        assert _reason(call) == (code, reason)
    v2 = stub.ReviseLabels(
        labels_pb2.ReviseLabelsRequest(
            case_id="c",
            expected_parent_version_id=v1.version_id,
            request_id="ok",
            revisions=[labels_pb2.OrganRevision(organ=common_pb2.ORGAN_LIVER, mask_blob=_ref(blobs, good))],
        ),
        metadata=_who("dr-a"),
    ).version
    assert _reason(revise()) == (grpc.StatusCode.ABORTED, "PARENT_MISMATCH")  # stale parent
    assert v2.parent_version_id == v1.version_id
    outcomes = [
        (r.principal, r.outcome)
        for r in stub.ListAuditRecords(
            labels_pb2.ListAuditRecordsRequest(case_id="c"), metadata=_who("auditor", "admin")
        ).records
        if r.method == "ReviseLabels"
    ]
    # the call without a token never reached the servicer: refused by authentication, not audited
    assert all(principal not in ("", "anonymous") for principal, _ in outcomes)
    assert ("dr-a", "INVALID_REVISION_MASK") in outcomes
    assert ("dr-a", "PARENT_MISMATCH") in outcomes
    assert [v.version_id for v in repo.history("c")] == [v1.version_id, v2.version_id]


def test_concurrent_ai_writes_reassemble_against_the_new_head(service):
    """Unconditional writers racing on one case: every loser re-reads and re-assembles, so
    the human-decided organ survives every AI write."""
    stub, blobs, repo, _, _ = service
    ct_ref = _ref(blobs, to_nifti_bytes(np.zeros(SHAPE, np.int16), AFFINE))
    orig = _map(liver=np.s_[0:3, :, :])
    _create(stub, blobs, "race", orig, ct_ref, labels_pb2.LABEL_SOURCE_ORIGINAL, organs=[5])
    errors = []

    def writer(i: int) -> None:
        try:
            _create(
                stub,
                blobs,
                "race",
                _map(liver=np.s_[0:9, :, :], spleen=np.s_[10:12, :, i : i + 1]),
                ct_ref,
                labels_pb2.LABEL_SOURCE_AI,
            )
        except grpc.RpcError as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, [e.code() for e in errors]
    chain = repo.history("race")
    assert len(chain) == 7
    for v in chain:
        arr, _ = from_nifti_bytes(blobs.get(v.label_map_digest))
        assert np.array_equal(arr == 5, orig == 5)
        assert v.organ_provenance[5].provenance.source == "original"
    print(f"6 racing AI writes in {time.perf_counter() - t0:.2f} s")
