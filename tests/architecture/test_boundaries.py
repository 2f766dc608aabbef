"""The house's walls: services meet only through generated protobuf modules and `common`;
domain code never imports grpc."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services" / "atlasflow"
NAMES = ("ingest", "segmentation", "ranking", "labels")
# Domain modules: imaging math, storage, strategies. Transport lives in service.py/main.py.
DOMAIN_MODULES = [
    "ingest/dicom.py",
    "ingest/assemble.py",
    "ingest/store.py",
    "segmentation/pipeline.py",
    "segmentation/attention.py",
    "segmentation/models.py",
    "segmentation/ensemble.py",
    "segmentation/jobs.py",
    "ranking/worklist.py",
    "labels/repository.py",
    "labels/export.py",
    "labels/validate.py",
    "common/blobstore.py",
    "common/nifti.py",
    "common/sqlite.py",
    "common/errors.py",
]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("service", NAMES)
def test_a_service_imports_no_other_service_code(service):  # type: ignore[no-untyped-def]
    offending = []
    for path in (SERVICES / service).rglob("*.py"):
        if path.parent.name == "v1":
            continue
        for mod in imports_of(path):
            parts = mod.split(".")
            if (
                parts[0] == "atlasflow"
                and len(parts) > 1
                and parts[1] in NAMES
                and parts[1] != service
                and not (len(parts) > 2 and parts[2] == "v1")
            ):
                offending.append(f"{path.relative_to(SERVICES)}: {mod}")
    assert not offending


@pytest.mark.parametrize("module", DOMAIN_MODULES)
def test_domain_code_does_not_import_grpc(module):  # type: ignore[no-untyped-def]
    path = SERVICES / module
    assert path.exists()
    assert not {m for m in imports_of(path) if m.split(".")[0] in ("grpc", "grpc_status")}
