"""A whole round on the real labels store: manifest -> fine-tune (UNet, 2 steps on 32^3 crops)
-> content-addressed version with model card -> held-out evaluation -> gate; one trace."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from atlasflow.segmentation.ensemble import load_ensemble, triton_model_name
from atlasflow.training import finetune, worker
from atlasflow.training.finetune import Hyperparameters
from atlasflow.training.versions import code_version, current_ensemble, version_digest, version_name

HP = Hyperparameters(steps=2, checkpoint_every=1, crop_size=(32, 32, 32), members=("unet",), lr=1e-3)


@pytest.fixture(scope="module")
def round_result(store, tmp_path_factory):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker._tracer = finetune._tracer = provider.get_tracer("test")
    state = tmp_path_factory.mktemp("state")
    try:
        result = worker.run_round(store.repo, store.blobs, state, HP, seed=5, holdout_cases={"case-d"}, n_boot=200)
    finally:
        worker._tracer = finetune._tracer = worker.trace.get_tracer("atlasflow.training")
    return result, state, exporter.get_finished_spans()


def test_round_writes_a_version_with_card_and_gate(round_result):
    result, state, _ = round_result
    version = result.version
    assert version is not None and version.name.startswith("abdomen-trio-ft-")
    ensemble = load_ensemble(version.ensemble_path)
    # the label versions this ensemble produces will carry its name as model_version
    assert ensemble.version == version.name and ensemble.weights_trained
    assert triton_model_name(version.name) == version.name.replace("-", "_")
    card = version.card()
    assert card["parent_version"] == "abdomen-trio-v1"
    assert card["data"] == {"manifest_digest": result.manifest_digest, "train_cases": 2, "holdout_cases": 1}
    assert card["weights"]["unet"] == result.members[0].digest
    # untrained members keep the parent's weights, byte for byte
    parent = load_ensemble("abdomen-trio-v1")
    assert card["weights"]["dynunet"] == finetune.sha256_file(parent.members[2].checkpoint)
    assert card["gate"]["reason"] == result.gate.reason
    assert card["status"] == ("current" if result.promoted else "candidate")
    assert set(card["metrics"]["holdout_dice_current"]) == {"kidney_left"}
    assert card["digest"] == version_digest(
        card["weights"], result.manifest_digest, code_version(), card["hyperparameters"], "abdomen-trio-v1"
    )
    assert current_ensemble(state).version == (version.name if result.promoted else "abdomen-trio-v1")
    record = json.loads((state / "training/rounds" / f"{result.manifest_digest.split(':')[1]}.json").read_text())
    assert record["version"] == version.name and set(record["seconds"]) >= {"manifest", "finetune", "evaluate"}


def test_round_is_one_trace(round_result):
    _, _, spans = round_result
    names = [s.name for s in spans]
    assert {
        "training.round",
        "training.manifest",
        "training.finetune",
        "training.version",
        "training.evaluate",
        "training.gate",
    } <= set(names)
    assert len({s.context.trace_id for s in spans}) == 1


@pytest.mark.parametrize("field", ["weights", "manifest", "code", "hyperparameters", "parent"])
def test_version_digest_covers_every_input(field):
    base = {
        "weights": {"unet": "sha256:a"},
        "manifest": "sha256:m",
        "code": "0.1.0+x",
        "hyperparameters": {"steps": 2},
        "parent": "p",
    }
    changed = dict(base)
    changed[field] = (
        {"unet": "sha256:b"} if field == "weights" else {"steps": 3} if field == "hyperparameters" else "other"
    )
    d1 = version_digest(base["weights"], base["manifest"], base["code"], base["hyperparameters"], base["parent"])
    d2 = version_digest(
        changed["weights"], changed["manifest"], changed["code"], changed["hyperparameters"], changed["parent"]
    )
    assert d1 != d2
    assert version_name("abdomen-trio-v1", d1) == f"abdomen-trio-ft-{d1.split(':')[1][:12]}"
