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
