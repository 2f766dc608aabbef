"""DICOM C-STORE / C-ECHO service class provider (pynetdicom), feeding `IngestStore`.

Success (0x0000) is returned only after the instance is durable. Bad input gets a specific
failure status (see `atlasflow.ingest.dicom.DICOM_STATUS`) and a log line with the reason, never
with patient data. TCP_NODELAY is set on every accepted socket: without it, loopback transfers
are bound by Nagle + delayed ACK (~46 ms per instance, DESIGN.md).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)

from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.common.telemetry import context_from_traceparent, current_traceparent
from atlasflow.ingest.dicom import DICOM_STATUS, c_store_status, parse_instance
from atlasflow.ingest.store import IngestStore, content_key

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# pynetdicom must not log identifiers (patient data) of requests/responses.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ScpConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "ATLASFLOW"
    accepted_calling_aets: tuple[str, ...] = ()   # empty: accept any calling AE
    max_pdu: int = 0                               # 0: unlimited
    max_associations: int = 16
    # ARTIM: how long an accepted TCP connection may wait for its A-ASSOCIATE-RQ (and a
    # release for its answer). pynetdicom does not notice a peer that connects and closes
    # without associating (a TCP health probe): that acceptor holds one of the
    # `max_associations` slots until this timer fires (30 s by pynetdicom's default).
    acse_timeout_s: float = 5.0
    # Reject an A-ASSOCIATE-RQ whose called AE title is not `ae_title` (reason 7, "called AE
    # title not recognised"); off: answer to any called AE title.
    check_called_aet: bool = True


def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StoreScp:
    """Runs the pynetdicom server in its own threads; `on_stored(series_id)` is called after
    every durable instance (used to wake the assembler)."""

    def __init__(self, config: ScpConfig, store: IngestStore, metrics: Metrics,
                 on_stored: Callable[[str], None] = lambda _s: None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.on_stored = on_stored
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.maximum_associations = config.max_associations
        self.ae.acse_timeout = config.acse_timeout_s
        self.ae.require_called_aet = config.check_called_aet
        if config.accepted_calling_aets:
            self.ae.require_calling_aet = list(config.accepted_calling_aets)
        for sop in (CTImageStorage, EnhancedCTImageStorage):
            self.ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, _nodelay),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, lambda _e: 0x0000),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _handle_store(self, event: evt.Event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001
            log.warning("c-store rejected", extra={"fields": {"reason": "CORRUPT_DICOM"}})
            return DICOM_STATUS.get("CORRUPT_DICOM", STATUS_CANNOT_UNDERSTAND)
        return self.receive(data, source="c-store")

    def receive(self, data: bytes, source: str) -> int:
        """Validate, persist and count one instance; return a DICOM status."""
        try:
            ds, info = parse_instance(data)
        except AtlasflowError as exc:
            log.warning("instance rejected", extra={"fields": {
                "source": source, "reason": exc.reason, "size_bytes": len(data)}})
            self.metrics.count("instances_rejected")
            return c_store_status(exc)
        parent = self.store.series_traceparent(info.series_uid)
        token = otel_context.attach(context_from_traceparent(parent)) if parent else None
        try:
            with tracer.start_as_current_span("ingest.c_store") as span:
                try:
                    stored = self.store.store_instance(
                        data, info.study_uid, info.series_uid, info.sop_instance_uid,
                        new_traceparent=current_traceparent(),
                        key=lambda: content_key(ds))  # only for a re-sent SOP Instance UID
                except OSError:
                    log.error("instance not stored: out of resources",
                              extra={"fields": {"source": source}})
                    return STATUS_OUT_OF_RESOURCES
                span.set_attribute("atlasflow.series_id", stored.series_id)
                span.set_attribute("atlasflow.duplicate", stored.duplicate)
        finally:
            if token is not None:
                otel_context.detach(token)
        if stored.conflict:
            log.warning("instance conflict: same SOP Instance UID, different content; first kept",
                        extra={"fields": {"series_id": stored.series_id}})
            self.metrics.count("instance_conflicts")
        self.metrics.count("instances_stored")
        self.on_stored(stored.series_id)
        return 0x0000
