"""Segmentation's typed settings: ``ATLASFLOW_SEGMENTATION_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.settings import ServiceSettings
from atlasflow.common.tls import PLAINTEXT, ClientTLS

PREFIX = "ATLASFLOW_SEGMENTATION_"


@dataclass(frozen=True)
class SegmentationSettings(ServiceSettings):
    """``ATLASFLOW_SEGMENTATION_*``. ``ensemble``: comma-separated ensemble versions (or JSON
    paths) served by Triton, the first is the default; ``triton_shm``: auto | on | off (see
    `TritonSegmenter`); ``retry_base_s``/``max_backoff_s``/``max_attempts``: requeueing of jobs
    while Triton is unavailable (``max_attempts`` also bounds the claims of a job whose lease
    keeps expiring: then it fails LEASE_EXPIRED); ``triton_connect_retries``: quick in-call retries first.

    Triton's transport (`triton_tls`): ``triton_tls_ca_file`` set = TLS to Triton, verified
    against that CA, with the client certificate ``triton_tls_cert_file`` /
    ``triton_tls_key_file`` (default: this service's own ``tls_client_cert_file`` /
    ``tls_cert_file`` and keys; the chart's Triton requires one, mutual TLS);
    ``triton_tls_server_name``: the name expected in Triton's certificate when it differs from
    the URL's host. Unset = plaintext, accepted for a loopback ``triton_url`` only unless
    ``triton_allow_plaintext`` (a deployment that is knowingly plaintext throughout).
    ``triton_access_token`` is no longer used (it sat on tritonserver's command line): a value
    fails the start with TRITON_ACCESS_TOKEN_UNSUPPORTED."""

    grpc_port: int = 50052
    triton_url: str = "127.0.0.1:8001"
    ensemble: str = "abdomen-trio-v1"
    labels_target: str = "127.0.0.1:50054"
    ranking_target: str = "127.0.0.1:50053"
    max_attempts: int = 8
    triton_timeout_s: float = 900.0
    triton_shm: str = "auto"
    triton_access_token: str = ""  # removed: set = a clear error at start (`triton_tls`)
    triton_tls_ca_file: str = ""
    triton_tls_cert_file: str = ""
    triton_tls_key_file: str = ""
    triton_tls_server_name: str = ""
    triton_allow_plaintext: bool = False
    triton_connect_retries: int = 2
    retry_base_s: float = 2.0
    max_backoff_s: float = 60.0
    worker_poll_s: float = 1.0
    # How often the worker asks ranking for the population prior it learned from stored
    # human-decided labels (GetPopulationPrior); 0 = always the bundled prior.
    prior_refresh_s: float = 300.0
    # ATLASFLOW_SEGMENTATION_DATABASE_URL: empty = SQLite at <data_dir>/segmentation.sqlite3
    # (embedded); "postgresql://user:pass@host:5432/db" = PostgreSQL (replicas share it). Alembic
    # migrations run on start (atlasflow.segmentation.migrations).
    database_url: str = ""
    # A running job's lease (s): renewed every job_lease_s / 4 while it runs; a replica that
    # dies leaves its job to another replica after this long (atlasflow.segmentation.jobs).
    job_lease_s: float = 60.0
    # Promoted ensemble versions (the training state's ``versions/``; ActivateEnsembleVersion
    # reads them from here); "" = activation refused (VERSIONS_NOT_CONFIGURED).
    versions_dir: str = ""
    # How an activated version reaches Triton: "pytriton" (the embedded Triton process binds it:
    # `atlasflow.segmentation.triton_server --versions-dir`) or "repository" (stock Triton with
    # explicit model control: the training service loaded it; this only checks it is ready).
    activation: str = "pytriton"
    # How often (s) every replica reads the activated version recorded in the database and
    # follows it (`activation.ServedVersionFollower`; the worker also checks before each claim).
    version_poll_s: float = 5.0
    # Imported models (`atlasflow model import ...`) added to every served ensemble as members
    # (atlasflow.segmentation.imported): registry names, comma-separated, and the registry's
    # state dir; the Triton server must be started with the same (--member NAME --state-dir DIR).
    imported_models: str = ""
    models_state_dir: str = ""

    def triton_tls(self) -> ClientTLS:
        """TLS of the calls to Triton (`PLAINTEXT` without ``triton_tls_ca_file``)."""
        if self.triton_access_token:
            raise InvalidArgument(
                "TRITON_ACCESS_TOKEN_UNSUPPORTED",
                "ATLASFLOW_SEGMENTATION_TRITON_ACCESS_TOKEN is no longer used (Triton's token sat on its "
                "command line): remove it; Triton is reached over loopback or mutual TLS "
                "(TRITON_TLS_CA_FILE / _CERT_FILE / _KEY_FILE, docs/security.md)",
                domain="atlasflow.segmentation",
            )
        if not self.triton_tls_ca_file:
            if self.triton_tls_cert_file or self.triton_tls_key_file:
                raise InvalidArgument(
                    "TLS_NOT_CONFIGURED",
                    "TRITON_TLS_CERT_FILE / TRITON_TLS_KEY_FILE need TRITON_TLS_CA_FILE (the CA of Triton's certificate)",
                    domain="atlasflow.segmentation",
                )
            return PLAINTEXT
        return ClientTLS(
            ca_file=self.triton_tls_ca_file,
            cert_file=self.triton_tls_cert_file or self.tls_client_cert_file or self.tls_cert_file,
            key_file=self.triton_tls_key_file or self.tls_client_key_file or self.tls_key_file,
            server_name=self.triton_tls_server_name,
        )

    def imported(self) -> list[str]:
        """The imported members' registry names (`atlasflow.segmentation.imported`)."""
        from atlasflow.segmentation.imported import parse_names

        return parse_names(self.imported_models)

    def ensembles(self) -> list[str]:
        """The configured ensemble versions (or JSON paths), the default first."""
        return [e.strip() for e in self.ensemble.split(",") if e.strip()]
