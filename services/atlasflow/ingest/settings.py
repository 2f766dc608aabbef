"""Ingest's typed settings: ``ATLASFLOW_INGEST_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from atlasflow.common.settings import ServiceSettings

PREFIX = "ATLASFLOW_INGEST_"


@dataclass(frozen=True)
class IngestSettings(ServiceSettings):
    """ATLASFLOW_INGEST_* settings (the DICOM ones are documented on `atlasflow.ingest.scp.ScpConfig`)."""

    grpc_port: int = 50051
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    ae_title: str = "ATLASFLOW"
    accepted_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    acse_timeout_s: float = 5.0  # see ScpConfig.acse_timeout_s
    check_called_aet: bool = True  # see ScpConfig.check_called_aet
    max_pdu: int = 0
    quiet_period_s: float = 5.0
    spool_segment_mb: int = 128  # zero-filled spool segments, 2 prepared ahead (spool.py)
    segmentation_target: str = "127.0.0.1:50052"
    upload_ttl_s: float = 7 * 86400  # incomplete resumable uploads older than this are purged
    # new instances are refused (0xA700 / RESOURCE_EXHAUSTED DISK_FULL) while the data or blob
    # directory has less free space than this, MiB; 0 turns the check off
    min_free_disk_mb: int = 1024
