"""The segmentation worker's population prior comes from ranking (GetPopulationPrior on the real
ranking gRPC server, in-process): refreshed at most every refresh_s, the bundled prior until
ranking answers, the last one kept while ranking is unreachable."""

from __future__ import annotations

import pytest

from atlasflow.common.auth import TokenSource
from atlasflow.common.metrics import Metrics
from atlasflow.common.ports import free_ports
from atlasflow.method.prior import PopulationPrior
from atlasflow.ranking.prior import OrganSummary
from atlasflow.ranking.worklist import SqliteWorklist
from atlasflow.segmentation.prior_source import RankingPrior
from atlasflow.testing import auth
from atlasflow.testing.servers import in_process_ranking_server


@pytest.fixture()
def ranking(tmp_path):
    store = SqliteWorklist(tmp_path / "ranking.sqlite3")
    with in_process_ranking_server(store, Metrics("ranking-prior")) as port:
        yield f"127.0.0.1:{port}", store
    store.close()


def test_prior_follows_ranking_and_survives_its_absence(ranking):
    target, store = ranking
    bundled = PopulationPrior.load().to_dict()
    # the segmentation worker calls ranking with its own (service) token
    service = TokenSource(path=auth.token_file("service", "svc:segmentation"))
    source = RankingPrior(target, refresh_s=3600, max_message_bytes=4 << 20, token=service)
    assert source().to_dict() == bundled and source.learned_cases == 0
    store.record_label_version(
        "c1", "v1", 1, human_organs=[4], geometry=[OrganSummary(4, 700.0, (-60.0, 0.0, 50.0), False)]
    )
    assert source().to_dict() == bundled  # cached until refresh_s has passed
    source.refresh_s = 1e-9
    learned = source()
    assert source.learned_cases == 1 and learned.cases == bundled["cases"] + 1
    source.close()

    (dead,) = free_ports(1)
    offline = RankingPrior(f"127.0.0.1:{dead}", refresh_s=1e-9, max_message_bytes=4 << 20)
    assert offline().to_dict() == bundled  # nothing listening: the bundled prior, no exception
    offline.close()
