"""Authorisation is data, and the data is true: the roles table of docs/security.md equals
`atlasflow.common.policy.POLICY`, POLICY names every RPC the four services define, and on a stack
started the way `atlasflow up` starts it, every RPC the servers expose through reflection
refuses a call with no token, with another issuer's token and with every role the table does
not allow, and lets every allowed role past authentication."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from atlasflow.cli.local import LocalDeployment
from atlasflow.common.auth import ROLES, LocalIssuer
from atlasflow.common.policy import HANDOFF_CALLERS, POLICY
from atlasflow.common.server import error_info_of
from atlasflow.common.v1 import audit_pb2
from atlasflow.ingest.v1 import ingest_pb2
from atlasflow.labels.v1 import labels_pb2
from atlasflow.ranking.v1 import ranking_pb2
from atlasflow.segmentation.v1 import segmentation_pb2
from atlasflow.testing.data import REPO
from atlasflow.training.v1 import training_pb2

SERVICES = ("ingest", "segmentation", "ranking", "labels", "training")
# audit_pb2: the AuditService every service serves (atlasflow.common.audit_server)
DESCRIPTORS = (ingest_pb2, segmentation_pb2, ranking_pb2, labels_pb2, training_pb2, audit_pb2)


def _defined_rpcs() -> set[str]:
    return {
        f"/{svc.full_name}/{m.name}"
        for module in DESCRIPTORS
        for svc in module.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    }


def test_policy_names_every_rpc_and_nothing_else() -> None:
    assert set(POLICY) == _defined_rpcs()
    assert all(roles <= set(ROLES) and roles for roles in POLICY.values())


def test_security_doc_shows_the_policy() -> None:
    text = (REPO / "docs" / "security.md").read_text()
    header = "| service | RPC | " + " | ".join(ROLES) + " |"
    assert header in text
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| (\w+) \| `(\w+)` \|(.*)\|", line.strip())
        if m:
            cells = [c.strip() for c in m.group(3).split("|")]
            rows[(m.group(1), m.group(2))] = frozenset(r for r, c in zip(ROLES, cells, strict=True) if c == "✓")
    expected = {(m.strip("/").split("/")[0].split(".")[1], m.rsplit("/", 1)[1]): roles for m, roles in POLICY.items()}
    assert rows == expected


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """The services as `atlasflow up` starts them (no Triton: no call here reaches it)."""
    dep = LocalDeployment.create(tmp_path_factory.mktemp("stack"), auto_ports=True)
    names = ["labels", "ranking", "segmentation", "ingest", "training"]
    dep.start(names)
    try:
        dep.wait_healthy(120, names)
        yield dep
    finally:
        dep.stop(names=names)


def _reflected_methods(stack: LocalDeployment, service: str) -> list:
    """The method descriptors of every atlasflow RPC ``service`` lists through reflection
    (their input types resolved through reflection too)."""
    with stack.bare_channel(service) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        return [
            m
            for name in db.get_services()
            if name.startswith("atlasflow.")
            for m in pool.FindServiceByName(name).methods
        ]


def _reflected_rpcs(stack: LocalDeployment, service: str) -> list[tuple[str, bool, bool]]:
    """(method path, client streaming, server streaming) of every atlasflow RPC of ``service``."""
    return [
        (f"/{m.containing_service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for m in _reflected_methods(stack, service)
    ]


def _call(
    channel: grpc.Channel,
    rpc: tuple[str, bool, bool],
    metadata: tuple,
    request_bytes: bytes = b"",
    reason: list | None = None,
) -> grpc.StatusCode:
    """Call ``rpc`` with ``request_bytes`` (default an empty request); the status code (OK if it
    succeeded); ``reason`` collects the ErrorInfo reason."""
    path, client_stream, server_stream = rpc
    ident = lambda b: b  # noqa: E731 - raw bytes: an empty message on the wire
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_stream, server_stream)]
    call = kind(path, request_serializer=ident, response_deserializer=ident)
    request = iter([request_bytes]) if client_stream else request_bytes
    try:
        result = call(request, metadata=metadata, timeout=20)
        if server_stream:
            list(result)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if reason is not None:
            info = error_info_of(exc)
            reason.append(info.reason if info else "")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            info = error_info_of(exc)
            assert info is not None and info.domain == "atlasflow.auth", path
        return code
    return grpc.StatusCode.OK


def test_every_rpc_refuses_wrong_or_missing_tokens_and_admits_allowed_roles(
    stack: LocalDeployment, tmp_path: Path
) -> None:
    stranger = LocalIssuer.create_or_load(tmp_path / "stranger", issuer=stack.issuer().issuer)
    seen = set()
    for service in SERVICES:
        rpcs = _reflected_rpcs(stack, service)
        assert rpcs, f"{service} lists no atlasflow service through reflection"
        with stack.bare_channel(service) as channel:
            for rpc in rpcs:
                path = rpc[0]
                seen.add(path)
                assert _call(channel, rpc, ()) == grpc.StatusCode.UNAUTHENTICATED, path
                garbage = (("authorization", "Bearer not.a.token"),)
                assert _call(channel, rpc, garbage) == grpc.StatusCode.UNAUTHENTICATED, path
                # same issuer name, another key: refused
                forged = (("authorization", f"Bearer {stranger.mint('mallory', ['admin', 'service'])}"),)
                assert _call(channel, rpc, forged) == grpc.StatusCode.UNAUTHENTICATED, path
                for role in ROLES:
                    if role == "service":  # one identity per service: checked just below
                        continue
                    token = (("authorization", f"Bearer {stack.mint(role, f'test-{role}')}"),)
                    code = _call(channel, rpc, token)
                    if role in POLICY[path]:
                        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                            path,
                            role,
                            code,
                        )
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (path, role, code)
                # each service's own token (auth/<service>.token): past authorisation exactly
                # where HANDOFF_CALLERS lists it, else PERMISSION_DENIED (CALLER_NOT_ALLOWED
                # where the role is allowed, ROLE_NOT_ALLOWED where it is not)
                for caller in SERVICES:
                    token = (("authorization", f"Bearer {stack.service_token_file(caller).read_text()}"),)
                    reasons: list = []
                    code = _call(channel, rpc, token, reason=reasons)
                    if "svc:" + caller in HANDOFF_CALLERS.get(path, ()):
                        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (
                            path,
                            caller,
                            code,
                        )
                    else:
                        expected = "CALLER_NOT_ALLOWED" if "service" in POLICY[path] else "ROLE_NOT_ALLOWED"
                        assert (code, reasons) == (grpc.StatusCode.PERMISSION_DENIED, [expected]), (path, caller)
    assert seen == set(POLICY)


def test_each_service_has_its_own_identity(stack: LocalDeployment) -> None:
    """`atlasflow up` mints one token per service (auth/<service>.token, 0600, subject
    svc:<service>) and points each service's TOKEN_FILE at its own; the shared token is gone.
    Ingest's token (the service that parses untrusted DICOM) cannot call labels' or
    segmentation's hand-offs; labels' token records label versions."""
    from atlasflow.common.auth import TokenVerifier

    verifier = TokenVerifier(stack.issuer().config())
    for name in SERVICES:
        path = stack.service_token_file(name)
        assert path.stat().st_mode & 0o777 == 0o600
        identity = verifier.verify(path.read_text())
        assert (identity.subject, identity.service, identity.roles) == (f"svc:{name}", f"svc:{name}", {"service"})
        assert stack._env(name)[f"ATLASFLOW_{name.upper()}_TOKEN_FILE"] == str(path)
    assert not (stack.auth_dir / "service.token").exists()

    def as_service(name: str) -> tuple:
        return (("authorization", f"Bearer {stack.service_token_file(name).read_text()}"),)

    forbidden = (
        ("ranking", "/atlasflow.ranking.v1.RankingService/RecordLabelVersion", ranking_pb2.RecordLabelVersionRequest()),
        ("ranking", "/atlasflow.ranking.v1.RankingService/SubmitAttention", ranking_pb2.SubmitAttentionRequest()),
        ("labels", "/atlasflow.labels.v1.LabelService/CreateLabelVersion", labels_pb2.CreateLabelVersionRequest()),
    )
    for service, path, request in forbidden:
        with stack.bare_channel(service) as channel:
            reasons: list = []
            code = _call(channel, (path, False, False), as_service("ingest"), request.SerializeToString(), reasons)
            assert (code, reasons) == (grpc.StatusCode.PERMISSION_DENIED, ["CALLER_NOT_ALLOWED"]), path
    # labels' own token: the hand-off is made (ranking remembers a version of an unknown case)
    request = ranking_pb2.RecordLabelVersionRequest(case_id="case-handoff", label_version_id="v1", version_number=1)
    with stack.bare_channel("ranking") as channel:
        path = "/atlasflow.ranking.v1.RankingService/RecordLabelVersion"
        assert _call(channel, (path, False, False), as_service("labels"), request.SerializeToString()) == (
            grpc.StatusCode.OK
        )


def test_health_needs_no_token(stack: LocalDeployment) -> None:
    assert all(stack.healthy(s) for s in SERVICES)


def test_the_stack_is_tls_with_client_certificates(stack: LocalDeployment, tmp_path: Path) -> None:
    """`atlasflow up` serves every gRPC listener over TLS and requires a client certificate of
    its own CA (mTLS): a plaintext client, a TLS client without a certificate and one with a
    certificate of another CA all fail before any RPC (even a health check); the stack's own
    command-line certificate works."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from atlasflow.common.clients import raw_channel
    from atlasflow.common.tls import PLAINTEXT, ClientTLS, LocalCA

    ca = str(stack.ca().ca_file)
    other = LocalCA.create_or_load(tmp_path / "other-ca")
    stranger = other.issue("cli", server=False)
    refused = {
        "plaintext": PLAINTEXT,
        "no certificate": ClientTLS(ca_file=ca),
        "another CA's certificate": ClientTLS(ca, str(stranger.cert_file), str(stranger.key_file)),
    }
    for service in SERVICES:
        for why, tls in refused.items():
            with raw_channel(stack.target(service), tls) as channel, pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (service, why)
        with stack.bare_channel(service) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # `atlasflow send` finds the stack's TLS through --state-dir (run/endpoints.json): its
    # upload reaches ingest, which refuses the file for what it is (not for the transport)
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "junk.dcm").write_bytes(b"not DICOM" * 20)
    token = tmp_path / "connector.token"
    token.write_text(stack.mint("connector", "test-connector"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLASFLOW_TLS_")}
    args = [sys.executable, "-m", "atlasflow.cli.main", "send", str(tmp_path / "upload"), "--target"]
    args += [stack.target("ingest"), "--token-file", str(token), "--state-dir", str(stack.state_dir)]
    sent = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert sent.returncode == 1 and "refused: NOT_DICOM" in sent.stderr, sent.stderr


def test_a_path_like_id_in_any_request_is_invalid_argument(stack: LocalDeployment) -> None:
    """Every ``*_id`` / ``*_ids`` field of every request, found by reflection, set to ``../x``
    (as an allowed role) answers INVALID_ARGUMENT, reason INVALID_ID, before any handler runs."""
    checked = 0
    for service in SERVICES:
        with stack.bare_channel(service) as channel:
            for m in _reflected_methods(stack, service):
                path = f"/{m.containing_service.full_name}/{m.name}"
                role = sorted(POLICY[path])[0]
                # a service-only hand-off: as a service that makes it
                subject = sorted(HANDOFF_CALLERS[path])[0] if role == "service" else "test-ids"
                token = (("authorization", f"Bearer {stack.mint(role, subject)}"),)
                request_type = GetMessageClass(m.input_type)
                for field in m.input_type.fields:
                    if field.type != field.TYPE_STRING or not field.name.endswith(("_id", "_ids")):
                        continue
                    request = request_type()
                    if field.is_repeated:
                        getattr(request, field.name).append("../x")
                    else:
                        setattr(request, field.name, "../x")
                    reasons: list = []
                    rpc = (path, m.client_streaming, m.server_streaming)
                    code = _call(channel, rpc, token, request.SerializeToString(), reasons)
                    # upload_id keeps ingest's documented, stricter check (common.ids.SELF_CHECKED)
                    expected = "INVALID_UPLOAD_ID" if field.name == "upload_id" else "INVALID_ID"
                    assert (code, reasons) == (grpc.StatusCode.INVALID_ARGUMENT, [expected]), (path, field.name)
                    checked += 1
    assert checked >= 25


def _echo(port: int, calling: str) -> subprocess.CompletedProcess:
    exe = shutil.which("echoscu")
    assert exe, "dcmtk echoscu is required (scripts/bootstrap.sh installs it)"
    return subprocess.run(
        [exe, "-aet", calling, "-aec", "ATLASFLOW", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30
    )


def test_dicom_refuses_calling_aes_it_was_not_told_about(stack: LocalDeployment) -> None:
    """Deny by default: the stack accepts the README's storescu title and the demo's sender,
    nothing else (A-ASSOCIATE-RJ, calling AE title not recognised)."""
    refused = _echo(stack.ports["dicom"], "INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert _echo(stack.ports["dicom"], "STORESCU").returncode == 0


def test_refused_before_the_request_is_read(stack: LocalDeployment) -> None:
    """Authentication uses the call's metadata alone: a body that is not even protobuf, sent
    without a token, is refused UNAUTHENTICATED (never parsed, no internal error); two
    authorization entries are refused rather than guessed between."""
    rpc = ("/atlasflow.labels.v1.LabelService/GetLabelVersion", False, False)
    with stack.bare_channel("labels") as channel:
        reasons: list = []
        assert _call(channel, rpc, (), b"\xff\xff\xff not protobuf", reasons) == grpc.StatusCode.UNAUTHENTICATED
        assert reasons == ["MISSING_TOKEN"]
        good = stack.mint("admin", "a")
        two = (("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}"))
        reasons = []
        assert _call(channel, rpc, two, b"", reasons) == grpc.StatusCode.UNAUTHENTICATED
        assert reasons == ["INVALID_TOKEN"]


def test_an_admin_export_cannot_leave_the_export_root(stack: LocalDeployment, tmp_path: Path) -> None:
    """`atlasflow up` confines exports to <state>/exports: a destination elsewhere, even an
    admin's, is refused before anything is written."""
    from atlasflow.labels.v1 import labels_pb2_grpc

    labels = labels_pb2_grpc.LabelServiceStub(stack.channel("labels", token=stack.token_source("admin", "test-admin")))
    outside = tmp_path / "elsewhere"
    # the second climbs out of the root with a percent-encoded "..": decoded, then resolved
    for uri in (outside.as_uri(), f"file://{stack.state_dir}/exports/%2e%2e/run"):
        with pytest.raises(grpc.RpcError) as err:
            labels.ExportDataset(labels_pb2.ExportDatasetRequest(destination_uri=uri), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info_of(err.value).reason == "DESTINATION_NOT_ALLOWED", uri
    assert not outside.exists()
