"""The `learned` strategy on the site's own decisions (atlasflow.ranking.learned): organ
features arrive with the attention, each revise/accept decision is stored with them (SQLite and
PostgreSQL), and once enough decisions exist the real ranking server refits and reorders the
worklist by the model; before that nothing changes (the reference order)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import InvalidArgument
from atlasflow.common.metrics import Metrics
from atlasflow.common.server import error_info_of
from atlasflow.method.learned import FEATURES, MIN_DECISIONS
from atlasflow.ranking.entries import OrganAttention
from atlasflow.ranking.v1 import ranking_pb2 as pb
from atlasflow.ranking.v1 import ranking_pb2_grpc
from atlasflow.ranking.worklist import SqlWorklist
from atlasflow.testing import auth
from atlasflow.testing.servers import in_process_ranking_server

SEGMENTATION = auth.service_metadata("segmentation")
LABELS = auth.service_metadata("labels")
LIVER, SPLEEN = 5, 1


def features(suspicious: float, noise: float = 0.0) -> dict[str, float]:
    """Features where ``suspicious`` (the std-mask term) is what predicts a revision, while the
    reference heatmap (what the reference order uses) says the opposite."""
    f = dict.fromkeys(FEATURES, 0.0)
    f["ref_std_ml"] = math.log1p(suspicious)
    f["ref_heatmap_ml"] = math.log1p(10.0 - min(suspicious, 9.0)) + noise
    f["ref_attention_ml"] = f["ref_heatmap_ml"]
    return f


def test_decisions_are_stored_once_with_the_features_on_both_databases(db_url: str) -> None:
    store = SqlWorklist(db_url)
    try:
        organ = OrganAttention(LIVER, 5.0, 2.0, 100.0, score=2.0, features=features(8.0))
        store.submit("case-a", "s", "job-1", [organ, OrganAttention(SPLEEN, 1.0, 1.0, 50.0, score=1.0)])
        assert store.get("case-a")[0].organs[0].features == pytest.approx(features(8.0))
        for _ in range(2):  # a replayed event records nothing twice
            store.record_label_version("case-a", "v2", 2, [LIVER, SPLEEN], [LIVER, SPLEEN], "dr-a", (), {LIVER: 12.5})
        decisions = store.organ_decisions()
        assert [(d.revised_ml, dict(d.features)) for d in decisions] == [(12.5, pytest.approx(features(8.0)))]
        # an accepted organ (0 ml) is a decision too; the spleen's attention had no features
        store.record_label_version(
            "case-a", "v3", 3, [LIVER, SPLEEN], [LIVER, SPLEEN], "dr-b", (), {LIVER: 0, SPLEEN: 3}
        )
        assert [d.revised_ml for d in store.organ_decisions()] == [12.5, 0.0]
        with pytest.raises(InvalidArgument) as bad:
            store.record_label_version("case-a", "v4", 4, [LIVER], [], "dr-b", (), {LIVER: 1.0})
        assert bad.value.reason == "INVALID_LABEL_VERSION"
        for broken in ({"x" * 65: 1.0}, {"ref_std_ml": math.nan}, {f"f{i}": 0.0 for i in range(65)}):
            with pytest.raises(InvalidArgument) as bad:
                store.submit("case-b", "s", "job-2", [OrganAttention(LIVER, 1.0, 1.0, 1.0, features=broken)])
            assert bad.value.reason == "INVALID_ATTENTION"
    finally:
        store.close()


def _organ(o: int, f: dict[str, float]) -> pb.OrganAttention:
    heat = math.expm1(f["ref_heatmap_ml"])
    return pb.OrganAttention(
        organ=o, attention_ml=heat, heatmap_ml=heat, volume_ml=100.0, score=heat, reasons=["seen"], features=f
    )


def test_the_server_refits_on_decisions_and_reorders_the_worklist(tmp_path) -> None:
    rng = np.random.default_rng(7)
    store = SqlWorklist(tmp_path / "ranking.sqlite3")
    with in_process_ranking_server(store, Metrics("ranking")) as port, sync_channel(f"127.0.0.1:{port}") as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)

        def submit(case: str, suspicious: float) -> None:
            stub.SubmitAttention(
                pb.SubmitAttentionRequest(
                    case_id=case,
                    series_id="s-" + case,
                    source_job_id="job-" + case,
                    organs=[_organ(LIVER, features(suspicious, float(rng.normal(0, 0.05))))],
                ),
                metadata=SEGMENTATION,
            )

        # two open cases: the reference order puts the calm one first
        submit("open-calm", 0.5)
        submit("open-suspicious", 8.5)

        def order() -> list[str]:
            items = stub.ListWorklist(pb.ListWorklistRequest(page_size=50), metadata=auth.metadata("reviewer"))
            return [i.case_id for i in items.items if i.case_id.startswith("open-")]

        assert order() == ["open-calm", "open-suspicious"]

        # reviewed cases: suspicious organs were revised, calm ones accepted as they were
        def decide(i: int, revised: bool) -> None:
            case = f"done-{i}"
            submit(case, float(rng.uniform(6, 9)) if revised else float(rng.uniform(0, 3)))
            stub.RecordLabelVersion(
                pb.RecordLabelVersionRequest(
                    case_id=case,
                    label_version_id=f"v-{i}",
                    version_number=2,
                    human_decided_organs=[LIVER],
                    revised_organs=[LIVER],
                    reviewer="dr-a",
                    organ_changes=[
                        pb.OrganChange(organ=LIVER, changed_ml=float(rng.uniform(5, 40)) if revised else 0.0)
                    ],
                ),
                metadata=LABELS,
            )

        for i in range(MIN_DECISIONS - 2):
            decide(i, revised=i % 2 == 0)
        assert order() == ["open-calm", "open-suspicious"]  # not enough decisions: reference order
        for i in range(MIN_DECISIONS - 2, MIN_DECISIONS + 20):
            decide(i, revised=i % 2 == 0)
        assert order() == ["open-suspicious", "open-calm"]  # refitted: the model's order
        item = stub.GetWorklistItem(
            pb.GetWorklistItemRequest(case_id="open-suspicious"), metadata=auth.metadata("reviewer")
        ).item
        top = item.organs[0]
        assert 0.5 < top.score <= 1.0 and math.isclose(item.priority, top.score)
        assert top.reasons[0].startswith("liver: revision chance") and "std mask" in top.reasons[0]
        assert list(top.reasons[1:]) == ["seen"]

        # a malformed decision is refused, and a wrong caller cannot feed decisions
        with pytest.raises(grpc.RpcError) as bad:
            stub.RecordLabelVersion(
                pb.RecordLabelVersionRequest(
                    case_id="open-calm",
                    label_version_id="v-x",
                    version_number=2,
                    human_decided_organs=[LIVER],
                    revised_organs=[LIVER],
                    organ_changes=[pb.OrganChange(organ=LIVER, changed_ml=-1.0)],
                ),
                metadata=LABELS,
            )
        info = error_info_of(bad.value)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info and info.reason == "INVALID_LABEL_VERSION"
        for caller in (auth.metadata("reviewer"), SEGMENTATION, ()):
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecordLabelVersion(
                    pb.RecordLabelVersionRequest(case_id="open-calm", label_version_id="v-y", version_number=3),
                    metadata=caller,
                )
            assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
    store.close()
