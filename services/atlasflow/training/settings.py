"""Training's typed settings: ``ATLASFLOW_TRAINING_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_TRAINING_"


@dataclass(frozen=True)
class TrainingSettings(ServiceSettings):
    """``ATLASFLOW_TRAINING_*``.

    database_url: "" -> SQLite ``<data_dir>/training.sqlite3``; ``postgresql://...`` -> the run
    table there. state_dir: where manifests, checkpoints, versions and ``versions/CURRENT`` live
    (default ``<data_dir>/state``; the segmentation service reads ``versions/`` from it).
    labels_target: the label service the decisions are read from (as ``svc:training``).
    device: "cpu" or "cuda[:n]". n_boot: bootstrap resamples of the gate.
    auto_min_new_decisions: automatic mode (0 = off): queue a round when this many new human
    organ decisions exist; auto_interval_s: how often it counts them, seconds.
    triton_url / triton_model_repository: the cluster roll-out (both set): a promoted version is
    written into that model repository and loaded through Triton's repository API; empty: the
    version is only promoted (``versions/CURRENT``).
    """

    grpc_port: int = 50055
    database_url: str = ""
    state_dir: str = ""
    labels_target: str = "127.0.0.1:50054"
    device: str = "cpu"
    n_boot: int = 2000
    auto_min_new_decisions: int = 0
    auto_interval_s: float = 300.0
    triton_url: str = ""
    triton_model_repository: str = ""
    triton_unload_previous: bool = True
