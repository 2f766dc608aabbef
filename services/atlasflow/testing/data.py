"""Where the test data is.

REPO: the repository root (this package lives at services/atlasflow/testing/; meaningful in a
source checkout, the editable install).
TEST_DATA: the project's real public CT test data, `tests/data/<source>/` (each source with its
README, licence and SHA256SUMS). Found as: the environment variable ATLASFLOW_TEST_DATA; else
<repo>/tests/data; else ../shared/data beside the repository (older checkouts' layout).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def find_test_data() -> Path:
    """The test data folder (see the module doc); it may not exist (callers check)."""
    if env := os.environ.get("ATLASFLOW_TEST_DATA"):
        return Path(env)
    in_repo = REPO / "tests" / "data"
    if in_repo.is_dir():
        return in_repo
    return REPO.parent / "shared" / "data"


TEST_DATA = find_test_data()
