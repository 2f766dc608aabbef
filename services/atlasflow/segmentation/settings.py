"""Segmentation's typed settings: ``ATLASFLOW_SEGMENTATION_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_SEGMENTATION_"


@dataclass(frozen=True)
class SegmentationSettings(ServiceSettings):
    """``ATLASFLOW_SEGMENTATION_*``. ``ensemble``: comma-separated ensemble versions (or JSON
    paths) served by Triton, the first is the default; ``triton_shm``: auto | on | off (see
    `TritonSegmenter`); ``retry_base_s``/``max_backoff_s``/``max_attempts``: requeueing of jobs
    while Triton is unavailable; ``triton_connect_retries``: quick in-call retries first."""

    grpc_port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    ensemble: str = "abdomen-trio-v1"
    labels_target: str = "127.0.0.1:50054"
    ranking_target: str = "127.0.0.1:50053"
    max_attempts: int = 8
    triton_timeout_s: float = 900.0
    triton_shm: str = "auto"
    triton_access_token: str = ""  # = the Triton server's ATLASFLOW_TRITON_ACCESS_TOKEN (shared memory)
    triton_connect_retries: int = 2
    retry_base_s: float = 2.0
    max_backoff_s: float = 60.0
    worker_poll_s: float = 1.0
    # How often the worker asks ranking for the population prior it learned from stored
    # human-decided labels (GetPopulationPrior); 0 = always the bundled prior.
    prior_refresh_s: float = 300.0

    def ensembles(self) -> list[str]:
        """The configured ensemble versions (or JSON paths), the default first."""
        return [e.strip() for e in self.ensemble.split(",") if e.strip()]
