"""The pure parts of benchmarks/bench_campaign.py (atlasflow.testing.campaign): result accounting
(completed / lost / duplicated from the services' job and version lists) and the projection
arithmetic. The campaign itself (processes, PostgreSQL, S3) runs in the benchmark, not here."""

from __future__ import annotations

import pytest

from atlasflow.testing.campaign import (
    CAMPAIGN_CTS,
    GPU_SECONDS_PER_CT,
    JobRecord,
    VersionRecord,
    account,
    project,
)


def job(
    jid: str, case: str, version: int = 1, ensemble: str = "abdomen-trio-v1", state: str = "SUCCEEDED"
) -> JobRecord:
    return JobRecord(jid, case, "ser-" + case, version, ensemble, state)


def ai(vid: str, case: str, model: str = "abdomen-trio-v1", job_id: str = "") -> VersionRecord:
    return VersionRecord(vid, case, "ai", model, job_id)


def test_every_study_completed_once() -> None:
    acc = account(
        ["a", "b"],
        [job("j1", "a"), job("j2", "b")],
        [ai("v1", "a"), ai("v2", "b")],
        ["a", "b"],
    )
    assert (acc.sent, sorted(acc.completed), acc.lost, acc.duplicated, acc.failed_jobs) == (2, ["a", "b"], [], 0, 0)


def test_lost_needs_both_a_version_and_a_worklist_entry() -> None:
    acc = account(
        ["a", "b", "c", "a"],  # a study sent twice is one study
        [job("j1", "a"), job("j2", "b")],
        [ai("v1", "a"), ai("v2", "b")],
        ["a", "c"],  # b has no worklist entry, c no AI version
    )
    assert acc.sent == 3
    assert acc.completed == ["a"]
    assert acc.lost == ["b", "c"]


def test_duplicates_are_extra_jobs_per_series_version_and_extra_ai_versions_per_model() -> None:
    acc = account(
        ["a", "b"],
        [
            job("j1", "a"),
            job("j2", "a"),  # same series version + ensemble: a duplicate
            job("j3", "a", version=2),  # a new series version: not a duplicate
            job("j4", "a", ensemble="abdomen-trio-v2"),  # another ensemble: not a duplicate
            job("j5", "b"),
            job("j6", "b"),
            job("j7", "b", state="FAILED"),
        ],
        [
            ai("v1", "a"),
            ai("v2", "a"),  # second AI version of one model: a duplicate
            ai("v3", "a", model="abdomen-trio-v2"),
            VersionRecord("v4", "a", "radiologist", "", ""),  # human revisions are not duplicates
            VersionRecord("v5", "a", "radiologist", "", ""),
            ai("v6", "b"),
        ],
        ["a", "b"],
    )
    assert acc.duplicated == 4
    assert acc.duplicates.count("segmentation job: ser-b v1 abdomen-trio-v1") == 2
    assert acc.duplicates.count("segmentation job: ser-a v1 abdomen-trio-v1") == 1
    assert acc.duplicates.count("AI label version: a abdomen-trio-v1") == 1
    assert acc.failed_jobs == 1
    assert acc.lost == []


def test_projection_gpu_bound() -> None:
    p = project({"ingest": 1.0, "labels": 1.0}, nodes=8, cores_per_node=16)
    assert p.gpu_hours == pytest.approx(CAMPAIGN_CTS * GPU_SECONDS_PER_CT / 8 / 3600)  # 3.34 h
    assert p.gpu_hours == pytest.approx(3.344, abs=1e-3)
    # 2 CPU-s per CT on 128 cores: 8448 * 2 / 128 / 3600 h
    assert p.cpu_hours["ingest"] == pytest.approx(8448 * 2 / 128 / 3600)
    assert p.hours == p.gpu_hours
    assert p.bottleneck.startswith("GPU")
    # each stage needs cts * cost / GPU seconds cores to keep pace
    assert p.cores_needed["ingest"] == pytest.approx(8448 * 1.0 / (p.gpu_hours * 3600))


def test_projection_cpu_bound_names_the_largest_stage_and_scale_applies() -> None:
    p = project({"ingest": 10.0, "segmentation": 30.0}, nodes=4, cores_per_node=4, scale=2.0)
    assert p.hours == pytest.approx(8448 * 80.0 / 16 / 3600)
    assert p.hours > p.gpu_hours
    assert "segmentation" in p.bottleneck and p.bottleneck.startswith("CPU")


def test_projection_rejects_no_nodes() -> None:
    with pytest.raises(ValueError):
        project({"ingest": 1.0}, nodes=0)


def _bench():  # the benchmark script's own helpers (benchmarks/ is not a package)
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_campaign.py"
    spec = importlib.util.spec_from_file_location("bench_campaign", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_campaign", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_reads_the_services_lists_and_timestamps() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from atlasflow.common.v1 import common_pb2
    from atlasflow.ingest.v1 import ingest_pb2
    from atlasflow.labels.v1 import labels_pb2
    from atlasflow.ranking.v1 import ranking_pb2
    from atlasflow.segmentation.v1 import segmentation_pb2

    bench = _bench()
    t = lambda s: Timestamp(seconds=s)  # noqa: E731
    raw = {
        "series": [
            ingest_pb2.Series(
                series_id="ser-a",
                case_id="a",
                version=1,
                state=ingest_pb2.SERIES_STATE_DISPATCHED,
                create_time=t(100),
                update_time=t(106),
            )
        ],
        "jobs": [
            segmentation_pb2.SegmentationJob(
                job_id="j1",
                case_id="a",
                series_id="ser-a",
                series_version=1,
                ensemble_version="abdomen-trio-v1",
                state=common_pb2.OPERATION_STATE_SUCCEEDED,
                create_time=t(110),
                update_time=t(130),
                attempts=2,
                result=segmentation_pb2.SegmentationResult(inference_seconds=12.5),
            )
        ],
        "versions": [
            labels_pb2.LabelVersion(
                version_id="v1",
                case_id="a",
                create_time=t(131),
                provenance=labels_pb2.Provenance(
                    source=labels_pb2.LABEL_SOURCE_AI, model_version="abdomen-trio-v1", job_id="j1"
                ),
            )
        ],
        "worklist": {"a": ranking_pb2.WorklistItem(case_id="a", source_job_id="j1", update_time=t(133))},
    }
    jobs, versions = bench.records(raw)
    assert jobs == [JobRecord("j1", "a", "ser-a", 1, "abdomen-trio-v1", "SUCCEEDED")]
    assert versions == [VersionRecord("v1", "a", "ai", "abdomen-trio-v1", "j1")]
    assert account(["a"], jobs, versions, raw["worklist"]).completed == ["a"]
    lat = bench.stage_latencies(raw, {"a"})
    assert lat == {
        "ingest_to_assembled_s": 6.0,
        "segmentation_job_s": 20.0,
        "segmentation_inference_s": 12.5,
        "labels_after_job_s": 1.0,
        "ranking_after_job_s": 3.0,
    }


def test_bench_studies_have_their_own_uids(tmp_path) -> None:
    from pydicom import dcmread

    from atlasflow.ingest.identity import atlas_id

    studies, voxels = _bench().make_studies(2, 4, tmp_path / "dicom")
    assert len({case for case, _ in studies}) == 2
    for case, files in studies:
        assert len(files) == 4
        ds = dcmread(files[0])
        assert atlas_id("case", ds.StudyInstanceUID) == case
    assert voxels == 122 * 101 * 4
