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
# Transport: the only modules of a service that may import grpc (the servicer, the wiring, the
# public client and the gRPC clients of other services). Every other module is domain code
# (imaging math, storage, strategies, background loops) and must not import grpc, including
# modules added later: the rule is by exclusion, not a list that can fall behind.
TRANSPORT = {
    # the outbox delivery of a hand-off calls the next service's generated stub
    "ingest/worker.py",
    "labels/worker.py",
    "segmentation/worker.py",
    "ingest/app.py",
    "ingest/servicer.py",
    "ingest/client.py",
    "segmentation/app.py",
    "segmentation/servicer.py",
    "segmentation/prior_source.py",
    "ranking/app.py",
    "ranking/servicer.py",
    "labels/app.py",
    "labels/servicer.py",
    "labels/ingest_sources.py",
    # ReviseLabels asks ranking whether the caller holds the case's lease
    "labels/ranking_leases.py",
    "common/server.py",
    # the audit interceptor and AuditService (the store, common/audit.py, is domain code)
    "common/audit_server.py",
    "common/app.py",
    "common/clients.py",
    # TLS credentials (grpc.ssl_*_credentials, the reloading server credentials)
    "common/tls.py",
    # the web gateway calls the four services as the logged-in user
    "gateway/backends.py",
    "gateway/app.py",
    "gateway/dicomweb.py",
    # the training service: its server, wiring, and its reads of labels' decisions
    "training/app.py",
    "training/servicer.py",
    "training/labels_source.py",
    # ... and its roll-out's calls to segmentation and ranking (as svc:training)
    "training/peers.py",
}


def _package_of(path: Path) -> list[str]:
    rel = path.relative_to(SERVICES.parent).with_suffix("")
    parts = list(rel.parts)
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(path: Path, *, with_names: bool = True) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names: ``import a.b``, ``from a.b import
    c`` (with ``with_names`` also ``a.b.c``, which may be a module: ``from atlasflow import
    labels``), relative imports resolved against the file's package, and
    ``importlib.import_module("...")`` with a literal name."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.add(module)
            if with_names:
                out.update(f"{module}.{a.name}" for a in node.names if a.name != "*")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value)
    return out


def _is_grpc(mod: str) -> bool:
    return mod.split(".")[0] in GRPC or mod.split(".")[-1].endswith("_pb2_grpc")


@pytest.mark.parametrize("service", NAMES)
def test_a_service_imports_no_other_service_code(service):
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


def _modules(*folders: str) -> list[str]:
    return sorted(
        str(p.relative_to(SERVICES))
        for folder in folders
        for p in (SERVICES / folder).rglob("*.py")
        if p.parent.name != "v1" and "__pycache__" not in p.parts
    )


@pytest.mark.parametrize(
    "module", [m for m in _modules(*NAMES, "gateway", "common", "method", "training", "models") if m not in TRANSPORT]
)
def test_domain_code_does_not_import_grpc(module: str) -> None:
    assert not {m for m in imports_of(SERVICES / module) if _is_grpc(m)}


def test_transport_list_names_real_modules() -> None:
    assert not [m for m in TRANSPORT if not (SERVICES / m).is_file()]


@pytest.mark.parametrize("module", _modules("."))
def test_every_atlasflow_import_resolves_by_folder(module: str) -> None:
    """Import path = folder path: `atlasflow.a.b` is services/atlasflow/a/b.py or the package
    services/atlasflow/a/b/ (so a structure tool that follows imports to files draws the real graph)."""
    unresolved = []
    for mod in imports_of(SERVICES / module, with_names=False):
        parts = mod.split(".")
        if parts[0] != "atlasflow":
            continue
        path = SERVICES.joinpath(*parts[1:])
        if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
            unresolved.append(mod)
    assert not unresolved


def _top(mod: str, n: int) -> tuple[str, ...]:
    return tuple(mod.split(".")[:n])


# What the launcher (cli/main.py) may start besides the services' app.main: Triton's server and
# the library tools behind DELEGATED sub-commands. A fixed list: adding an internal module to
# DELEGATED does not widen it.
LAUNCHER_TOOLS = {
    "atlasflow.segmentation.triton_server",
    "atlasflow.ingest.convert",
    "atlasflow.ingest.retrieve",
    "atlasflow.segmentation.triton_repo",
    "atlasflow.ranking.offline",
}


def _within(mod: str, allowed: set[str]) -> bool:
    return any(mod == a or mod.startswith(a + ".") for a in allowed)


def test_cli_imports_only_public_surfaces() -> None:
    from atlasflow.cli.main import DELEGATED

    assert {m for m, _ in DELEGATED.values()} <= LAUNCHER_TOOLS
    launcher_may = {f"atlasflow.{name}.app" for name in (*NAMES, "gateway", "training")} | LAUNCHER_TOOLS
    offending = []
    for path in (SERVICES / "cli").rglob("*.py"):
        rel = str(path.relative_to(SERVICES))
        for mod in imports_of(path):
            parts = mod.split(".")
            if parts[0] != "atlasflow" or len(parts) < 2 or parts[1] in ("cli", "common", "method", "models"):
                continue
            if parts[1] in (*NAMES, "training") and len(parts) > 2 and parts[2] in ("v1", "client"):
                continue
            if rel == LAUNCHER and _within(mod, launcher_may):
                continue
            offending.append(f"{rel}: {mod}")
    assert not offending


def test_no_product_code_imports_test_support() -> None:
    """atlasflow.testing (peers, oracles, simulators) serves tests and benchmarks only."""
    offending = [
        f"{m}: {mod}"
        for m in _modules(*NAMES, "common", "method", "cli", "training")
        for mod in imports_of(SERVICES / m)
        if _top(mod, 2) == ("atlasflow", "testing")
    ]
    assert not offending


def test_common_imports_no_service_code() -> None:
    """The shared runtime is below the services: it may not reach up into one."""
    offending = [
        f"{m}: {mod}"
        for m in _modules("common")
        for mod in imports_of(SERVICES / m)
        if _top(mod, 2)[-1] in (*NAMES, "cli", "method")
    ]
    assert not offending


def test_no_service_imports_the_cli():
    offending = [
        f"{path.relative_to(SERVICES)}: {mod}"
        for service in (*NAMES, "common", "method")
        for path in (SERVICES / service).rglob("*.py")
        for mod in imports_of(path)
        if _top(mod, 2) == ("atlasflow", "cli")
    ]
    assert not offending


def test_the_method_imports_no_service_and_no_grpc():
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
def test_every_service_has_the_common_shape(service):
    folder = SERVICES / service
    missing = [name for name in ("settings.py", "app.py", "servicer.py") if not (folder / name).is_file()]
    assert not missing, f"{service} lacks {missing}"
    tree = ast.parse((folder / "app.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"build_app", "main"} <= defined, f"{service}/app.py defines {sorted(defined)}"


# The training worker fine-tunes segmentation's members: it may use the model definitions and
# the pipeline's preprocessing (the same code that serves them), never another service's code.
# It reads decisions through any object with the label repository's read surface (duck-typed).
TRAINING_MAY_USE = {
    "atlasflow.segmentation.ensemble",
    "atlasflow.segmentation.models",
    "atlasflow.segmentation.grid",
    "atlasflow.segmentation.pipeline",
    # the cluster roll-out writes a promoted version as a Triton model directory
    "atlasflow.segmentation.triton_repo",
    # ... and loads it through Triton's repository API on segmentation's Triton channel (mTLS)
    "atlasflow.segmentation.triton_client",
    # ... with segmentation's imported members (the same names and digests segmentation serves)
    "atlasflow.segmentation.imported",
    # the public API of labels (generated modules): the decisions a round trains on
    "atlasflow.labels.v1",
    # the public APIs the roll-out calls (training/peers.py): activation, re-inference, worklist order
    "atlasflow.segmentation.v1",
    "atlasflow.ranking.v1",
}


def test_training_imports_only_the_models_it_trains() -> None:
    offending = [
        f"{m}: {mod}"
        for m in _modules("training")
        for mod in imports_of(SERVICES / m)
        if _top(mod, 2)[-1] in (*NAMES, "cli", "gateway") and not _within(mod, TRAINING_MAY_USE)
    ]
    assert not offending
