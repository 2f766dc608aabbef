"""Training data from decisions on a real labels store: only human organs are targets (latest
human version per organ), undecided organs masked or pseudo-labelled, the manifest is
content-addressed and re-verified."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atlasflow.common.errors import DataLoss, FailedPrecondition
from atlasflow.training.dataset import (
    build_manifest,
    collect_decisions,
    load_case,
    load_manifest,
    write_manifest,
)

HP = {"steps": 2}


def test_decisions_are_the_latest_human_version_per_organ(store):
    decisions = {d.case_id: d for d in collect_decisions(store.repo)}
    assert set(decisions) == {"case-a", "case-b", "case-c", "case-d"}
    a = decisions["case-a"]
    history = store.repo.history("case-a")
    # case-a: AI version, liver revision, spleen revision -> liver decided by v2, spleen by v3
    assert [v.provenance.source for v in history] == ["ai", "radiologist", "radiologist"]
    assert a.human == {5: history[1].version_id, 8: history[2].version_id}
    assert a.version_id == history[-1].version_id
    assert set(a.ai) == set(range(1, 10)) - {5, 8}
    assert all(m == "abdomen-trio-v1" for m in a.ai.values())
    assert decisions["case-c"].human == {}


def test_manifest_masks_undecided_organs_and_skips_ai_only_cases(store, tmp_path):
    decisions = collect_decisions(store.repo)
    m = build_manifest(
        decisions, parent_version="abdomen-trio-v1", seed=7, hyperparameters=HP, holdout_cases={"case-d"}
    )
    assert [c.case_id for c in m.train] == ["case-a", "case-b"]
    assert [c.case_id for c in m.holdout] == ["case-d"]
    a = m.train[0]
    assert a.organ_weights == tuple(1.0 if o in (5, 8) else 0.0 for o in range(1, 10))
    # the head's label map holds the human liver exactly as revised (not the shifted AI liver)
    arrays = load_case(store.blobs, a)
    assert np.array_equal(arrays.organs[4].astype(bool), store.reference["case-a"] == 5)
    path, digest = write_manifest(m, tmp_path)
    again, digest2 = load_manifest(path)
    assert digest == digest2 == m.digest and again == m
    doc = json.loads(path.read_text())
    assert doc["seed"] == 7 and doc["hyperparameters"] == HP
    assert sorted(doc["train"][0]["decided_by"]) == ["5", "8"]
    assert set(m.label_version_ids) == {c.version_id for c in (*m.train, *m.holdout)}


def test_pseudo_labels_only_on_train_cases(store):
    m = build_manifest(
        collect_decisions(store.repo),
        parent_version="abdomen-trio-v1",
        seed=7,
        hyperparameters=HP,
        holdout_cases={"case-d"},
        pseudo_weight=0.5,
    )
    assert m.train[1].organ_weights == tuple(1.0 if o == 5 else 0.5 for o in range(1, 10))
    assert m.train[1].pseudo_from["1"] == "abdomen-trio-v1"
    assert m.holdout[0].organ_weights == tuple(1.0 if o == 3 else 0.0 for o in range(1, 10))


def test_seeded_split_is_stable_and_changes_with_seed(store):
    d = collect_decisions(store.repo)
    one = build_manifest(d, parent_version="p", seed=1, hyperparameters=HP, holdout_fraction=0.5)
    assert one == build_manifest(d, parent_version="p", seed=1, hyperparameters=HP, holdout_fraction=0.5)
    splits = {
        tuple(
            c.case_id
            for c in build_manifest(d, parent_version="p", seed=s, hyperparameters=HP, holdout_fraction=0.5).holdout
        )
        for s in range(8)
    }
    assert len(splits) > 1


def test_tampered_manifest_is_refused(store, tmp_path):
    m = build_manifest(collect_decisions(store.repo), parent_version="p", seed=1, hyperparameters=HP)
    path, _ = write_manifest(m, tmp_path)
    path.write_text(path.read_text().replace('"seed":1', '"seed":2'))
    with pytest.raises(DataLoss) as err:
        load_manifest(path)
    assert err.value.reason == "MANIFEST_DIGEST_MISMATCH"


def test_no_human_decision_is_a_clear_error(store):
    only_ai = [d for d in collect_decisions(store.repo) if d.case_id == "case-c"]
    with pytest.raises(FailedPrecondition) as err:
        build_manifest(only_ai, parent_version="p", seed=1, hyperparameters=HP)
    assert err.value.reason == "NO_DECISIONS"
