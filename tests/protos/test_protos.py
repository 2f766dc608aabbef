"""Protos: generated code is current, buf lint (STANDARD = v1 DEFAULT) is clean, List methods
paginate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale():
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_is_clean():
    buf = ROOT / ".tools" / "buf"
    assert buf.exists(), "run scripts/bootstrap.sh --test (installs buf from npm)"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _services():
    from atlasflow.ingest.v1 import ingest_pb2
    from atlasflow.labels.v1 import labels_pb2
    from atlasflow.ranking.v1 import ranking_pb2
    from atlasflow.segmentation.v1 import segmentation_pb2

    for module in (ingest_pb2, segmentation_pb2, ranking_pb2, labels_pb2):
        yield from module.DESCRIPTOR.services_by_name.values()


@pytest.mark.parametrize(
    "method", [m for s in _services() for m in s.methods if m.name.startswith("List")], ids=lambda m: m.full_name
)
def test_every_list_method_paginates(method):
    req = {f.name for f in method.input_type.fields}
    resp = {f.name for f in method.output_type.fields}
    assert {"page_size", "page_token"} <= req
    assert "next_page_token" in resp


@pytest.mark.parametrize("method", [m for s in _services() for m in s.methods], ids=lambda m: m.full_name)
def test_unique_request_and_response_per_method(method):
    assert method.input_type.name == f"{method.name}Request"
    assert method.output_type.name == f"{method.name}Response"
