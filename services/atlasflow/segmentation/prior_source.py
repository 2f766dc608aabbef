"""The population prior the worker scores with: the one ranking learned from stored
human-decided labels (RankingService.GetPopulationPrior), refreshed from time to time."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import grpc

from atlasflow.common.auth import TokenSource
from atlasflow.common.clients import sync_channel
from atlasflow.common.tls import ClientTLS
from atlasflow.method.prior import PopulationPrior
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc

log = logging.getLogger(__name__)

# The generated gRPC stub carries no annotations: typed here.
_RankingStub: Callable[[grpc.Channel], Any] = ranking_pb2_grpc.RankingServiceStub


class RankingPrior:
    """The population prior ranking learned from stored labels (GetPopulationPrior), asked
    for at most every ``refresh_s`` seconds from the worker thread; until the first answer, and
    whenever ranking cannot be reached, the last prior known (at first the bundled one)."""

    def __init__(
        self,
        target: str,
        refresh_s: float,
        max_message_bytes: int,
        token: TokenSource | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.refresh_s = refresh_s
        self.prior = PopulationPrior.load()
        self.learned_cases = 0
        self._fetched = -math.inf
        self._channel = sync_channel(target, max_message_bytes, token=token, tls=tls)
        self._stub = _RankingStub(self._channel)

    def __call__(self) -> PopulationPrior:
        now = time.monotonic()
        if self.refresh_s > 0 and now - self._fetched >= self.refresh_s:
            self._fetched = now
            try:
                resp = self._stub.GetPopulationPrior(ranking_pb2.GetPopulationPriorRequest(), timeout=10)
                self.prior = PopulationPrior.from_dict(json.loads(resp.prior_json))
                if resp.learned_cases != self.learned_cases:
                    log.info(
                        "population prior updated",
                        extra={"fields": {"learned_cases": resp.learned_cases, "prior_cases": self.prior.cases}},
                    )
                self.learned_cases = resp.learned_cases
            except (grpc.RpcError, ValueError, KeyError) as exc:
                log.warning(
                    "population prior not refreshed; keeping the last one",
                    extra={"fields": {"error": type(exc).__name__}},
                )
        return self.prior

    def close(self) -> None:
        self._channel.close()
