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

    runner: "local" (fine-tune in this process on ``device``) or "kubernetes" (the fine-tune
    stage of each run is a ``batch/v1`` Job, `atlasflow.training.k8s_runner`; the service needs
    the chart's training ServiceAccount). The Job's shape, ``job_*``: namespace (empty: this
    pod's), image, state_pvc (the PVC holding ``state_dir``, mounted at /state in the Job: the
    service must mount the same PVC at ``state_dir``), blob_pvc or blob_url (how the Job reaches
    the blob store; empty both: ``blob_url`` when it is s3://), gpus (torchrun processes),
    cpu, memory, shm_size, node_selector (JSON object), tolerations (JSON list), backoff_limit,
    ttl_s (ttlSecondsAfterFinished), active_deadline_s, service_account, priority_class,
    poll_s (how often the Job is read).
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
    # Imported ensemble members (segmentation's IMPORTED_MODELS and MODELS_STATE_DIR, the same
    # values): the triton-repository roll-out writes and loads every promoted version with them,
    # so Triton serves `<model>__with_<sha12>`, the name segmentation activates.
    imported_models: str = ""
    models_state_dir: str = ""
    # The roll-out of a promoted version (docs/training.md "Roll-out without restart"):
    # "segmentation" (embedded stack: segmentation's ActivateEnsembleVersion binds it into the
    # running PyTriton, then the undecided cases are re-inferred in worklist order),
    # "triton-repository" (cluster: load through Triton's repository API, then the same
    # activation and re-inference when segmentation_target is set), "pointer" (only
    # versions/CURRENT), "" = triton-repository when triton_url and triton_model_repository are
    # set, else pointer.
    rollout: str = ""
    segmentation_target: str = ""
    ranking_target: str = ""
    # TLS to Triton (`atlasflow.training.rollout.from_settings`): as segmentation's
    # TRITON_TLS_* (CA set = TLS + client certificate, default this service's own; plaintext
    # only to a loopback triton_url unless triton_allow_plaintext).
    triton_tls_ca_file: str = ""
    triton_tls_cert_file: str = ""
    triton_tls_key_file: str = ""
    triton_tls_server_name: str = ""
    triton_allow_plaintext: bool = False
    runner: str = "local"
    job_namespace: str = ""
    job_image: str = ""
    job_state_pvc: str = ""
    job_blob_pvc: str = ""
    job_blob_url: str = ""
    job_gpus: int = 1
    job_cpu: str = "8"
    job_memory: str = "64Gi"
    job_shm_size: str = "16Gi"
    job_node_selector: str = ""
    job_tolerations: str = ""
    job_backoff_limit: int = 2
    job_ttl_s: int = 3600
    job_active_deadline_s: int = 24 * 3600
    job_service_account: str = ""
    job_priority_class: str = ""
    job_poll_s: float = 5.0
    # with an s3:// blob store: the Secret with the AWS credentials file the Job pod mounts
    job_s3_credentials_secret: str = ""
    job_s3_credentials_key: str = "credentials"
