"""One local stack for the gateway tests, started the way `atlasflow up` starts it: labels,
ranking, ingest and the gateway (no segmentation, no Triton: nothing here runs a model)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from atlasflow.cli.local import LocalDeployment

NAMES = ["labels", "ranking", "ingest", "gateway"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    dep = LocalDeployment.create(tmp_path_factory.mktemp("gw"), auto_ports=True, quiet_period_s=1.0)
    dep.start(NAMES)
    try:
        dep.wait_healthy(180, NAMES)
        yield dep
    finally:
        dep.stop(names=NAMES)


def http(stack: LocalDeployment, token: str = "") -> requests.Session:
    """A client of the stack's gateway (its CA trusted; ``token``: sent as a bearer token)."""
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would replace the stack CA below
    s.verify = str(stack.ca().ca_file)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s
