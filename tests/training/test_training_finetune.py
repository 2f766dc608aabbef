"""Fine-tuning: deterministic with a seed, resumable after SIGKILL with bit-identical final
weights, loss curve logged, one span per member."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.training import finetune as ft
from atlasflow.training.dataset import build_manifest, collect_decisions, load_manifest, write_manifest

STEPS = 12
HP = {"steps": STEPS, "checkpoint_every": 3, "crop_size": [32, 32, 32], "members": ["unet"], "lr": 1e-3}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def manifest_path(store, tmp_path_factory) -> Path:
    m = build_manifest(
        collect_decisions(store.repo),
        parent_version="abdomen-trio-v1",
        seed=11,
        hyperparameters=HP,
        holdout_cases={"case-d"},
    )
    path, _ = write_manifest(m, tmp_path_factory.mktemp("manifests"))
    return path


@pytest.fixture(scope="module")
def uninterrupted(store, manifest_path, tmp_path_factory):
    manifest, digest = load_manifest(manifest_path)
    member = load_ensemble("abdomen-trio-v1").members[0]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ft._tracer = provider.get_tracer("test")
    run_dir = tmp_path_factory.mktemp("run-a")
    try:
        result = ft.finetune_member(member, manifest, digest, store.blobs, run_dir)
    finally:
        ft._tracer = ft.trace.get_tracer("atlasflow.training")
    return result, run_dir, exporter.get_finished_spans()


def _log(run_dir: Path) -> list[dict]:
    path = run_dir / "unet" / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _cmd(store, manifest_path, run_dir):
    return [
        sys.executable, "-m", "atlasflow.training.finetune",
        "--manifest", str(manifest_path), "--blobs", str(store.blobs.root),
        "--run-dir", str(run_dir), "--ensemble", "abdomen-trio-v1",
    ]  # fmt: skip


def test_finetune_logs_checkpoints_and_traces(uninterrupted):
    result, run_dir, spans = uninterrupted
    log = _log(run_dir)
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert all(e["member"] == "unet" and e["loss"] > 0 for e in log)
    assert result.steps == STEPS and result.resumed_from == 0
    state = torch.load(result.weights, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    (span,) = [s for s in spans if s.name == "training.finetune"]
    assert span.attributes["atlasflow.member"] == "unet"
    assert [e.attributes["step"] for e in span.events if e.name == "checkpoint"] == [3, 6, 9, 12]
    # the weights moved away from the parent's
    parent = load_ensemble("abdomen-trio-v1").members[0].checkpoint
    assert result.digest != ft.sha256_file(parent)


def test_resume_after_sigkill_gives_the_same_weights(store, manifest_path, uninterrupted, tmp_path):
    result, run_dir_a, _ = uninterrupted
    proc = subprocess.Popen(
        _cmd(store, manifest_path, tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_log(tmp_path)) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    ckpt = torch.load(tmp_path / "unet" / "checkpoint.pt", weights_only=True)
    assert 3 <= ckpt["step"] < STEPS
    assert not (tmp_path / "unet" / "weights.pt").exists()
    # rerun (in this process, to keep the test short): resumes from the checkpoint and ends
    # with the uninterrupted run's bytes
    manifest, digest = load_manifest(manifest_path)
    member = load_ensemble("abdomen-trio-v1").members[0]
    resumed = ft.finetune_member(member, manifest, digest, store.blobs, tmp_path)
    assert resumed.resumed_from == ckpt["step"]
    assert resumed.digest == result.digest
    log_b = _log(tmp_path)
    assert [e["step"] for e in log_b] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in log_b] == [e["loss"] for e in _log(run_dir_a)]


def test_cancel_checkpoints_and_raises(store, manifest_path, tmp_path):
    manifest, digest = load_manifest(manifest_path)
    member = load_ensemble("abdomen-trio-v1").members[0]
    calls = []
    with pytest.raises(ft.TrainingCancelled):
        ft.finetune_member(
            member, manifest, digest, store.blobs, tmp_path, should_stop=lambda: len(calls) >= 2,
            on_progress=lambda *a: calls.append(a),
        )  # fmt: skip
    assert torch.load(tmp_path / "unet" / "checkpoint.pt", weights_only=True)["step"] == 2
