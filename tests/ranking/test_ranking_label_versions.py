"""The worklist follows the labels service: human-decided organs leave the priority, events are
idempotent and ordered by version_number, cases without attention are remembered."""

from __future__ import annotations

import pytest

from atlasflow.common.errors import InvalidArgument
from atlasflow.ranking.entries import OrganAttention, Status, WorklistFilter
from atlasflow.ranking.worklist import SqliteWorklist


def oa(organ: int, attention: float) -> OrganAttention:
    return OrganAttention(organ, attention, attention / 2, 100.0)


@pytest.fixture
def wl(db_url):
    """The store contract runs on SQLite and on PostgreSQL (tests/conftest.py `db_url`)."""
    w = SqliteWorklist(db_url)
    yield w
    w.close()


def test_revision_removes_the_answered_organs_and_reranks(wl):
    wl.submit("a", "s", "j", [oa(5, 10.0), oa(8, 4.0)])  # liver 10 ml, spleen 4 ml
    wl.submit("b", "s", "j", [oa(5, 7.0)])
    assert [e.case_id for e, _ in wl.list()[0]] == ["a", "b"]
    wl.record_label_version("a", "v1", 1)  # the AI version: nothing human yet
    assert wl.get("a")[0].priority == pytest.approx(14.0)
    entry, rank = wl.record_label_version("a", "v2", 2, human_organs=[5], revised_organs=[5], reviewer="dr.x")
    assert entry.priority == pytest.approx(4.0) and rank == 2
    assert entry.label_version_id == "v2" and entry.human_decided_organs == (5,)
    assert entry.status == Status.PENDING  # a revision does not close the review by itself
    # the organ filter follows: liver no longer calls for review in case a
    items, _, _ = wl.list(where=WorklistFilter(organs=frozenset({5})))
    assert [e.case_id for e, _ in items] == ["b"]
    # a new AI segmentation keeps the human decision out of the priority
    entry, _ = wl.submit("a", "s", "j2", [oa(5, 30.0), oa(8, 1.0)])
    assert entry.priority == pytest.approx(1.0) and entry.human_decided_organs == (5,)


def test_replays_and_late_events_change_nothing(wl):
    wl.submit("a", "s", "j", [oa(5, 10.0), oa(8, 4.0), oa(3, 1.0)])
    wl.record_label_version("a", "v3", 3, human_organs=[5, 8], revised_organs=[8])
    late, _ = wl.record_label_version("a", "v2", 2, human_organs=[5], revised_organs=[5])
    again, _ = wl.record_label_version("a", "v3", 3, human_organs=[5, 8], revised_organs=[8])
    assert late.label_version_id == again.label_version_id == "v3"
    assert late.priority == again.priority == pytest.approx(1.0)
    assert again.human_decided_organs == (5, 8)


def test_labels_before_attention_are_remembered(tmp_path):
    path = tmp_path / "ranking.sqlite"
    with SqliteWorklist(path) as wl:
        assert wl.record_label_version("c", "v1", 1, human_organs=[1, 2]) is None
    with SqliteWorklist(path) as wl:  # survives a restart
        entry, _ = wl.submit("c", "s", "j", [oa(1, 5.0), oa(2, 3.0), oa(9, 2.5)], labelled_organs=[9])
        assert entry.priority == 0.0 and entry.label_version_id == "v1"
        assert entry.human_decided_organs == (1, 2) and entry.labelled_organs == (9,)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(case_id="", label_version_id="v", version_number=1), "case_id"),
        (dict(case_id="c", label_version_id="", version_number=1), "label_version_id"),
        (dict(case_id="c", label_version_id="v", version_number=0), "version_number"),
        (dict(case_id="c", label_version_id="v", version_number=1, human_organs=[10]), None),
        (dict(case_id="c", label_version_id="v", version_number=1, revised_organs=[4]), None),
    ],
)
def test_invalid_events(wl, kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        wl.record_label_version(**kwargs)
    if field:
        assert err.value.metadata.get("field") == field


def test_decided_organs_list_no_reasons(wl):
    """The worklist asks a reviewer about undecided organs only: an organ a human decided (or
    the source labelled) keeps its figures but lists no reasons, in get and list alike."""
    organs = [
        OrganAttention(5, 10.0, 5.0, 100.0, reasons=("liver: std mask 12 ml",)),
        OrganAttention(8, 4.0, 2.0, 100.0, reasons=("spleen: 3 components",)),
        OrganAttention(3, 1.0, 0.5, 100.0, reasons=("kidney_left: volume 2x median",)),
    ]
    wl.submit("a", "s", "j", organs, labelled_organs=[3])
    by = {o.organ: o for o in wl.get("a")[0].organs}
    assert by[5].reasons and by[8].reasons and by[3].reasons == ()
    wl.record_label_version("a", "v2", 2, human_organs=[5], revised_organs=[5], reviewer="dr.x")
    for entry in (wl.get("a")[0], wl.list()[0][0][0]):
        by = {o.organ: o for o in entry.organs}
        assert by[5].reasons == () and by[5].attention_ml == pytest.approx(10.0)
        assert by[8].reasons == ("spleen: 3 components",)
    # a new AI segmentation of the case: the decided organ still lists none
    wl.submit("a", "s", "j2", organs)
    by = {o.organ: o for o in wl.get("a")[0].organs}
    assert by[5].reasons == () and by[8].reasons and by[3].reasons
