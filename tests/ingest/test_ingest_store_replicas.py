"""Two ingest replicas on one database (SQLite file and real PostgreSQL 15): the instances of one
series arrive half at each; the quiet period is one (the database's clock) and the series is
assembled exactly once, by whichever replica claims it, even when both assemblers look at the
same moment. A replica that finds instances still in the other's spool gives the claim back
and the series is assembled once they are drained."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.errors import Unavailable
from atlasflow.common.metrics import Metrics
from atlasflow.ingest.store import IngestStore
from atlasflow.ingest.worker import Assembler
from atlasflow.testing import peers

SLICES = 6


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    return peers.build_ct_series(tmp_path_factory.mktemp("ct") / "series", SLICES, seed="replicas")


class CountingAssembler(Assembler):
    """The real assembler; counts the volumes it builds (the work a duplicate would repeat) and
    holds each build for `hold_s`, so two replicas that both went ahead would overlap."""

    def __init__(self, store: IngestStore, blobs: LocalBlobStore, hold_s: float = 0.5) -> None:
        super().__init__(store, blobs, Metrics("ingest-replica-test"), 0.0)
        self.builds = 0
        self.hold_s = hold_s

    def _build_volume(self, digests):  # noqa: ANN001, ANN202 - the parent's signature
        self.builds += 1
        time.sleep(self.hold_s)
        return super()._build_volume(digests)


def _replicas(tmp_path: Path, db_url: str) -> tuple[LocalBlobStore, list[IngestStore]]:
    blobs = LocalBlobStore(tmp_path / "blobs")  # the shared blob store
    stores = [
        IngestStore(tmp_path / name, blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1)
        for name in ("replica-a", "replica-b")
    ]
    return blobs, stores


def _receive_split(stores: list[IngestStore], files: list[Path]) -> str:
    """Instance i goes to replica i % 2, as a load balancer would send them."""
    series_id = ""
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        stored = stores[i % 2].store_instance(
            path.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        series_id = stored.series_id
    return series_id


def _stream_instances(assembler: Assembler, series_id: str) -> list:
    """StreamSeriesInstances of the servicer of `assembler`'s replica, called in-process."""
    import asyncio

    from atlasflow.ingest.reception import Reception
    from atlasflow.ingest.servicer import IngestServicer
    from atlasflow.ingest.v1 import ingest_pb2

    servicer = IngestServicer(assembler.store, Reception(assembler.store, Metrics("ingest-replica-test")), assembler)
    request = ingest_pb2.StreamSeriesInstancesRequest(series_id=series_id)

    async def collect() -> list:
        return [m async for m in servicer.StreamSeriesInstances(request, None)]  # type: ignore[arg-type]  # unused context

    return asyncio.run(collect())


def _outbox_keys(store: IngestStore) -> list[str]:
    with store.db.read() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT dedupe_key FROM outbox ORDER BY id"))]


def test_one_series_received_by_two_replicas_is_assembled_exactly_once(tmp_path, db_url, ct_files):
    blobs, stores = _replicas(tmp_path, db_url)
    try:
        series_id = _receive_split(stores, ct_files)
        sv = stores[0].get_series(series_id)
        assert (sv.version, sv.instance_count) == (1, SLICES)  # one version from both replicas
        for s in stores:  # each replica's idle drain (the assembler loop's drain_if_idle)
            s.spool_drain.drain()
        assemblers = [CountingAssembler(s, blobs) for s in stores]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def replica(assembler: CountingAssembler) -> None:
            try:
                due = assembler.store.due_for_assembly(0.0)
                assert [d.series_id for d in due] == [series_id]  # both see it quiet
                barrier.wait(60)  # ... and both go for it at once
                for d in due:
                    assembler.assemble(d)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=replica, args=(a,)) for a in assemblers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert sorted(a.builds for a in assemblers) == [0, 1]  # assembled once, by one replica
        done = stores[1].get_series(series_id)
        assert (done.state, done.assembly_attempts) == ("ASSEMBLED", 1)
        assert _outbox_keys(stores[0]) == [f"{series_id}:1"]
        for s in stores:
            assert s.due_for_assembly(0.0) == []
    finally:
        for s in stores:
            s.close()


def test_instances_still_in_the_other_replicas_spool_make_the_assembly_wait(tmp_path, db_url, ct_files):
    blobs, stores = _replicas(tmp_path, db_url)
    try:
        series_id = _receive_split(stores, ct_files)
        first, second = (CountingAssembler(s, blobs, hold_s=0.0) for s in stores)
        (sv,) = second.store.due_for_assembly(0.0)
        second.assemble(sv)  # replica a has not drained its spool yet: b gives the claim back
        waiting = stores[1].get_series(series_id)
        assert (second.builds, waiting.state, waiting.assembly_attempts) == (0, "RECEIVING", 0)
        # nor does b stream the version's instances meanwhile: a clear, retryable refusal
        with pytest.raises(Unavailable) as e:
            _stream_instances(second, series_id)
        assert e.value.reason == "INSTANCES_ON_OTHER_REPLICA" and e.value.metadata["missing"] == str(SLICES // 2)
        stores[0].spool_drain.drain()  # a's idle drain
        assert len(_stream_instances(second, series_id)) >= SLICES
        (sv,) = second.store.due_for_assembly(0.0)
        second.assemble(sv)
        assert second.builds == 1 and stores[0].get_series(series_id).state == "ASSEMBLED"
        assert first.builds == 0 and _outbox_keys(stores[0]) == [f"{series_id}:1"]
    finally:
        for s in stores:
            s.close()


def test_two_ingest_services_on_one_postgresql_assemble_a_split_series_once(tmp_path, postgres, ct_files):
    """`atlasflow serve ingest` twice on one PostgreSQL database and one blob directory (the
    shared object store of a cluster), a modality's C-STORE association to each with half of the
    series: one version of all the instances, assembled once (one attempt, one hand-off)."""
    from atlasflow.common.clients import sync_channel
    from atlasflow.common.db import create_engine
    from atlasflow.ingest.identity import atlas_id
    from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

    url = postgres.create_database()
    env = {"DATABASE_URL": url, "BLOB_DIR": str(tmp_path / "blobs")}
    replicas = [peers.IngestProcess(tmp_path / name, quiet_period_s=1.0, env=env) for name in ("a", "b")]
    try:
        for r in replicas:
            r.start(timeout_s=120)
        for i, r in enumerate(replicas):
            sent = peers.storescu(ct_files[i::2], r.dicom_port, aet=f"MODALITY{i}")
            assert len(peers.acknowledged_files(sent.stdout + sent.stderr)) == len(ct_files[i::2]), sent.stderr
        series_id = atlas_id("ser", peers.bench_uid("replicas", "series"))
        deadline = time.monotonic() + 120
        with sync_channel(replicas[1].target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            while True:
                sv = stub.GetSeries(ingest_pb2.GetSeriesRequest(series_id=series_id), timeout=10).series
                if sv.state != ingest_pb2.SERIES_STATE_RECEIVING or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text("SELECT state, version, instance_count, assembly_attempts FROM series_versions")
                ).all()
                handoffs = conn.execute(sa.text("SELECT dedupe_key FROM outbox")).scalars().all()
        finally:
            engine.dispose()
        assert [tuple(r) for r in row] == [("ASSEMBLED", 1, SLICES, 1)]  # segmentation is down: not dispatched
        assert handoffs == [f"{series_id}:1"]
        logs = [r.log_text() for r in replicas]
        assert sum(log.count('"series assembled"') for log in logs) == 1, logs
        _upload_moved_between_replicas(replicas, tmp_path)
    finally:
        for r in replicas:
            r.stop()


def _upload_moved_between_replicas(replicas: list, tmp_path: Path) -> None:
    """Over gRPC: half of a resumable upload committed on replica a; its continuation on b is
    UNAVAILABLE UPLOAD_ON_OTHER_REPLICA naming a; the client (`send_files` through b) then sends
    it again from offset 0 on b and gets its receipt."""
    import grpc

    from atlasflow.common.clients import sync_channel
    from atlasflow.common.server import error_info_of
    from atlasflow.ingest.client import UploadStats, resumable_requests, send_files, upload_id_of
    from atlasflow.ingest.v1 import ingest_pb2_grpc

    (path,) = peers.build_ct_series(tmp_path / "moved", 1, seed="moved-upload")
    data = path.read_bytes()
    uid, chunk = upload_id_of(data), 16 * 1024
    msgs = list(resumable_requests(path.name, data, uid, 0, chunk))
    with sync_channel(replicas[0].target) as channel:
        with pytest.raises(grpc.RpcError) as err:  # cut before the last chunk: two chunks committed
            ingest_pb2_grpc.IngestServiceStub(channel).UploadInstances(iter(msgs[:2]), timeout=30)
        assert error_info_of(err.value).reason == "INCOMPLETE_INSTANCE"
    with sync_channel(replicas[1].target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            ingest_pb2_grpc.IngestServiceStub(channel).UploadInstances(iter(msgs[2:]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info_of(err.value)
    assert info.reason == "UPLOAD_ON_OTHER_REPLICA" and info.metadata["upload_id"] == uid
    assert info.metadata["replica"].endswith(str((tmp_path / "a" / "data").resolve())), info.metadata
    stats = UploadStats()
    (receipt,) = send_files([path], replicas[1].target, chunk_bytes=chunk, stats=stats, retry_wait_s=0.05)
    assert receipt.upload_id == uid and stats.errors == ["UPLOAD_ON_OTHER_REPLICA"] and stats.streams == 2


def test_the_heartbeat_keeps_a_long_assembly_claimed(tmp_path, db_url, ct_files):
    """An assembly longer than the claim's duration keeps its claim (renewed every third of it):
    the other replica, trying meanwhile, does not take the version over."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    stores = [
        IngestStore(tmp_path / n, blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1, claim_s=0.6)
        for n in ("a", "b")
    ]
    try:
        series_id = _receive_split(stores, ct_files)
        for s in stores:
            s.spool_drain.drain()
        slow = CountingAssembler(stores[0], blobs, hold_s=2.0)  # > 3 claim durations
        (sv,) = stores[0].due_for_assembly(0.0)
        worker = threading.Thread(target=slow.assemble, args=(sv,))
        worker.start()
        while not slow.builds:  # a holds its claim and is building
            time.sleep(0.01)
        taken = []
        while worker.is_alive():
            taken.append(stores[1].begin_assembly(series_id, 1, 3))
            time.sleep(0.1)
        worker.join()
        assert slow.builds == 1 and len(taken) >= 5 and set(taken) == {None}, taken
        assert stores[1].get_series(series_id).state == "ASSEMBLED"
    finally:
        for s in stores:
            s.close()


def test_the_same_instances_sent_to_both_replicas_at_once_are_stored_once(tmp_path, db_url):
    """A sender retrying through the load balancer: both replicas receive the same instances at
    the same time. One row each, the other reception is a duplicate, nothing fails (the series'
    lock orders the two transactions; without it PostgreSQL refuses the second primary key)."""
    _blobs, stores = _replicas(tmp_path, db_url)
    barrier = threading.Barrier(2)
    results: list[list] = [[], []]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            barrier.wait(60)
            for n in range(20):
                results[i].append(stores[i].store_instance(b"slice-%d" % n, "st", "se", f"sop-{n}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        firsts = [r for rs in results for r in rs if not r.duplicate]
        assert len(firsts) == 20 and not any(r.conflict for rs in results for r in rs)
        sv = stores[0].get_series(firsts[0].series_id)
        assert (sv.version, sv.instance_count, sv.duplicate_count) == (1, 20, 20)
    finally:
        for s in stores:
            s.close()


def test_a_deletion_on_one_replica_is_not_undone_by_the_others_drain_or_recovery(tmp_path, db_url):
    """Replica b acknowledged instances of a study (spooled, not drained; one more in a spool a
    crash left behind), then the study is deleted through replica a: b's later drain and its
    start-up recovery drop those records (neither a blob nor a row comes back), while another
    study's instances in the same spool are drained as usual."""
    from atlasflow.common.errors import FailedPrecondition
    from atlasflow.ingest.deletion import Deletions
    from atlasflow.ingest.identity import atlas_id

    blobs, (a, b) = _replicas(tmp_path, db_url)
    crashed = IngestStore(tmp_path / "replica-c", blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1)
    case = atlas_id("case", "del-study")
    try:
        gone = [b.store_instance(b"deleted-%d" % i, "del-study", "del-series", f"del-{i}") for i in range(3)]
        kept = b.store_instance(b"other-study", "keep-study", "keep-series", "keep-1")
        crashed.store_instance(b"deleted-crash", "del-study", "del-series-2", "del-c")
        crashed.close()  # killed before its drain: the record waits in its spool
        deletion, created = Deletions(a, blobs, grace_s=0.0).start(case, "consent withdrawn", "admin-1")
        assert created and gone[0].case_id == case
        assert b.spool_drain.drain() == 1 and b.spool_drain.dropped_deleted == 3
        assert not any(blobs.exists(d) for d in _digests(b"deleted-0", b"deleted-1", b"deleted-2"))
        assert blobs.exists(_digests(b"other-study")[0]) and b.get_series(kept.series_id).instance_count == 1
        # the crashed replica restarts: its recovery drops the record, no row is re-created
        crashed = IngestStore(
            tmp_path / "replica-c", blobs, database=db_url, spool_segment_bytes=1 << 20, spool_spares=1
        )
        assert crashed.spool_drain.dropped_deleted == 1 and not blobs.exists(_digests(b"deleted-crash")[0])
        assert [s.case_id for s in crashed.list_series(100, "")[0]] == [kept.case_id]
        # and no replica takes new instances of the study
        with pytest.raises(FailedPrecondition) as e:
            b.store_instance(b"deleted-9", "del-study", "del-series", "del-9")
        assert e.value.reason == "STUDY_DELETED" and e.value.metadata["deletion_id"] == deletion.deletion_id
    finally:
        for s in (a, b, crashed):
            s.close()


def _digests(*data: bytes) -> list[str]:
    from atlasflow.common.blobstore import digest_of

    return [digest_of(d) for d in data]


def test_a_stopped_replica_drains_its_spool(tmp_path):
    """A replica stopped gracefully (a rolling update, a scale-down) drains its spool into the
    shared blob store before it exits: no acknowledged instance waits on a volume that no pod
    may mount again, and the other replicas can assemble its series at once."""
    import asyncio

    from atlasflow.ingest.app import build_app
    from atlasflow.ingest.settings import IngestSettings

    settings = IngestSettings(
        data_dir=str(tmp_path / "data"), blob_dir=str(tmp_path / "blobs"), grpc_port=0, dicom_port=0, auth_disabled=True
    )

    async def run() -> IngestStore:
        app = await build_app(settings)
        store: IngestStore = app.parts["store"]
        store.spool_drain.drain_if_idle = lambda *_a, **_k: 0  # type: ignore[method-assign]  # only the stop drains
        await app.start()
        try:
            await asyncio.to_thread(store.store_instance, b"acknowledged", "st-stop", "se-stop", "sop-stop")
            assert store.spool.segments() and not store.blobs.exists(_digests(b"acknowledged")[0])
        finally:
            await app.stop()
        return store

    store = asyncio.run(run())
    assert store.blobs.exists(_digests(b"acknowledged")[0])
    assert not store.spool.segments()


def test_a_resumable_upload_continued_on_another_replica_is_refused_and_kept(tmp_path, db_url):
    """The partial bytes of a resumable upload are on the replica that received them: a chunk
    or the last chunk reaching another replica is refused with UPLOAD_ON_OTHER_REPLICA naming the
    holder (nothing written there, nothing discarded); the holder completes it. A first chunk
    (offset 0) on another replica starts the upload over there, and the old holder then refuses."""
    import hashlib

    from atlasflow.common.errors import Unavailable
    from atlasflow.common.metrics import Metrics
    from atlasflow.ingest.reception import Reception

    _blobs, (a, b) = _replicas(tmp_path, db_url)
    data = peers.build_ct_series(tmp_path / "one", 1, seed="upload-replica")[0].read_bytes()
    half, sha = len(data) // 2, hashlib.sha256(data).hexdigest()
    try:
        a.uploads.write("up-1", 0, data[:half])
        for attempt in (
            lambda: b.uploads.write("up-1", half, data[half:]),
            lambda: Reception(b, Metrics("ingest-b")).finish_resumable("up-1", "ref", sha),
        ):
            with pytest.raises(Unavailable) as e:
                attempt()
            assert e.value.reason == "UPLOAD_ON_OTHER_REPLICA"
            assert e.value.metadata == {"upload_id": "up-1", "replica": a.holder}
        a_id = a.uploads.replica
        assert not any(b.uploads.dir.iterdir())  # nothing written on b
        assert (a.uploads.status("up-1").committed_offset, a.uploads.status("up-1").owner) == (half, a.holder)
        # a restarted single replica (a Deployment's new pod: another host name, same volume)
        # finds the bytes in its data directory and continues
        a.close()
        a = IngestStore(
            tmp_path / "replica-a",
            _blobs,
            database=db_url,
            spool_segment_bytes=1 << 20,
            spool_spares=1,
            holder="new-pod",
        )
        a.uploads.write("up-1", half, data[half:])
        assert a.uploads.replica == a_id != b.uploads.replica
        receipt = Reception(a, Metrics("ingest-a")).finish_resumable("up-1", "ref", sha)
        assert not receipt.duplicate and a.get_series(receipt.series_id).instance_count == 1
        # offset 0 on another replica: the upload starts over there
        a.uploads.write("up-2", 0, b"first half")
        b.uploads.write("up-2", 0, b"again")
        assert (b.uploads.status("up-2").committed_offset, b.uploads.status("up-2").owner) == (5, b.holder)
        with pytest.raises(Unavailable) as e:
            a.uploads.write("up-2", 10, b"second half")
        assert e.value.metadata["replica"] == b.holder
    finally:
        for s in (a, b):
            s.close()


def test_two_replicas_asked_to_delete_one_study_at_once_make_one_deletion(tmp_path, db_url):
    """Replica b's DeleteStudy read "no deletion yet" just before replica a's committed (forced
    here: b's first look is blind): under the study's lock b sees a's and returns it."""
    from atlasflow.ingest.deletion import Deletions
    from atlasflow.ingest.identity import atlas_id

    class LateDeletions(Deletions):
        looks = 0

        def _existing(self, conn, case_id):  # noqa: ANN001, ANN202 - the parent's signature
            self.looks += 1
            return None if self.looks == 1 else super()._existing(conn, case_id)

    blobs, (a, b) = _replicas(tmp_path, db_url)
    case = atlas_id("case", "race-study")
    try:
        b.store_instance(b"race-1", "race-study", "race-series", "race-1")
        first, created = Deletions(a, blobs).start(case, "consent withdrawn", "admin-1")
        late = LateDeletions(b, blobs)
        second, created_again = late.start(case, "again", "admin-2")
        assert created and not created_again and late.looks == 2
        assert second.deletion_id == first.deletion_id and second.reason == "consent withdrawn"
        with a.db.read() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM deletions")).scalar() == 1
            assert conn.execute(sa.text("SELECT COUNT(*) FROM outbox")).scalar() == 3  # one PurgeStudy per peer
    finally:
        for s in (a, b):
            s.close()
