"""In-process gRPC servers for tests that need a service itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from atlasflow.common.app import ServiceApp
from atlasflow.testing import auth


@contextmanager
def in_process_ranking_server(store: Any, metrics: Any) -> Iterator[int]:
    """Context manager: the real ranking gRPC server over ``store`` on port 0, served by an
    event loop on a daemon thread; yields the port. Used where a test needs ranking itself
    (ranking's own API tests, the segmentation worker's prior source). Authentication is on:
    callers pass a token (`atlasflow.testing.auth`)."""
    from atlasflow.ranking.app import build_app
    from atlasflow.ranking.settings import RankingSettings

    loop = asyncio.new_event_loop()

    async def start() -> ServiceApp:
        app = await build_app(
            RankingSettings(grpc_port=0, **auth.auth_settings("ranking")), metrics=metrics, worklist=store
        )
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
