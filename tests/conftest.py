"""Shared test configuration.

SHARED_DATA: the project's real public CT test data, `tests/data/<source>/` (each source with its
README.txt, licence and SHA256SUMS); override with ATLASFLOW_TEST_DATA.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATLASFLOW_TEST_DATA", REPO / "tests" / "data"))
assert SHARED_DATA.is_dir(), f"test data not found at {SHARED_DATA}"


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


def in_process_ranking_server(store, metrics):  # type: ignore[no-untyped-def]
    """Context manager: the real ranking gRPC server over ``store`` on port 0, served by an
    event loop on a daemon thread; yields the port. Used where a test needs ranking itself
    (ranking's own API tests, the segmentation worker's prior source)."""
    import asyncio
    import threading
    from contextlib import contextmanager

    from atlasflow.ranking.app import build_app
    from atlasflow.ranking.settings import RankingSettings

    @contextmanager
    def run():  # type: ignore[no-untyped-def]
        loop = asyncio.new_event_loop()

        async def start():  # type: ignore[no-untyped-def]
            app = await build_app(RankingSettings(grpc_port=0), metrics=metrics, worklist=store)
            await app.start()
            return app

        built = loop.run_until_complete(start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield built.port
        finally:
            asyncio.run_coroutine_threadsafe(built.stop(0), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    return run()
