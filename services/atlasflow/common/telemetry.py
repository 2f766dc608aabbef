"""Tracing and logging set-up shared by every process.

- Tracing: an OpenTelemetry TracerProvider named after the service. Spans are exported over
  OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set;
  otherwise they are kept local. Tests pass their own SpanExporter (e.g. InMemorySpanExporter).
  Transport (`otlp_span_exporter`, the exporter's standard variables): an ``https://`` endpoint
  is TLS, verified against OTEL_EXPORTER_OTLP_CERTIFICATE (a CA bundle file; the system's roots
  without it), with OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / OTEL_EXPORTER_OTLP_CLIENT_KEY for
  a collector that requires client certificates; ``http://`` (or OTEL_EXPORTER_OTLP_INSECURE=true)
  is plaintext, for a collector on the same host or pod only (docs/security.md "Transport").
- Logging: one JSON object per line on stderr with the current trace_id and span_id, so a log
  line can be joined to its trace. Never log patient data: only atlasflow ids, counts, sizes,
  reasons.
- Trace context travels across asynchronous hand-offs (outbox rows, job rows) as a W3C
  `traceparent` string: `current_traceparent()` captures it, `context_from_traceparent()` restores it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

_configured_provider: TracerProvider | None = None


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the global TracerProvider once per process and return it."""
    global _configured_provider
    if _configured_provider is not None:
        if exporter is not None:
            _configured_provider.add_span_processor(SimpleSpanProcessor(exporter))
        return _configured_provider
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(otlp_span_exporter(), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _configured_provider = provider
    return provider


def otlp_span_exporter() -> SpanExporter:
    """The OTLP/gRPC span exporter, configured by the OTEL_EXPORTER_OTLP_* variables alone
    (endpoint, TLS: see the module docstring)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown_tracing() -> None:
    if _configured_provider is not None:
        _configured_provider.force_flush(5000)
        _configured_provider.shutdown()


def current_traceparent() -> str:
    """The W3C traceparent of the current span ('' when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context:
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def trace_id_hex(span: trace.Span | None = None) -> str:
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with trace_id/span_id of the current span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ctx = trace.get_current_span().get_span_context()
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if ctx.is_valid:
            doc["trace_id"] = format(ctx.trace_id, "032x")
            doc["span_id"] = format(ctx.span_id, "016x")
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else ""
        return json.dumps(doc, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pynetdicom", "tritonclient", "pytriton", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
