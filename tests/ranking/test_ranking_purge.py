"""`SqliteWorklist.purge_study` (ingest's DeleteStudy hand-off): the case's entry, lease,
submissions, rounds membership and label version go; other cases and a shared heatmap stay."""

from __future__ import annotations

import pytest

from atlasflow.common.errors import NotFound
from atlasflow.ranking.entries import OrganAttention
from atlasflow.ranking.worklist import SqliteWorklist

HEAT_A = "sha256:" + "a" * 64
HEAT_SHARED = "sha256:" + "b" * 64


def test_purge_study_removes_the_case_only(db_url):
    wl = SqliteWorklist(db_url)
    organs = [OrganAttention(5, 10.0, 5.0, 1500.0)]
    wl.submit("case-a", "ser-a", "job-a1", organs, heatmap_digest=HEAT_A, heatmap_size=10)
    wl.submit("case-a", "ser-a", "job-a2", organs, heatmap_digest=HEAT_SHARED, heatmap_size=10)
    wl.submit("case-b", "ser-b", "job-b", organs, heatmap_digest=HEAT_SHARED, heatmap_size=10)
    wl.record_label_version("case-a", "lv-1", 1)
    wl.start_round(1.0, "admin")
    wl.lease("case-a", "dr-a")

    counts, released = wl.purge_study("case-a")

    assert counts == {"round_cases": 1, "worklist_submissions": 2, "case_labels": 1, "worklist": 1}
    assert released == [HEAT_SHARED]  # the entry's current heatmap
    with pytest.raises(NotFound):
        wl.get("case-a")
    assert wl.get("case-b")[0].case_id == "case-b"
    assert wl.referenced([HEAT_A, HEAT_SHARED]) == [HEAT_SHARED]  # case-b's
    assert wl.purge_study("case-a") == ({t: 0 for t in counts}, [])
    # a later submission for the case (work in flight) makes a fresh entry; purge again removes it
    wl.submit("case-a", "ser-a", "job-a3", organs)
    assert wl.purge_study("case-a")[0]["worklist"] == 1
    wl.close()
