"""Shared test configuration: hooks only. Test support (the test data, peers, oracles,
in-process servers) is the package `atlasflow.testing`; this file is never imported."""

from __future__ import annotations

import pytest

from atlasflow.testing import auth
from atlasflow.testing.data import TEST_DATA


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once when the real CT test data is missing (see `atlasflow.testing.data`); create
    the session's token issuer and the all-roles client token (`atlasflow.testing.auth`)."""
    assert TEST_DATA.is_dir(), f"test data not found at {TEST_DATA}"
    auth.install()
