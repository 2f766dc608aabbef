"""The house's walls: services meet only through generated protobuf modules and `common`;
domain code never imports grpc; the CLI talks to services through their public gRPC clients
(`atlasflow.<svc>.v1`, `atlasflow.<svc>.client`) and its launcher, and no service imports the
CLI; the method package imports no service and no grpc; every service has the same shape."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services" / "atlasflow"
NAMES = ("ingest", "segmentation", "ranking", "labels")
GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection")
# cli/main.py is the launcher: `atlasflow serve <svc>` runs `atlasflow.<svc>.app.main`, Triton
# runs from its server module, and the DELEGATED sub-commands are library tools' own `main`.
LAUNCHER = "cli/main.py"
# Domain modules: imaging math, storage, strategies. Transport lives in service.py/main.py.
DOMAIN_MODULES = [
    "ingest/dicom.py",
    "ingest/assemble.py",
    "ingest/store.py",
    "ingest/spool.py",
    "ingest/uploads.py",
    "ingest/schema.py",
    "ingest/identity.py",
    "ingest/headers.py",
    "ingest/reception.py",
    "ingest/frames.py",
    "ingest/geometry.py",
    "ingest/scan.py",
    "ingest/fastheader.py",
    "ingest/grouping.py",
    "ingest/nifti_writer.py",
    "segmentation/pipeline.py",
    "segmentation/grid.py",
    "segmentation/attention.py",
    "segmentation/models.py",
    "segmentation/ensemble.py",
    "segmentation/jobs.py",
    "ranking/entries.py",
    "ranking/priority.py",
    "ranking/schema.py",
    "ranking/store.py",
    "ranking/worklist.py",
    "ranking/leases.py",
    "ranking/rounds.py",
    "ranking/label_versions.py",
    "labels/repository.py",
    "labels/rows.py",
    "labels/sql.py",
    "labels/sqlite.py",
    "labels/postgres.py",
    "labels/schema.py",
    "labels/storage.py",
    "labels/audit.py",
    "labels/events.py",
    "labels/writer.py",
    "labels/assembly.py",
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


def _top(mod: str, n: int) -> tuple[str, ...]:
    return tuple(mod.split(".")[:n])


def test_cli_imports_only_public_surfaces():  # type: ignore[no-untyped-def]
    from atlasflow.cli.main import DELEGATED

    launcher_may = {f"atlasflow.{name}.app" for name in NAMES} | {m for m, _ in DELEGATED.values()}
    launcher_may.add("atlasflow.segmentation.triton_server")
    offending = []
    for path in (SERVICES / "cli").rglob("*.py"):
        rel = str(path.relative_to(SERVICES))
        for mod in imports_of(path):
            parts = mod.split(".")
            if parts[0] != "atlasflow" or len(parts) < 2 or parts[1] in ("cli", "common", "method"):
                continue
            if parts[1] in NAMES and len(parts) > 2 and parts[2] in ("v1", "client"):
                continue
            if rel == LAUNCHER and mod in launcher_may:
                continue
            offending.append(f"{rel}: {mod}")
    assert not offending


def test_no_service_imports_the_cli():  # type: ignore[no-untyped-def]
    offending = [
        f"{path.relative_to(SERVICES)}: {mod}"
        for service in (*NAMES, "common", "method")
        for path in (SERVICES / service).rglob("*.py")
        for mod in imports_of(path)
        if _top(mod, 2) == ("atlasflow", "cli")
    ]
    assert not offending


def test_the_method_imports_no_service_and_no_grpc():  # type: ignore[no-untyped-def]
    method = SERVICES / "method"
    assert method.is_dir(), "the method package atlasflow.method is missing"
    offending = [
        f"{path.relative_to(SERVICES)}: {mod}"
        for path in method.rglob("*.py")
        for mod in imports_of(path)
        if mod.split(".")[0] in GRPC or (mod.split(".")[0] == "atlasflow" and _top(mod, 2)[-1] in (*NAMES, "cli"))
    ]
    assert not offending


@pytest.mark.parametrize("service", NAMES)
def test_every_service_has_the_common_shape(service):  # type: ignore[no-untyped-def]
    folder = SERVICES / service
    missing = [name for name in ("settings.py", "app.py", "servicer.py") if not (folder / name).is_file()]
    assert not missing, f"{service} lacks {missing}"
    tree = ast.parse((folder / "app.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"build_app", "main"} <= defined, f"{service}/app.py defines {sorted(defined)}"
