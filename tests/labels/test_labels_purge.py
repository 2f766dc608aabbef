"""`purge_study` of the label repository (ingest's DeleteStudy hand-off) on SQLite and PostgreSQL:
every row of the case goes, the audit trail stays, a blob another case references is reported
as still referenced."""

from __future__ import annotations

import numpy as np
import pytest

from atlasflow.common.blobstore import BlobInfo, digest_of
from atlasflow.labels.postgres import PostgresLabelRepository
from atlasflow.labels.repository import AuditEvent, Provenance
from atlasflow.labels.sqlite import SqliteLabelRepository

AFFINE = tuple(float(a) for a in np.diag([1.5, 1.5, 2.0, 1.0]).ravel())
AI = Provenance("ai", model_version="trio-v1", job_id="job-1", weights_trained=False)
RAD = Provenance("radiologist", reviewer="dr-a")


def blob(tag: str) -> BlobInfo:
    return BlobInfo(digest_of(tag.encode()), len(tag))


@pytest.fixture(params=["sqlite", "postgres"])
def repo(request, tmp_path):
    if request.param == "postgres":
        r = PostgresLabelRepository(request.getfixturevalue("pg_database")())
    else:
        r = SqliteLabelRepository(tmp_path / "labels.sqlite")
    yield r
    r.close()


def version(repo, case, label, ct, req, parent="", prov=AI):
    return repo.create_version(
        case,
        blob(label),
        blob(ct),
        prov,
        req,
        parent,
        organs=(5,),
        shape=(4, 5, 6),
        affine=AFFINE,
        audit=AuditEvent("svc", "CreateLabelVersion", case),
    )


def test_purge_study_deletes_the_case_keeps_audit_and_other_cases(repo):
    v1 = version(repo, "case-a", "mask-shared", "ct-a", "r1")
    version(repo, "case-a", "mask-a2", "ct-a", "r2", parent=v1.version_id, prov=RAD)
    version(repo, "case-b", "mask-shared", "ct-b", "r3")  # the same mask content in another study
    audit_before = len(repo.list_audit_records(case_id="case-a", page_size=100)[0])
    assert audit_before >= 2

    counts, released = repo.purge_study("case-a")

    assert counts["label_versions"] == 2 and counts["case_heads"] == 1 and counts["version_events"] == 2
    assert released == sorted({blob("mask-shared").digest, blob("mask-a2").digest, blob("ct-a").digest})
    assert repo.head("case-a") is None and repo.history("case-a") == []
    assert repo.list_versions("case-a", 10, "")[0] == []
    assert repo.head("case-b") is not None
    assert [e.case_id for e in repo.due_version_events(now=1e12)] == ["case-b"]
    # the audit trail is untouched
    assert len(repo.list_audit_records(case_id="case-a", page_size=100)[0]) == audit_before
    # the shared mask is still referenced (by case-b), the purged ones are not
    assert repo.referenced(released) == [blob("mask-shared").digest]
    # idempotent; the case can be labelled again from scratch
    counts2, released2 = repo.purge_study("case-a")
    assert set(counts2.values()) == {0} and released2 == []
    assert version(repo, "case-a", "mask-new", "ct-a", "r4").parent_version_id == ""
