"""Shared test configuration.

SHARED_DATA: the project's real public CT test data (`shared/data`, beside the repository in
every checkout and in CI; override with ATLASFLOW_SHARED_DATA).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
assert SHARED_DATA.is_dir(), f"shared test data not found at {SHARED_DATA}"


def load_benchmark(name: str):  # type: ignore[no-untyped-def]
    """Import `benchmarks/<name>.py` once (benchmarks are scripts, not a package); tests reuse
    their peers and builders (e.g. bench_ingest's OrthancProcess, IngestProcess)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]
