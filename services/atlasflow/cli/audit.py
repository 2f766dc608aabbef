"""`atlasflow audit`: print the audit log of a running stack's services (AuditService, role admin).

    atlasflow token --state-dir .atlasflow --role admin --subject me > admin.token
    atlasflow audit --state-dir .atlasflow --token-file admin.token --since 1h --format fhir

Formats: ``fhir`` (FHIR R4 AuditEvent NDJSON, one resource per line), ``fhir-bundle`` (one
Bundle of every selected service's events), ``atna`` (a JSON array of IHE ATNA-style
messages), ``json`` (the records as the API lists them, one JSON object per line, newest first).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf.json_format import MessageToDict

from atlasflow.cli.exitcodes import CliError, ExitCode, rpc_error
from atlasflow.cli.stack import Stack, state_dir_option, token_file_option
from atlasflow.common.audit import ACTIONS
from atlasflow.common.v1 import audit_pb2, audit_pb2_grpc

AUDITED_SERVICES = ("ingest", "segmentation", "labels", "ranking")
_EXPORT = {
    "fhir": audit_pb2.AUDIT_FORMAT_FHIR_NDJSON,
    "fhir-bundle": audit_pb2.AUDIT_FORMAT_FHIR_BUNDLE,
    "atna": audit_pb2.AUDIT_FORMAT_ATNA_JSON,
}
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_time(text: str) -> datetime | None:
    """``2024-05-01T12:00:00Z`` (ISO 8601; UTC when no offset) or ``30m`` / ``2h`` / ``7d`` ago."""
    if not text:
        return None
    m = _RELATIVE.match(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"not a time: {text!r} (ISO 8601, or 30m / 2h / 7d)", ExitCode.INVALID) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _filter(since: str, until: str, principal: str, action: str, outcome: str) -> audit_pb2.AuditFilter:
    f = audit_pb2.AuditFilter(principal=principal, action=action, outcome=outcome)
    if (start := parse_time(since)) is not None:
        f.start_time.FromDatetime(start.astimezone(UTC).replace(tzinfo=None))
    if (end := parse_time(until)) is not None:
        f.end_time.FromDatetime(end.astimezone(UTC).replace(tzinfo=None))
    return f


@click.command(
    epilog="""\b
Examples:
  atlasflow token --role admin --subject me > admin.token
  atlasflow audit --token-file admin.token --since 1h                 FHIR AuditEvent NDJSON
  atlasflow audit --token-file admin.token --service ingest --action phi-read --format json
  atlasflow audit --token-file admin.token --action auth --format atna > refusals.json
"""
)
@state_dir_option()
@token_file_option("file holding an admin's bearer token (`atlasflow token --role admin ...`)")
@click.option(
    "--service", "services", multiple=True, type=click.Choice(AUDITED_SERVICES), help="only this service (repeatable)"
)
@click.option("--since", default="", help="records at or after: ISO 8601 time, or 30m / 2h / 7d ago")
@click.option("--until", default="", help="records before: ISO 8601 time, or 30m / 2h / 7d ago")
@click.option("--principal", default="", help="only this caller (token subject)")
@click.option("--action", default="", type=click.Choice(["", *ACTIONS]), help="only this action category")
@click.option("--outcome", default="", help="only this outcome, e.g. OK, UNAUTHENTICATED, PERMISSION_DENIED")
@click.option(
    "--format", "fmt", type=click.Choice(["fhir", "fhir-bundle", "atna", "json"]), default="fhir", show_default=True
)
def audit(
    state_dir: Path,
    token_file: Path | None,
    services: tuple[str, ...],
    since: str,
    until: str,
    principal: str,
    action: str,
    outcome: str,
    fmt: str,
) -> int:
    """Print the audit records of the stack's services (role admin)."""
    stack = Stack.open(state_dir, token_file)
    flt = _filter(since, until, principal, action, outcome)
    chosen = [s for s in (services or AUDITED_SERVICES) if s in stack.doc.get("ports", {})]
    bundle: list[Any] = []
    try:
        for service in chosen:
            stub = audit_pb2_grpc.AuditServiceStub(stack.channel(service))
            if fmt == "json":
                token = ""
                while True:
                    page = stub.ListAuditRecords(
                        audit_pb2.ListAuditRecordsRequest(filter=flt, page_size=1000, page_token=token), timeout=60
                    )
                    for r in page.records:
                        click.echo(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))
                    token = page.next_page_token
                    if not token:
                        break
                continue
            chunks = stub.ExportAuditRecords(
                audit_pb2.ExportAuditRecordsRequest(filter=flt, format=_EXPORT[fmt]), timeout=300
            )
            data = b"".join(c.data for c in chunks).decode()
            if fmt == "fhir":
                click.echo(data, nl=False)
            elif fmt == "fhir-bundle":
                bundle += json.loads(data).get("entry", [])
            else:
                bundle += json.loads(data)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
    if fmt == "fhir-bundle":
        click.echo(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": bundle}))
    elif fmt == "atna":
        click.echo(json.dumps(bundle))
    return 0
