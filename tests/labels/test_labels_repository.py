"""Contract tests of LabelRepository: every implementation (SQLite, PostgreSQL) runs them.

Covers versions, lineage, idempotency, concurrency, pagination, export jobs (their options
and per-case outcomes), per-organ provenance, the audit trail and migrations.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import numpy as np
import pytest

from atlasflow.common.blobstore import BlobInfo, digest_of
from atlasflow.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from atlasflow.labels.postgres import PostgresLabelRepository
from atlasflow.labels.repository import (
    AuditEvent,
    LabelRepository,
    LabelVersionRecord,
    OrganProvenance,
    Provenance,
)
from atlasflow.labels.sqlite import SqliteLabelRepository
from atlasflow.labels.storage import open_repository

AFFINE = tuple(float(a) for a in np.diag([1.5, 1.5, 2.0, 1.0]).ravel())
AI = Provenance("ai", model_version="trio-v1", job_id="job-1", weights_trained=False)
RAD = Provenance("radiologist", reviewer="dr-a")


def blob(tag: str) -> BlobInfo:
    data = tag.encode()
    return BlobInfo(digest_of(data), len(data))


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request, tmp_path):
    """Callable opening the SAME store again on every call (a "restart" or another writer)."""
    made = []
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")()

        def opener():
            return PostgresLabelRepository(url)
    else:

        def opener():
            return SqliteLabelRepository(tmp_path / "labels.sqlite")

    def make():
        repo = opener()
        made.append(repo)
        return repo

    make.backend = request.param
    yield make
    for r in made:
        r.close()


def create(repo, case="case-1", tag="lm-1", req="req-1", parent="", prov=AI, organs=(5, 8)):
    return repo.create_version(
        case, blob(tag), blob("ct-" + case), prov, req, parent, organs=organs, shape=(4, 5, 6), affine=AFFINE
    )


def test_is_a_label_repository(factory):
    assert isinstance(factory(), LabelRepository)


def test_create_get_head(factory):
    repo = factory()
    v1 = create(repo)
    assert v1.parent_version_id == "" and v1.case_id == "case-1"
    assert v1.label_map_digest == blob("lm-1").digest and v1.label_map_size == 4
    assert v1.ct_digest == blob("ct-case-1").digest
    assert v1.provenance == AI and v1.organs == (5, 8) and v1.shape == (4, 5, 6)
    assert v1.affine == AFFINE and v1.create_time.tzinfo is not None
    v2 = create(repo, tag="lm-2", req="req-2", parent=v1.version_id, prov=RAD)
    assert v2.parent_version_id == v1.version_id and v2.provenance == RAD
    assert repo.get_version(v1.version_id) == v1
    assert repo.head("case-1") == v2
    assert repo.head("other") is None
    with pytest.raises(NotFound) as e:
        repo.get_version("nope")
    assert e.value.reason == "VERSION_NOT_FOUND"


@pytest.mark.parametrize(
    "second",
    [
        dict(),  # exact repeat
        dict(after_other_write=True),  # repeat after the head moved on
        dict(restart=True),  # repeat after a restart
    ],
)
def test_request_id_idempotent(factory, second):
    repo = factory()
    v1 = create(repo)
    if second.get("after_other_write"):
        create(repo, tag="lm-2", req="req-2")
    if second.get("restart"):
        repo.close()
        repo = factory()
    again = create(repo)
    assert again == v1
    versions, _ = repo.list_versions("case-1")
    assert len(versions) == (2 if second.get("after_other_write") else 1)


def test_request_id_reused_for_other_content(factory):
    repo = factory()
    create(repo)
    with pytest.raises(InvalidArgument) as e:
        create(repo, tag="something-else")
    assert e.value.reason == "REQUEST_ID_REUSED"


@pytest.mark.parametrize("parent", ["stale", "unknown-id", "head-of-other-case"])
def test_parent_mismatch(factory, parent):
    repo = factory()
    v1 = create(repo)
    v2 = create(repo, tag="lm-2", req="req-2", parent=v1.version_id)
    other = create(repo, case="case-2", req="req-o")
    expected = {"stale": v1.version_id, "unknown-id": "0" * 32, "head-of-other-case": other.version_id}[parent]
    with pytest.raises(Aborted) as e:
        create(repo, tag="lm-3", req="req-3", parent=expected)
    assert e.value.reason == "PARENT_MISMATCH"
    assert e.value.metadata["head_version_id"] == v2.version_id
    assert repo.head("case-1") == v2


def test_parent_mismatch_on_empty_case(factory):
    repo = factory()
    with pytest.raises(Aborted) as e:
        create(repo, parent="0" * 32)
    assert e.value.reason == "PARENT_MISMATCH"
    assert repo.head("case-1") is None


def test_restart_keeps_everything(factory):
    repo = factory()
    v1 = create(repo)
    v2 = create(repo, tag="lm-2", req="req-2", parent=v1.version_id, prov=RAD)
    job = repo.create_export_job(["case-1"], "file:///tmp/out")
    repo.update_export_job(job.job_id, state="RUNNING", cases_done=1)
    repo.close()
    repo = factory()
    assert repo.get_version(v1.version_id) == v1
    assert repo.head("case-1") == v2
    assert [v.version_id for v in repo.history("case-1")] == [v1.version_id, v2.version_id]
    got = repo.get_export_job(job.job_id)
    assert (got.state, got.cases_done, got.cases_total) == ("RUNNING", 1, 1)


@pytest.mark.parametrize("page_size,case", [(1, None), (3, None), (7, None), (50, None), (2, "case-b"), (0, "case-a")])
def test_pagination_no_loss_no_duplicates(factory, page_size, case):
    repo = factory()
    made = []
    for i in range(17):
        cid = "case-a" if i % 3 else "case-b"
        made.append(create(repo, case=cid, tag=f"lm-{i}", req=f"req-{i}"))
    want = [v.version_id for v in reversed(made) if case is None or v.case_id == case]
    got, token, pages = [], "", 0
    while True:
        page, token = repo.list_versions(case, page_size, token)
        assert len(page) <= (page_size or 50)
        got += [v.version_id for v in page]
        pages += 1
        if not token:
            break
        if pages == 2:  # a write in the middle of paging neither duplicates nor skips
            create(repo, case=case or "case-a", tag="late", req="late")
    assert got == want


def test_page_token_of_other_filter_rejected(factory):
    repo = factory()
    for i in range(3):
        create(repo, tag=f"lm-{i}", req=f"req-{i}")
    _, token = repo.list_versions("case-1", 1)
    assert token
    for bad_case, bad_token in [("case-2", token), (None, token), ("case-1", "garbage!")]:
        with pytest.raises(InvalidArgument) as e:
            repo.list_versions(bad_case, 1, bad_token)
        assert e.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument) as e:
        repo.list_versions("case-1", -1)
    assert e.value.reason == "INVALID_PAGE_SIZE"


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(organs=(0,)), "INVALID_LABEL_MAP"),
        (dict(organs=(10,)), "INVALID_LABEL_MAP"),
        (dict(shape=(1, 2)), "INVALID_LABEL_MAP"),
        (dict(affine=(1.0, 2.0)), "INVALID_LABEL_MAP"),
        (dict(case_id=""), "INVALID_ARGUMENT"),
        (dict(request_id=""), "INVALID_ARGUMENT"),
    ],
)
def test_bad_create_arguments(factory, kwargs, reason):
    repo = factory()
    args = dict(
        case_id="c",
        label_map=blob("l"),
        ct=blob("c"),
        provenance=AI,
        request_id="r",
        organs=(1,),
        shape=(1, 1, 1),
        affine=AFFINE,
    )
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as e:
        repo.create_version(**args)
    assert e.value.reason == reason


def test_provenance_source_checked():
    with pytest.raises(InvalidArgument) as e:
        Provenance("robot")
    assert e.value.reason == "INVALID_PROVENANCE"


def test_accepts_numpy_affine(factory):
    repo = factory()
    v = repo.create_version(
        "c", blob("l"), blob("c"), AI, "r", organs=(), shape=(1, 1, 1), affine=np.diag([1.5, 1.5, 2.0, 1.0])
    )
    assert v.affine == AFFINE


@pytest.mark.parametrize("shared_instance", [False, True])
def test_concurrent_writers_make_a_linear_history(factory, shared_instance):
    """Writers read the head and append with expected_parent; losers retry. Result: one chain."""
    n_threads, per_thread = 4, 5
    shared = factory() if shared_instance else None
    mismatches = []
    errors = []

    def writer(t: int) -> None:
        repo = shared or factory()
        try:
            for i in range(per_thread):
                while True:
                    head = repo.head("case-x")
                    try:
                        repo.create_version(
                            "case-x",
                            blob(f"{t}-{i}"),
                            blob("ct"),
                            AI,
                            f"req-{t}-{i}",
                            head.version_id if head else "",
                            organs=(1,),
                            shape=(1, 1, 1),
                            affine=AFFINE,
                        )
                        break
                    except Aborted as e:
                        assert e.reason == "PARENT_MISMATCH"
                        mismatches.append(1)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    print("PARENT_MISMATCH retries:", len(mismatches))
    repo = shared or factory()
    chain = repo.history("case-x")
    assert len(chain) == n_threads * per_thread
    assert chain[0].parent_version_id == ""
    for prev, nxt in zip(chain, chain[1:]):
        assert nxt.parent_version_id == prev.version_id
    assert repo.head("case-x") == chain[-1]
    everything, _ = repo.list_versions("case-x", 1000)
    assert len(everything) == len(chain)


def test_database_refuses_a_fork(tmp_path):
    """Even a raw INSERT cannot give one version two children (linear history by schema)."""
    import sqlite3

    repo = SqliteLabelRepository(tmp_path / "l.sqlite")
    v1 = create(repo)
    create(repo, tag="lm-2", req="req-2", parent=v1.version_id)
    conn = sqlite3.connect(tmp_path / "l.sqlite")
    row = conn.execute("SELECT * FROM label_versions WHERE version_id = ?", (v1.version_id,)).fetchone()
    cols = [d[0] for d in conn.execute("SELECT * FROM label_versions").description]
    values = dict(zip(cols, row))
    values.update(seq=None, version_id="fork", parent_version_id=v1.version_id, request_id="fork")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            f"INSERT INTO label_versions({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
            [values[c] for c in cols],
        )
    conn.close()
    repo.close()


# ------------------------------------------------------------------ export jobs


def test_export_job_lifecycle(factory):
    repo = factory()
    a = create(repo, case="a", req="ra")
    b = create(repo, case="b", req="rb")
    job = repo.create_export_job([], "file:///tmp/x")
    assert job.state == "QUEUED" and job.cases_total == 2 and job.cases_done == 0
    assert job.versions == (("a", a.version_id), ("b", b.version_id))
    create(repo, case="a", tag="later", req="ra2")  # not part of the frozen job
    assert repo.get_export_job(job.job_id).versions == job.versions
    assert [j.job_id for j in repo.list_export_jobs(["QUEUED", "RUNNING"])] == [job.job_id]
    repo.update_export_job(job.job_id, state="RUNNING")
    repo.update_export_job(job.job_id, cases_done=1)
    done = repo.update_export_job(job.job_id, state="SUCCEEDED", cases_done=2)
    assert (done.state, done.cases_done) == ("SUCCEEDED", 2)
    assert repo.list_export_jobs(["QUEUED", "RUNNING"]) == []
    with pytest.raises(FailedPrecondition) as e:
        repo.update_export_job(job.job_id, state="RUNNING")
    assert e.value.reason == "INVALID_STATE_TRANSITION"


@pytest.mark.parametrize(
    "case_ids,exc,reason",
    [
        (["missing"], NotFound, "CASE_NOT_FOUND"),
        ([], FailedPrecondition, "NOTHING_TO_EXPORT"),
    ],
)
def test_export_job_errors(factory, case_ids, exc, reason):
    repo = factory()
    with pytest.raises(exc) as e:
        repo.create_export_job(case_ids, "file:///tmp/x")
    assert e.value.reason == reason


def test_export_job_request_id_and_failure(factory):
    repo = factory()
    create(repo)
    j1 = repo.create_export_job(["case-1", "case-1"], "file:///tmp/x", request_id="e1")
    assert j1.cases_total == 1 and j1.case_ids == ("case-1",)
    assert repo.create_export_job(["case-1"], "file:///tmp/x", request_id="e1") == j1
    repo.update_export_job(j1.job_id, state="RUNNING")
    with pytest.raises(InvalidArgument):
        repo.update_export_job(j1.job_id, cases_done=5)
    failed = repo.update_export_job(j1.job_id, state="FAILED", error_reason="BLOB_NOT_FOUND")
    assert failed.error_reason == "BLOB_NOT_FOUND"
    with pytest.raises(FailedPrecondition):  # terminal: not even progress changes
        repo.update_export_job(j1.job_id, cases_done=0)
    with pytest.raises(NotFound):
        repo.get_export_job("nope")


SEG_OPTIONS = {
    "include_dicom_seg": True,
    "pacs": {"host": "pacs.example.org", "port": 11112, "called_ae": "PACS A&B", "calling_ae": "ME"},
}


def test_export_job_options_are_stored_with_the_job(factory):
    repo = factory()
    create(repo)
    plain = repo.create_export_job(["case-1"], "file:///tmp/x")
    seg = repo.create_export_job(["case-1"], "file:///tmp/y?keep=1", options=SEG_OPTIONS)
    assert plain.options == {} and seg.options == SEG_OPTIONS
    assert seg.destination_uri == "file:///tmp/y?keep=1"  # stored as given, nothing appended
    again = factory()  # a restart
    assert again.get_export_job(seg.job_id).options == SEG_OPTIONS
    assert again.get_export_job(plain.job_id).options == {}
    assert {j.job_id: j.options for j in again.list_export_jobs(["QUEUED"])} == {
        plain.job_id: {},
        seg.job_id: SEG_OPTIONS,
    }
    updated = again.update_export_job(seg.job_id, state="RUNNING", cases_done=1)
    assert updated.options == SEG_OPTIONS


def test_export_job_request_id_takes_options_into_account(factory):
    repo = factory()
    create(repo)
    first = repo.create_export_job(["case-1"], "file:///tmp/x", request_id="e1", options=SEG_OPTIONS)
    reordered = dict(reversed(list(SEG_OPTIONS.items())))  # same object, other key order
    assert repo.create_export_job(["case-1"], "file:///tmp/x", request_id="e1", options=reordered) == first
    for case_ids, uri, options in (
        (["case-1"], "file:///tmp/x", {}),
        (["case-1"], "file:///tmp/x", {"include_dicom_seg": True}),
        (["case-1"], "file:///tmp/other", SEG_OPTIONS),
        ([], "file:///tmp/x", SEG_OPTIONS),
    ):
        with pytest.raises(InvalidArgument) as e:
            repo.create_export_job(case_ids, uri, request_id="e1", options=options)
        assert e.value.reason == "REQUEST_ID_REUSED", (case_ids, uri, options)
    assert [j.job_id for j in repo.list_export_jobs()] == [first.job_id]


@pytest.mark.parametrize("options", [["include_dicom_seg"], {"x": float("nan")}, {"x": object()}, {"x": "y" * 20000}])
def test_export_job_options_must_be_a_json_object(factory, options):
    repo = factory()
    create(repo)
    with pytest.raises(InvalidArgument) as e:
        repo.create_export_job(["case-1"], "file:///tmp/x", options=options)
    assert e.value.metadata["field"] == "options"
    assert repo.list_export_jobs() == []


def test_export_case_outcomes_latest_wins_in_export_order(factory):
    repo = factory()
    for case in ("b", "a", "c"):
        create(repo, case=case, req="r-" + case)
    job = repo.create_export_job(["b", "a", "c"], "file:///tmp/x", options=SEG_OPTIONS)
    assert repo.list_export_outcomes(job.job_id) == []
    repo.record_export_outcome(job.job_id, "a", {"state": "FAILED", "reason": "INGEST_UNAVAILABLE"})
    first_b = repo.record_export_outcome(job.job_id, "b", {"state": "WRITTEN", "organs": [5, 8]})
    assert first_b.time.tzinfo is not None and first_b.outcome["organs"] == [5, 8]
    # a resumed job exports "a" again: the latest attempt replaces the first
    latest_a = repo.record_export_outcome(job.job_id, "a", {"state": "SENT", "c_store_status": 0})
    again = factory()  # committed: a restart (or a crash) keeps them
    got = again.list_export_outcomes(job.job_id)
    assert [(o.job_id, o.case_id, dict(o.outcome)) for o in got] == [
        (job.job_id, "b", {"state": "WRITTEN", "organs": [5, 8]}),
        (job.job_id, "a", {"state": "SENT", "c_store_status": 0}),
    ]
    assert got[1].time == latest_a.time and got[1].time >= got[0].time
    other = again.create_export_job(["a"], "file:///tmp/y")
    assert again.list_export_outcomes(other.job_id) == []  # per job
    with pytest.raises(NotFound) as e:
        again.record_export_outcome("nope", "a", {})
    assert e.value.reason == "EXPORT_JOB_NOT_FOUND"
    with pytest.raises(NotFound):
        again.list_export_outcomes("nope")
    with pytest.raises(InvalidArgument) as e:
        again.record_export_outcome(other.job_id, "b", {})  # not one of that job's cases
    assert e.value.metadata["field"] == "case_id"
    with pytest.raises(InvalidArgument) as e:
        again.record_export_outcome(job.job_id, "c", [1, 2])
    assert e.value.metadata["field"] == "outcome"
    assert [o.case_id for o in again.list_export_outcomes(job.job_id)] == ["b", "a"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_stop_gap_export_jobs_get_their_options_on_upgrade(backend, tmp_path, request):
    """Jobs queued before migration 4 carried their DICOM SEG options as the destination
    URI's query (form-encoded); the upgrade moves them into `options`."""
    from urllib.parse import urlencode

    pacs = {
        "pacs_host": "pacs.example.org",
        "pacs_port": "11112",
        "pacs_called_ae": "PACS A&B",
        "pacs_calling_ae": "ME+1",
    }
    stored = {
        "plain": ("file:///exports/run%201", {}),
        "seg": ("file:///exports/run%201?" + urlencode({"dicom_seg": "1"}), {"include_dicom_seg": True}),
        "pacs": (
            "file:///exports/p?" + urlencode({"dicom_seg": "1", **pacs}),
            {
                "include_dicom_seg": True,
                "pacs": {"host": "pacs.example.org", "port": 11112, "called_ae": "PACS A&B", "calling_ae": "ME+1"},
            },
        ),
    }
    insert = (
        "INSERT INTO export_jobs(job_id, state, destination_uri, case_ids, versions,"
        " cases_done, cases_total, error_reason, request_id, create_time, update_time)"
        " VALUES (?, 'QUEUED', ?, '[\"c\"]', '[[\"c\", \"v\"]]', 0, 1, '', NULL, ?, ?)"
    )
    now = "2026-01-01T00:00:00+00:00"
    if backend == "sqlite":
        from atlasflow.common import sqlite as sq
        from atlasflow.labels.schema import LEGACY_MIGRATIONS as MIGRATIONS

        conn = sq.connect(tmp_path / "labels.sqlite")
        sq.migrate(conn, MIGRATIONS[:3])
        for job_id, (uri, _) in stored.items():
            conn.execute(insert, (job_id, uri, now, now))
        conn.close()
        repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    else:
        import psycopg
        from psycopg.rows import dict_row

        from atlasflow.labels.schema import LEGACY_PG_MIGRATIONS as PG_MIGRATIONS
        from atlasflow.labels.schema import migrate_postgres as migrate

        url = request.getfixturevalue("pg_database")()
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            migrate(conn, PG_MIGRATIONS[:3])
            for job_id, (uri, _) in stored.items():
                conn.execute(insert.replace("?", "%s"), (job_id, uri, now, now))
        repo = PostgresLabelRepository(url)
    try:
        for job_id, (uri, options) in stored.items():
            job = repo.get_export_job(job_id)
            assert (job.destination_uri, dict(job.options)) == (uri.split("?")[0], options)
        assert repo.list_export_outcomes("pacs") == []
    finally:
        repo.close()


# ------------------------------------------------------------------ both backends, raw SQL


def _raw(factory, tmp_path):
    """(execute(sql, args) on a raw connection to the factory's store, backend's error type)."""
    repo = factory()
    if factory.backend == "sqlite":
        import sqlite3

        conn = sqlite3.connect(tmp_path / "labels.sqlite", isolation_level=None)
        return repo, (lambda sql, args=(): conn.execute(sql, args).fetchall()), sqlite3.DatabaseError
    import psycopg

    conn = psycopg.connect(
        repo.database.engine.url.render_as_string(hide_password=False).replace("+psycopg", ""), autocommit=True
    )
    return (
        repo,
        (
            lambda sql, args=(): (
                conn.execute(sql.replace("?", "%s"), args).fetchall()
                if conn.execute(sql.replace("?", "%s"), args).description
                else []
            )
        ),
        psycopg.Error,
    )


def test_database_refuses_a_fork_on_every_backend(factory, tmp_path):
    repo, sql, error = _raw(factory, tmp_path)
    v1 = create(repo)
    create(repo, tag="lm-2", req="req-2", parent=v1.version_id)
    with pytest.raises(error):
        sql(
            "INSERT INTO label_versions(version_id, case_id, parent_version_id, label_map_digest,"
            " label_map_size, ct_digest, ct_size, source, organs, shape, affine, request_id,"
            " request_fingerprint, create_time) SELECT 'fork', case_id, parent_version_id,"
            " label_map_digest, label_map_size, ct_digest, ct_size, source, organs, shape,"
            " affine, 'fork', request_fingerprint, create_time FROM label_versions"
            " WHERE parent_version_id = ?",
            (v1.version_id,),
        )
    with pytest.raises(error):  # a second root
        sql(
            "INSERT INTO label_versions(version_id, case_id, parent_version_id, label_map_digest,"
            " label_map_size, ct_digest, ct_size, source, organs, shape, affine, request_id,"
            " request_fingerprint, create_time) SELECT 'root2', case_id, NULL,"
            " label_map_digest, label_map_size, ct_digest, ct_size, source, organs, shape,"
            " affine, 'root2', request_fingerprint, create_time FROM label_versions"
            " WHERE version_id = ?",
            (v1.version_id,),
        )
    assert len(repo.history("case-1")) == 2


def test_migrations_are_versioned(factory, tmp_path):
    """The schema is under Alembic (atlasflow.labels.migrations): stamped with the head
    revision on open; reopening applies nothing twice."""
    from atlasflow.labels.migrations import MIGRATIONS as ALEMBIC

    head = ALEMBIC.script().get_current_head()
    repo, sql, _ = _raw(factory, tmp_path)
    assert [r[0] for r in sql("SELECT version_num FROM alembic_version_labels")] == [head]
    repo.close()
    factory()
    assert [r[0] for r in sql("SELECT version_num FROM alembic_version_labels")] == [head]


def test_sqlite_v1_database_is_upgraded_in_place(tmp_path):
    """A database written by the first schema keeps its versions; their organs get the
    version's own provenance."""
    from atlasflow.common import sqlite as sq
    from atlasflow.labels.schema import LEGACY_MIGRATIONS as MIGRATIONS

    conn = sq.connect(tmp_path / "labels.sqlite")
    sq.migrate(conn, MIGRATIONS[:1])
    conn.execute(
        "INSERT INTO label_versions(version_id, case_id, parent_version_id, label_map_digest,"
        " label_map_size, ct_digest, ct_size, source, organs, shape, affine, request_id,"
        " request_fingerprint, create_time) VALUES ('v1', 'c', NULL, ?, 4, ?, 4, 'ai', '[5]',"
        " '[1, 1, 1]', '[]', 'r', 'f', '2024-01-01T00:00:00+00:00')",
        (blob("a").digest, blob("b").digest),
    )
    conn.execute("INSERT INTO case_heads VALUES ('c', 'v1', 1)")
    conn.close()
    repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    v = repo.get_version("v1")
    assert v.organ_provenance[5] == OrganProvenance(Provenance("ai"), "v1")
    assert repo.head("c") == v
    # migration 3 queued the existing version for ranking
    assert [(e.version_id, e.version_number) for e in repo.due_version_events(1e12)] == [("v1", 1)]
    repo.close()


def test_organ_provenance_round_trip(factory):
    repo = factory()
    v1 = create(repo)
    assert set(v1.organ_provenance) == set(range(1, 10))
    assert all(op == OrganProvenance(AI, v1.version_id) for op in v1.organ_provenance.values())
    orig = Provenance("original", model_version="totalseg-v2")
    v2 = repo.create_version(
        "case-1",
        blob("lm-2"),
        blob("ct-case-1"),
        RAD,
        "req-2",
        v1.version_id,
        organs=(5, 8),
        shape=(4, 5, 6),
        affine=AFFINE,
        organ_provenance={5: OrganProvenance(RAD), 8: OrganProvenance(orig, v1.version_id)},
    )
    assert v2.organ_provenance[5] == OrganProvenance(RAD, v2.version_id)
    assert v2.organ_provenance[8] == OrganProvenance(orig, v1.version_id)
    assert v2.organ_provenance[1] == OrganProvenance(RAD, v2.version_id)
    repo.close()
    assert factory().get_version(v2.version_id) == v2


def test_request_fingerprint_overrides_content_hash(factory):
    """Callers that derive the stored map (assembly) pass the hash of the REQUEST: a repeat
    whose derived map differs still finds the first version."""
    repo = factory()
    v1 = repo.create_version(
        "c",
        blob("assembled-1"),
        blob("ct"),
        AI,
        "r",
        organs=(1,),
        shape=(1, 1, 1),
        affine=AFFINE,
        request_fingerprint="req-hash",
    )
    again = repo.create_version(
        "c",
        blob("assembled-2"),
        blob("ct"),
        AI,
        "r",
        organs=(1,),
        shape=(1, 1, 1),
        affine=AFFINE,
        request_fingerprint="req-hash",
    )
    assert again == v1
    assert repo.version_for_request("r") == (v1, "req-hash")
    assert repo.version_for_request("other") is None
    with pytest.raises(InvalidArgument):
        repo.create_version(
            "c",
            blob("assembled-1"),
            blob("ct"),
            AI,
            "r",
            organs=(1,),
            shape=(1, 1, 1),
            affine=AFFINE,
            request_fingerprint="other-hash",
        )


def test_concurrent_first_versions_and_same_request(factory):
    """Many writers race for a case's FIRST version (no head row to lock yet) and for one
    request_id: one root, one version per request, never an error."""
    results, errors = [], []

    def writer(t: int) -> None:
        repo = factory()
        try:
            results.append(
                repo.create_version(
                    "fresh", blob("same"), blob("ct"), AI, "same-request", organs=(1,), shape=(1, 1, 1), affine=AFFINE
                )
            )
            repo.create_version(
                "fresh", blob(f"own-{t}"), blob("ct"), AI, f"own-{t}", organs=(1,), shape=(1, 1, 1), affine=AFFINE
            )
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len({r.version_id for r in results}) == 1
    repo = factory()
    chain = repo.history("fresh")
    assert len(chain) == 7 and chain[0].version_id == results[0].version_id


# ------------------------------------------------------------------ audit


def test_audit_written_with_the_version_and_listed(factory):
    repo = factory()
    v1 = repo.create_version(
        "c1",
        blob("a"),
        blob("ct"),
        AI,
        "r1",
        organs=(1,),
        shape=(1, 1, 1),
        affine=AFFINE,
        audit=AuditEvent("svc-seg", "CreateLabelVersion", "c1"),
    )
    repo.record_audit(AuditEvent("dr-a", "GetLabelVersion", "c1", (v1.version_id,)))
    repo.record_audit(AuditEvent("dr-b", "GetLabelVersion", "c2", ("x",), outcome="NOT_FOUND"))
    job = repo.create_export_job(["c1"], "file:///tmp/x", audit=AuditEvent("dr-a", "ExportDataset"))
    records, token = repo.list_audit_records()
    assert token == ""
    assert [(r.principal, r.method, r.case_id, r.version_ids, r.job_id, r.outcome) for r in records] == [
        ("dr-a", "ExportDataset", "", (v1.version_id,), job.job_id, "OK"),
        ("dr-b", "GetLabelVersion", "c2", ("x",), "", "NOT_FOUND"),
        ("dr-a", "GetLabelVersion", "c1", (v1.version_id,), "", "OK"),
        ("svc-seg", "CreateLabelVersion", "c1", (v1.version_id,), "", "OK"),
    ]
    assert all(r.time.tzinfo is not None for r in records)
    assert records[0].time >= records[-1].time
    assert [r.method for r in repo.list_audit_records(principal="dr-a")[0]] == ["ExportDataset", "GetLabelVersion"]
    assert [r.principal for r in repo.list_audit_records(case_id="c1")[0]] == ["dr-a", "svc-seg"]
    got, token, pages = [], "", 0
    while True:
        page, token = repo.list_audit_records(page_size=1, page_token=token)
        got += page
        pages += 1
        if not token:
            break
    assert got == records and pages == 4
    _, t = repo.list_audit_records(principal="dr-a", page_size=1)
    with pytest.raises(InvalidArgument) as e:
        repo.list_audit_records(principal="dr-b", page_size=1, page_token=t)
    assert e.value.reason == "INVALID_PAGE_TOKEN"


def test_failed_write_leaves_no_audit_row_of_success(factory):
    repo = factory()
    create(repo)
    with pytest.raises(Aborted):
        repo.create_version(
            "case-1",
            blob("x"),
            blob("ct"),
            AI,
            "r-x",
            "0" * 32,
            organs=(1,),
            shape=(1, 1, 1),
            affine=AFFINE,
            audit=AuditEvent("dr-a", "CreateLabelVersion", "case-1"),
        )
    assert repo.list_audit_records() == ([], "")


def test_audit_is_append_only(factory, tmp_path):
    repo, sql, error = _raw(factory, tmp_path)
    repo.record_audit(AuditEvent("dr-a", "GetLabelVersion", "c1"))
    with pytest.raises(error):
        sql("UPDATE audit_records SET principal = 'someone-else'")
    with pytest.raises(error):
        sql("DELETE FROM audit_records")
    assert [r.principal for r in repo.list_audit_records()[0]] == ["dr-a"]


# ------------------------------------------------------------------ backend selection


def test_open_repository_picks_the_backend(tmp_path, pg_database):
    lite = open_repository("", tmp_path)
    assert isinstance(lite, SqliteLabelRepository) and (tmp_path / "labels.sqlite3").exists()
    lite.close()
    pg = open_repository(pg_database(), tmp_path)
    assert isinstance(pg, PostgresLabelRepository)
    pg.close()
    with pytest.raises(InvalidArgument) as e:
        open_repository("mysql://x", tmp_path)
    assert e.value.reason == "INVALID_SETTING"


def test_every_version_queues_one_event_for_ranking(factory):
    """The version-event outbox: one row per version, written with it, numbered along the
    case's chain; delivery attempts are recorded, done rows leave the backlog."""
    repo = factory()
    v1 = create(repo)
    v2 = create(repo, tag="lm-2", req="req-2", parent=v1.version_id, prov=RAD)
    w1 = create(repo, case="case-2", tag="lm-3", req="req-3")
    create(repo, tag="lm-2", req="req-2", parent=v1.version_id, prov=RAD)  # a repeat: no event
    events = repo.due_version_events(now=1e12)
    assert [(e.version_id, e.case_id, e.version_number, e.attempts) for e in events] == [
        (v1.version_id, "case-1", 1, 0),
        (v2.version_id, "case-1", 2, 0),
        (w1.version_id, "case-2", 1, 0),
    ]
    assert repo.version_event_backlog() == 3
    repo.mark_version_event(events[0].seq, "done")
    repo.mark_version_event(events[1].seq, "pending", error="UNAVAILABLE", next_attempt_at=5e11)
    assert [e.version_id for e in repo.due_version_events(now=1e11)] == [w1.version_id]
    due = repo.due_version_events(now=1e12)
    assert [(e.version_id, e.attempts) for e in due] == [(v2.version_id, 1), (w1.version_id, 0)]
    assert repo.version_event_backlog() == 2
    again = factory()  # survives a restart
    assert again.version_event_backlog() == 2
    with pytest.raises(ValueError):
        again.mark_version_event(events[2].seq, "lost")


def test_failed_write_queues_no_event(factory):
    repo = factory()
    v1 = create(repo)
    with pytest.raises(Aborted):
        create(repo, tag="lm-2", req="req-2", parent="not-the-head")
    assert [e.version_id for e in repo.due_version_events(now=1e12)] == [v1.version_id]


# ------------------------------------------------------------------ review time (migration 5)


def test_review_seconds_are_stored_with_the_version(factory):
    repo = factory()
    v1 = create(repo)
    assert (v1.review_seconds, dict(v1.organ_review_seconds)) == (0.0, {})
    v2 = repo.create_version(
        "case-1",
        blob("lm-2"),
        blob("ct-case-1"),
        RAD,
        "req-2",
        v1.version_id,
        organs=(5, 8),
        shape=(4, 5, 6),
        affine=AFFINE,
        review_seconds=184.25,
        organ_review_seconds={5: 95.5, 8: 0.0},  # 0: not measured, not stored
    )
    assert (v2.review_seconds, dict(v2.organ_review_seconds)) == (184.25, {5: 95.5})
    again = factory()  # another connection / a restart
    for got in (again.get_version(v2.version_id), again.head("case-1"), again.history("case-1")[-1]):
        assert (got.review_seconds, dict(got.organ_review_seconds)) == (184.25, {5: 95.5})
    assert v2 in again.list_versions("case-1")[0]
    # a repeated request returns the version with the times stored first
    repeat = again.create_version(
        "case-1", blob("lm-2"), blob("ct-case-1"), RAD, "req-2", v1.version_id, organs=(5, 8), shape=(4, 5, 6),
        affine=AFFINE, review_seconds=10.0,
    )  # fmt: skip
    assert repeat == v2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"review_seconds": float("nan")},
        {"review_seconds": float("inf")},
        {"review_seconds": -1.0},
        {"organ_review_seconds": {5: -0.5}},
        {"organ_review_seconds": {12: 3.0}},
    ],
)
def test_bad_review_seconds_are_refused(factory, kwargs):
    repo = factory()
    with pytest.raises(InvalidArgument) as e:
        repo.create_version(
            "case-1", blob("lm"), blob("ct"), RAD, "req-1", organs=(5,), shape=(4, 5, 6), affine=AFFINE, **kwargs
        )
    assert e.value.reason == "INVALID_REVIEW_SECONDS"
    assert repo.head("case-1") is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_database_before_migration_5_is_upgraded_in_place(backend, tmp_path, request):
    """Versions written before migration 5 read as "not measured" (0 s, no organs); new
    versions of the same case store their time."""
    insert = (
        "INSERT INTO label_versions(version_id, case_id, parent_version_id, label_map_digest,"
        " label_map_size, ct_digest, ct_size, source, organs, shape, affine, request_id,"
        " request_fingerprint, create_time) VALUES ('v1', 'c', NULL, ?, 4, ?, 4, 'ai', '[5]',"
        " '[4, 5, 6]', ?, 'r', 'f', '2024-01-01T00:00:00+00:00')"
    )
    args = (blob("a").digest, blob("b").digest, json.dumps(AFFINE))
    if backend == "sqlite":
        from atlasflow.common import sqlite as sq
        from atlasflow.labels.schema import LEGACY_MIGRATIONS as MIGRATIONS

        conn = sq.connect(tmp_path / "labels.sqlite")
        sq.migrate(conn, MIGRATIONS[:4])
        conn.execute(insert, args)
        conn.execute("INSERT INTO case_heads VALUES ('c', 'v1', 1)")
        conn.close()
        repo = SqliteLabelRepository(tmp_path / "labels.sqlite")
    else:
        import psycopg
        from psycopg.rows import dict_row

        from atlasflow.labels.schema import LEGACY_PG_MIGRATIONS as PG_MIGRATIONS
        from atlasflow.labels.schema import migrate_postgres as migrate

        url = request.getfixturevalue("pg_database")()
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            migrate(conn, PG_MIGRATIONS[:4])
            conn.execute(insert.replace("?", "%s"), args)
            conn.execute("INSERT INTO case_heads VALUES ('c', 'v1', 1)")
        repo = PostgresLabelRepository(url)
    try:
        old = repo.get_version("v1")
        assert (old.review_seconds, dict(old.organ_review_seconds)) == (0.0, {})
        new = repo.create_version(
            "c", blob("lm-2"), blob("b"), RAD, "r2", "v1", organs=(5,), shape=(4, 5, 6), affine=AFFINE,
            review_seconds=60.0, organ_review_seconds={5: 30.0},
        )  # fmt: skip
        assert repo.get_version(new.version_id).organ_review_seconds == {5: 30.0}
        assert [v.review_seconds for v in repo.history("c")] == [0.0, 60.0]
    finally:
        repo.close()


def test_review_entry_sums_the_human_minutes_up_to_the_exported_version():
    from atlasflow.labels.export import review_entry

    def rec(vid, source, seconds, organs):
        return LabelVersionRecord(
            vid, "c", "", "d", 1, "d", 1, Provenance(source, reviewer="dr" if source == "radiologist" else ""),
            (5,), (1, 1, 1), AFFINE, datetime.now(UTC), review_seconds=seconds, organ_review_seconds=organs,
        )  # fmt: skip

    chain = [
        rec("v1", "ai", 0.0, {}),
        rec("v2", "radiologist", 120.0, {5: 60.0}),
        rec("v3", "radiologist", 0.0, {}),  # a revision without a time (CLI)
        rec("v4", "radiologist", 30.0, {5: 30.0, 8: 15.0}),
    ]
    assert review_entry(chain, "v3") == {
        "minutes": 2.0,
        "revisions": 2,
        "measured_revisions": 1,
        "organ_minutes": {"liver": 1.0},
    }
    assert review_entry(chain, "v4") == {
        "minutes": 2.5,
        "revisions": 3,
        "measured_revisions": 2,
        "organ_minutes": {"liver": 1.5, "spleen": 0.25},
    }
