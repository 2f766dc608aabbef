"""The simulator families (atlasflow.testing.sim_families) and a tiny run of the
leave-one-family-out ranking benchmark (benchmarks/bench_ranking.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from atlasflow.common.organs import ORGANS
from atlasflow.method.attention import case_attention
from atlasflow.testing import sim_families
from atlasflow.testing.data import REPO
from atlasflow.testing.error_sim import case_error_regions
from atlasflow.testing.sim_families import ParametricFamily, family_names, get_family, load_params
from atlasflow.testing.sim_families import base as family_base

PARAMETRIC = [n for n in family_names() if isinstance(get_family(n), ParametricFamily)]


def test_at_least_four_families_each_with_its_committed_parameters() -> None:
    names = family_names()
    assert len(names) >= 4 and "error_sim" in names
    for n in names:
        fam = get_family(n)
        assert fam.name == n and fam.params == load_params(n)
        assert isinstance(fam.params["seed_offset"], int) and fam.params["description"]
    offsets = [get_family(n).params["seed_offset"] for n in names]
    assert len(set(offsets)) == len(offsets)  # no two families share seeds


@pytest.mark.parametrize("name", family_names())
def test_a_family_is_deterministic_in_its_seed(name: str) -> None:
    fam = get_family(name)
    seed = fam.params["seed_offset"] + 3
    a, b = fam.simulate(seed), get_family(name).simulate(seed)
    assert a.error == b.error and a.organ == b.organ and a.shared == b.shared
    np.testing.assert_array_equal(a.truth, b.truth)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert sorted(a.probs) == sorted(ORGANS) and sorted(a.clean_probs) == sorted(b.clean_probs)
    for k in a.probs:
        assert a.probs[k].dtype == np.uint8 and a.probs[k].shape == (3, *a.truth.shape)
        np.testing.assert_array_equal(a.probs[k], b.probs[k])
    other = fam.simulate(seed + 1)
    assert other.truth.shape != a.truth.shape or not np.array_equal(other.truth, a.truth)


@pytest.mark.parametrize("name", PARAMETRIC)
def test_the_drawn_error_mix_is_the_documented_one(name: str) -> None:
    """Over 400 seeds the planned cases follow the JSON: share of clean cases, error kinds,
    models sharing an error, confidence range (tolerance: ~3 binomial standard errors)."""
    fam = get_family(name)
    ep = fam.params["errors"]
    plans = [fam.plan(fam.params["seed_offset"] + i) for i in range(400)]
    clean = sum(not p.kinds for p in plans) / len(plans)
    assert abs(clean - ep["clean_p"]) < 0.07
    kinds = Counter(k for p in plans for k in p.kinds)
    shared = Counter(s for p in plans for s in p.shared)
    n = sum(kinds.values())
    wk = sum(ep["kinds"].values())
    assert set(kinds) <= set(ep["kinds"])
    for k, w in ep["kinds"].items():
        if name == "laterality_mix" and k in ("swap", "fragment"):
            continue  # a second swap in a case becomes a fragment (documented)
        assert abs(kinds[k] / n - w / wk) < 0.08, (k, kinds)
    for s, w in ep["shared"].items():
        assert abs(shared[int(s)] / n - w) < 0.08, (s, shared)
    conf = [c for p in plans for c in p.confidence]
    assert ep["confidence"][0] <= min(conf) and max(conf) <= ep["confidence"][1]
    counts = Counter(len(p.kinds) for p in plans if p.kinds)
    assert set(counts) <= {int(c) for c in ep["count"]}


def test_error_sim_family_draws_error_sims_mix() -> None:
    fam = get_family("error_sim")
    mix = fam.params["documented_mix"]
    for i in range(3):
        p = fam.plan(fam.params["seed_offset"] + i)
        assert p.kinds[0] in mix["kinds"] and 1 <= p.shared[0] <= 3


def test_an_error_held_by_all_three_models_is_an_ensemble_error_and_a_clean_case_has_none() -> None:
    fam = get_family("sure_models")
    off = fam.params["seed_offset"]
    seed = next(off + i for i in range(200) if (p := fam.plan(off + i)).kinds == ["missing"] and p.shared == [3])
    clean_seed = next(off + i for i in range(200) if not fam.plan(off + i).kinds)
    c = fam.simulate(seed)
    ca = case_attention({k: torch.from_numpy(v) for k, v in c.probs.items()})
    ens = {k: r.paste("ensemble", ca.shape).numpy() for k, r in ca.organs.items() if k in c.clean_probs}
    regions = case_error_regions(c, ens)
    assert regions and {k for k, _ in regions} == {c.organ}
    assert c.extra["errors"][0]["shared"] == 3
    clean = fam.simulate(clean_seed)
    assert clean.error == "none" and not clean.clean_probs and case_error_regions(clean, {}) == []


def test_a_new_family_joins_by_registering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(family_base, "_FAMILIES", dict(family_base._FAMILIES))

    @sim_families.register_family("zz_copy")
    class Copy(ParametricFamily):
        name = "zz_copy"

        def __init__(self) -> None:
            self.params = {**load_params("soft_blur"), "name": "zz_copy"}

    assert "zz_copy" in family_names()
    assert get_family("zz_copy").plan(5) == get_family("soft_blur").plan(5)
    with pytest.raises(ValueError, match="already registered"):
        sim_families.register_family("soft_blur")(Copy)
    with pytest.raises(KeyError, match="unknown simulator family"):
        get_family("nope")


def test_bench_ranking_tiny_run() -> None:
    """Two families, two cases each, every registered strategy: the table and the JSON line."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_ranking.py"),
            *("--cases", "2", "--families", "soft_blur,sure_models", "--boot", "20", "--rounds", "2"),
            *("--jobs", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("held-out family")
    summary = json.loads(lines[-1])
    assert set(summary["table"]) == {"soft_blur", "sure_models"}
    for fam in summary["table"].values():
        assert {"reference", "enhanced", "learned"} <= set(fam)
        for m in fam.values():
            assert m["n"] == 2 and {"auroc", "r_precision", "first_organ", "auroc_ci95"} <= set(m)
    # two cases from one other family are far below learned.MIN_DECISIONS: it ranks as reference
    assert summary["table"]["soft_blur"]["learned"]["fitted"] is False
    assert set(summary["rounds"]) == {"soft_blur", "sure_models"}
    assert set(summary["never_worse_than_reference"]) >= {"reference", "enhanced", "learned"}


def test_the_default_is_the_one_docs_ranking_md_chose() -> None:
    """docs/ranking.md's table chose ``reference`` (the only strategy at or above reference on
    every held-out family); the code default and the shipped ensemble follow it."""
    from atlasflow.method.strategy import DEFAULT_STRATEGY
    from atlasflow.segmentation.ensemble import ENSEMBLE_DIR, load_ensemble

    assert DEFAULT_STRATEGY == "reference"
    doc = (REPO / "docs" / "ranking.md").read_text()
    assert "`reference` (`DEFAULT_STRATEGY`" in doc
    for path in sorted(ENSEMBLE_DIR.glob("*.json")):
        assert load_ensemble(path.stem).attention_mode == DEFAULT_STRATEGY, path.name
