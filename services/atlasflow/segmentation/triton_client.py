"""Client for the ensemble pipeline model served by `atlasflow.segmentation.triton_server`.

Uses ``tritonclient.grpc``. Each call runs in an OpenTelemetry CLIENT span ``triton.infer``
(attributes: model name, input shape and dtype; never patient data); the W3C trace context is
injected both as gRPC headers (``headers=``) and as Triton request parameters
(``traceparent``/``tracestate``), which the server turns into its ``segmentation.pipeline`` span.

Errors: Triton unreachable / timed out -> Unavailable(``TRITON_UNAVAILABLE``); model unknown or
not ready -> FailedPrecondition(``TRITON_MODEL_NOT_READY``); a message over the gRPC limit ->
ResourceExhausted(``TRITON_MESSAGE_TOO_LARGE``); a domain error raised in the server
pipeline comes back as the same class and reason; any other server-side failure ->
AtlasflowError(``TRITON_INFERENCE_FAILED``, gRPC INTERNAL); a malformed response ->
DataLoss(``TRITON_BAD_RESPONSE``). Messages never carry the server's stack traces.

Retries: a call that finds Triton unreachable (gRPC UNAVAILABLE before any work was done) is
retried ``connect_retries`` times with exponential backoff (``retry_backoff_s``, doubling)
before Unavailable(``TRITON_UNAVAILABLE``) is raised; with a target that spreads (below) a
"model not ready" answer is retried the same way (round-robin sends it to the next replica: one
started after a roll-out lacks the rolled-out model); deadlines are never retried here (the
job layer requeues the series durably, see `worker.Worker`).

Transport (``shm``, setting ``ATLASFLOW_SEGMENTATION_TRITON_SHM``):
- ``"auto"`` (default): Triton *system* shared memory when the server is co-located (its URL
  host is loopback), gRPC payloads otherwise;
- ``"on"``: try shared memory whatever the host (e.g. a sidecar reached by pod IP with a
  shared ``/dev/shm`` and IPC namespace);
- ``"off"``: always gRPC payloads.
With shared memory, one region per call holds the inputs (volume, affine, flags; written by
this process) and one the outputs (labels, heatmap, stats, flag; written by Triton); both are
registered with ``register_system_shared_memory`` and unregistered + unlinked after the call,
so the gRPC messages carry only tensor metadata. If creating or registering a region fails
(server on another host, ``/dev/shm`` too small, ...), the call falls back to gRPC payloads,
and in ``"auto"`` mode later calls skip shared memory.
The local PyTriton server (`triton_server`) restricts no protocol (it has no access token:
docs/security.md, "Triton"), so a co-located client registers its regions without a header.

Transport security (``tls``, `atlasflow.common.tls.ClientTLS`): with TLS the channel verifies
Triton's certificate against ``tls.ca_file`` and presents ``tls.cert_file``/``tls.key_file``
as the client certificate (the chart runs Triton with ``--grpc-use-ssl-mutual``, so a client
without a certificate of the release's CA is refused in the handshake). Plaintext is for a
loopback Triton only (the local stack's PyTriton): a plaintext client of a Triton on another
host is refused at construction (InvalidArgument ``TRITON_TLS_REQUIRED``) unless
``allow_plaintext`` says the whole deployment is knowingly plaintext (the chart with
``tls.enabled=false``). `triton_grpc_client` builds the same channel for the training roll-out.

Several Triton replicas (issue 17): client-side round-robin. Every channel runs gRPC's own
``round_robin`` load-balancing policy (channel arg ``grpc.lb_policy_name``): it connects to
EVERY address the target resolves to and sends each call to the next ready one. ``url`` may
be ``host:port`` / ``grpc://host:port`` or a gRPC target URI: ``dns:///<headless
Service>:8001`` (the chart: a headless Service resolves to one address per ready Triton pod;
a ClusterIP Service would resolve to one virtual IP, and kube-proxy pins the one long-lived
HTTP/2 connection to ONE pod) or ``ipv4:10.0.0.5:8001,10.0.0.6:8001`` (a fixed list). gRPC
re-resolves the name when a connection is lost (a pod gone); it does not poll, so
`TritonSegmenter` rebuilds a spreading channel every ``reresolve_s`` (300 s): a replica added
by a scale-up receives calls within that time (docs/architecture.md, "Several Triton
replicas"). A call that hits a pod going away is
retried (``connect_retries``) and goes to another. With TLS the certificate is checked against
the name in the target (the chart's Triton certificate carries the headless Service's names)
or ``tls.server_name``. Shared memory needs the registering and the inferring call to reach
the same server, so a target that may spread (several addresses, ``dns:``) never uses it.
`target_addresses` lists the addresses behind a target (`socket.getaddrinfo`), and
`address_clients` builds one client per address (TLS checked against the target's name):
what the roll-out and the readiness check of an activated version use to reach EVERY replica.

Message size: gRPC payloads need ``max_message_bytes`` above the largest request/response:
a 512x512x600 int16 CT is 315 MB in and 2 x 157 MB (uint8 labels + heatmap) out; the
default 1 GiB covers it (Triton's own gRPC limit is 2 GiB - 1).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common import errors
from atlasflow.common.errors import (
    AtlasflowError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from atlasflow.common.organs import NUM_ORGANS
from atlasflow.common.tls import ClientTLS
from atlasflow.segmentation.outputs import DOMAIN, STATS_COLUMNS, PipelineOutput, labelled_flags

LOG = logging.getLogger(__name__)
SHM_MODES = ("auto", "on", "off")
OUTPUT_NAMES = ("labels", "heatmap", "organ_stats", "weights_trained")
# One array per OUTPUT_NAMES entry; None where the response lacks or garbles it.
_Outputs = tuple[npt.NDArray[Any] | None, ...]
_SERVER_ERROR = re.compile(r"ATLASFLOW_ERROR ([A-Z_]+) ([A-Z0-9_]+): ([^\n]*)")
_CODE_CLASSES: dict[str, type[AtlasflowError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, AtlasflowError) and cls is not AtlasflowError
}


#: gRPC's load-balancing policy on every Triton channel (module docstring)
LB_POLICY = ("grpc.lb_policy_name", "round_robin")


def _url_target(url: str) -> str:
    """Accept ``host:port``, ``grpc://host:port`` or a gRPC target URI (``dns:///h:p``,
    ``ipv4:a:p,b:p``, ``ipv6:[a]:p,...``, ``unix:path``), returned as gRPC's target."""
    url = url.strip()
    return url[len("grpc://") :] if url.startswith("grpc://") else url


def _split_target(target: str) -> tuple[str, list[str]]:
    """(scheme, ``host:port`` entries) of a gRPC target: ``("ipv4", [...])`` for an address
    list, ``("dns", [name:port])``, ``("unix", [])``, ``("", [target])`` for plain host:port."""
    for scheme in ("ipv4", "ipv6"):
        if target.startswith(scheme + ":"):
            rest = target[len(scheme) + 1 :].lstrip("/")
            return scheme, [a.strip() for a in rest.split(",") if a.strip()]
    if target.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):  # dns://[authority]/host:port
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        return "dns", [rest]
    if target.startswith(("unix:", "unix-abstract:")):
        return "unix", []
    return "", [target]


def _host_port(entry: str, default_port: int = 8001) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port)."""
    if entry.startswith("["):
        host, _, tail = entry[1:].partition("]")
        return host, int(tail[1:]) if tail.startswith(":") and tail[1:] else default_port
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port) if port else default_port
    return entry, default_port  # a bare host or a bare IPv6 address


def is_loopback(target: str) -> bool:
    """True when every address of the target names this machine (localhost, 127.0.0.0/8, ::1,
    a Unix socket)."""
    scheme, entries = _split_target(_url_target(target))
    if scheme == "unix":
        return True
    if not entries:
        return False
    for entry in entries:
        host = _host_port(entry)[0]
        if host in ("localhost", "ip6-localhost"):
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def spreads(target: str) -> bool:
    """True when the target may stand for several servers (an address list, a ``dns:`` URI)."""
    scheme, entries = _split_target(_url_target(target))
    return scheme == "dns" or len(entries) > 1


def target_name(target: str) -> str:
    """The DNS name in the target (``dns:///name:port`` or ``name:port``; "" for an address
    list or an IP): the name a per-address client checks Triton's certificate against."""
    scheme, entries = _split_target(_url_target(target))
    if scheme not in ("dns", "") or len(entries) != 1:
        return ""
    host = _host_port(entries[0])[0]
    try:
        ipaddress.ip_address(host)
        return ""
    except ValueError:
        return host


def target_addresses(url: str, *, domain: str = DOMAIN) -> list[str]:
    """Every ``ip:port`` (``[v6]:port``) behind ``url``: an address list as given, a name
    through `socket.getaddrinfo` (a headless Service: one address per ready pod), in a stable
    order. Unavailable ``TRITON_UNRESOLVED`` when the name resolves to nothing."""
    scheme, entries = _split_target(_url_target(url))
    if scheme == "unix":
        return [_url_target(url)]
    out: list[str] = []
    for entry in entries:
        host, port = _host_port(entry)
        try:
            ipaddress.ip_address(host)
            found = [host]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                infos = []
            found = sorted({str(info[4][0]) for info in infos})
            if not found:
                raise Unavailable(
                    "TRITON_UNRESOLVED",
                    "the Triton address resolves to no server (no ready Triton pod behind the Service?)",
                    domain=domain,
                    metadata={"target": entry[:200]},
                ) from None
        for ip in found:
            addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if addr not in out:
                out.append(addr)
    return out


def address_clients(
    url: str,
    tls: ClientTLS | None = None,
    *,
    allow_plaintext: bool = False,
    channel_args: Sequence[tuple[str, Any]] = (),
    domain: str = DOMAIN,
) -> list[tuple[str, Any]]:
    """(address, client) for EVERY server behind ``url`` (`target_addresses`): one client per
    address. With TLS, Triton's certificate is checked against ``tls.server_name`` or else the
    name in ``url`` (`target_name`; an address has no name of its own). The caller closes them."""
    addresses = target_addresses(url, domain=domain)
    if tls is not None and tls.enabled and not tls.server_name and target_name(url):
        tls = dataclasses.replace(tls, server_name=target_name(url))
    if tls is None or not tls.enabled:
        _check_plaintext(_url_target(url), allow_plaintext, domain)  # decided on the url, not its IPs
    built: list[tuple[str, Any]] = []
    try:
        for addr in addresses:
            client = triton_grpc_client(addr, tls, allow_plaintext=True, channel_args=channel_args, domain=domain)
            built.append((addr, client))
    except BaseException:
        for _, client in built:
            client.close()
        raise
    return built


def triton_grpc_client(
    url: str,
    tls: ClientTLS | None = None,
    *,
    allow_plaintext: bool = False,
    channel_args: Sequence[tuple[str, Any]] = (),
    domain: str = DOMAIN,
) -> Any:
    """A ``tritonclient.grpc.InferenceServerClient`` for Triton's gRPC endpoint at ``url``
    (``host:port`` or a gRPC target URI; calls spread round-robin over every address it
    resolves to): TLS (+ client certificate) when ``tls`` is enabled, plaintext only to a
    loopback host (or with ``allow_plaintext``), else InvalidArgument ``TRITON_TLS_REQUIRED``."""
    import tritonclient.grpc as grpcclient

    target = _url_target(url)
    args = [*channel_args, LB_POLICY]
    if tls is not None and tls.enabled:
        return grpcclient.InferenceServerClient(
            target, ssl=True, creds=tls.credentials(), channel_args=args + tls.options()
        )
    _check_plaintext(target, allow_plaintext, domain)
    return grpcclient.InferenceServerClient(target, channel_args=args)


def _check_plaintext(target: str, allow_plaintext: bool, domain: str) -> None:
    if not (is_loopback(target) or allow_plaintext):
        raise InvalidArgument(
            "TRITON_TLS_REQUIRED",
            "Triton on another host needs TLS: set the TRITON_TLS_CA_FILE / TRITON_TLS_CERT_FILE / "
            "TRITON_TLS_KEY_FILE settings (or TRITON_ALLOW_PLAINTEXT for a knowingly plaintext deployment)",
            domain=domain,
            metadata={"target": target[:200]},
        )


def unready_addresses(
    url: str,
    model_name: str,
    tls: ClientTLS | None = None,
    *,
    allow_plaintext: bool = False,
    timeout_s: float = 5.0,
) -> list[str]:
    """``"<address>: <why>"`` for every server behind ``url`` (`address_clients`) on which
    ``model_name`` is not ready (empty: ready on every replica). Raises Unavailable
    ``TRITON_UNRESOLVED`` when the name resolves to nothing."""
    from tritonclient.utils import InferenceServerException

    missing: list[str] = []
    for addr, client in address_clients(url, tls, allow_plaintext=allow_plaintext):
        try:
            if not client.is_model_ready(model_name, client_timeout=timeout_s):
                missing.append(f"{addr}: model not ready")
        except InferenceServerException as exc:
            missing.append(f"{addr}: {str(exc.status() or 'unreachable')[:80]}")
        finally:
            client.close()
    return missing


def ready_on_every_replica(
    url: str, tls: ClientTLS | None = None, *, allow_plaintext: bool = False
) -> Callable[[str], bool]:
    """The readiness check of an activated version in repository mode
    (`atlasflow.segmentation.activation.ReadyCheckLoader`): True when the model is ready on
    EVERY server behind ``url`` (`unready_addresses`), else Unavailable ``TRITON_LOAD_FAILED``
    naming the addresses that lack it (the follower retries it)."""

    def is_ready(model_name: str) -> bool:
        missing = unready_addresses(url, model_name, tls, allow_plaintext=allow_plaintext)
        if missing:
            raise Unavailable(
                "TRITON_LOAD_FAILED",
                f"{len(missing)} Triton server(s) do not serve the version's model "
                "(load it through the repository API on every replica first)",
                domain=DOMAIN,
                metadata={"model": model_name, "addresses": "; ".join(missing)[:500]},
            )
        return True

    return is_ready


class TritonSegmenter:
    """Segment CTs with the ensemble model hosted in Triton (gRPC)."""

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        timeout_s: float = 600,
        max_message_bytes: int = 1 << 30,
        tracer_provider: Any | None = None,
        shm: str | None = None,
        connect_retries: int = 2,
        retry_backoff_s: float = 0.5,
        tls: ClientTLS | None = None,
        allow_plaintext: bool = False,
        access_token: str | None = None,
        reresolve_s: float = 300.0,
    ) -> None:
        """``url``: Triton's gRPC endpoint, ``host:port`` or a gRPC target URI whose addresses
        the calls spread over (module docstring); ``timeout_s``: per-call deadline;
        ``tracer_provider``: optional OpenTelemetry TracerProvider (default: the global one);
        ``shm``: ``auto``/``on``/``off`` (default: ``ATLASFLOW_SEGMENTATION_TRITON_SHM`` or
        ``auto``); ``connect_retries``/``retry_backoff_s``: retries of an unreachable server;
        ``tls``: the channel's TLS and client certificate (None / disabled: plaintext, loopback
        only unless ``allow_plaintext``, see `triton_grpc_client`); ``access_token``: no longer
        supported (Triton has no access token any more; a value raises InvalidArgument);
        ``reresolve_s``: with a target that spreads, the channel is rebuilt for the calls after
        this many seconds, so Triton replicas added since are resolved and reached (gRPC's DNS
        resolver does not poll); 0 = never. A replaced channel is closed once no call started
        on it can still run (``timeout_s`` later)."""
        if access_token:
            raise InvalidArgument(
                "TRITON_ACCESS_TOKEN_UNSUPPORTED",
                "the Triton access token is no longer used (it sat on tritonserver's command line): "
                "remove it; Triton is reached over loopback or mutual TLS (docs/security.md)",
                domain=DOMAIN,
            )
        self.url = _url_target(url)
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self._tracer_provider = tracer_provider
        mode = (shm or os.environ.get("ATLASFLOW_SEGMENTATION_TRITON_SHM") or "auto").lower()
        if mode not in SHM_MODES:
            raise ValueError(f"shm must be one of {SHM_MODES}, got {mode!r}")
        self.shm_mode = mode
        # shared memory needs the register and the infer call on one server: never when spreading
        self._spreads = spreads(self.url)
        self._shm_usable = not self._spreads and (mode == "on" or (mode == "auto" and is_loopback(self.url)))
        self.connect_retries = max(0, int(connect_retries))
        self.retry_backoff_s = float(retry_backoff_s)
        self.last_transport = ""  # "shm" or "grpc": how the last successful call moved tensors
        args = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
        ]

        def build() -> Any:
            return triton_grpc_client(self.url, tls, allow_plaintext=allow_plaintext, channel_args=args)

        self._build = build
        self._client = build()
        self.reresolve_s = float(reresolve_s)
        self._built_at = time.monotonic()
        self._retired: list[tuple[float, Any]] = []  # (replaced at, client) still closing
        self._lock = threading.Lock()

    def _current(self) -> Any:
        """The client of the next inference: rebuilt every ``reresolve_s`` with a target that
        spreads; replaced ones are closed ``timeout_s`` (+1 s) after, when their calls are over."""
        if not (self._spreads and self.reresolve_s > 0):
            return self._client
        now = time.monotonic()
        with self._lock:
            if now - self._built_at >= self.reresolve_s:
                self._retired.append((now, self._client))
                self._client = self._build()
                self._built_at = now
            keep = []
            for since, old in self._retired:
                if now - since > self.timeout_s + 1.0:
                    old.close()
                else:
                    keep.append((since, old))
            self._retired = keep
            return self._client

    def close(self) -> None:
        with self._lock:
            for _, old in self._retired:
                old.close()
            self._retired = []
        self._client.close()

    def __enter__(self) -> TritonSegmenter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def ready(self) -> bool:
        """True when the server is live and the model is ready; False if unreachable."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_server_live(client_timeout=5.0)) and bool(
                self._client.is_model_ready(self.model_name, client_timeout=5.0)
            )
        except InferenceServerException:
            return False

    def _map_error(self, exc: Exception) -> AtlasflowError:
        status = str(getattr(exc, "status", lambda: "")() or "")
        text = str(getattr(exc, "message", lambda: "")() or exc)
        meta = {"model": self.model_name}
        match = _SERVER_ERROR.search(text)
        if match:
            cls = _CODE_CLASSES.get(match.group(1), AtlasflowError)
            return cls(match.group(2), match.group(3), domain=DOMAIN, metadata=meta)
        if "RESOURCE_EXHAUSTED" in status:
            return ResourceExhausted(
                "TRITON_MESSAGE_TOO_LARGE",
                "request or response exceeds the gRPC message limit (max_message_bytes)",
                domain=DOMAIN,
                metadata=meta,
            )
        if any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")) or "Deadline" in text:
            return Unavailable(
                "TRITON_UNAVAILABLE", "Triton inference server is unavailable", domain=DOMAIN, metadata=meta
            )
        if "NOT_FOUND" in status or "unknown model" in text or "not ready" in text.lower():
            return FailedPrecondition(
                "TRITON_MODEL_NOT_READY", "model is not loaded in Triton", domain=DOMAIN, metadata=meta
            )
        return AtlasflowError("TRITON_INFERENCE_FAILED", "Triton inference failed", domain=DOMAIN, metadata=meta)

    def segment(
        self,
        volume_hu: npt.NDArray[Any],
        affine: npt.NDArray[Any],
        labelled_organs: Sequence[int] = (),
    ) -> PipelineOutput:
        """Run the pipeline remotely.

        ``volume_hu``: ``(X, Y, Z)`` HU, sent as int16; ``affine``: 4x4 voxel -> RAS mm;
        ``labelled_organs``: organ ids 1..9 that the case's source labels.
        Returns outputs on the input grid (see `PipelineOutput`).
        """
        from opentelemetry import propagate, trace

        vol = np.ascontiguousarray(np.asarray(volume_hu), dtype=np.int16)
        aff = np.ascontiguousarray(np.asarray(affine, dtype=np.float64))
        flags = labelled_flags(labelled_organs)
        tracer = trace.get_tracer(__name__, tracer_provider=self._tracer_provider)
        with tracer.start_as_current_span(
            "triton.infer",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "triton",
                "atlasflow.model_name": self.model_name,
                "atlasflow.input_shape": list(vol.shape),
                "atlasflow.input_dtype": "int16",
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            try:
                arrays = self._infer_retrying(vol, aff, flags, carrier)
            except AtlasflowError as mapped:
                span.set_attribute("atlasflow.error_reason", mapped.reason)
                span.set_status(trace.Status(trace.StatusCode.ERROR, mapped.reason))
                raise
            span.set_attribute("atlasflow.transport", self.last_transport)
            labels, heatmap, stats, trained = arrays
            if (
                labels is None
                or heatmap is None
                or stats is None
                or trained is None
                or labels.shape != vol.shape
                or heatmap.shape != vol.shape
                or labels.dtype != np.uint8
                or heatmap.dtype != np.uint8
                or stats.shape != (NUM_ORGANS, len(STATS_COLUMNS))
                or trained.size != 1
            ):
                span.set_status(trace.Status(trace.StatusCode.ERROR, "TRITON_BAD_RESPONSE"))
                raise DataLoss(
                    "TRITON_BAD_RESPONSE",
                    "Triton returned outputs of unexpected shape or type",
                    domain=DOMAIN,
                    metadata={"model": self.model_name},
                )
        return PipelineOutput(
            labels=labels,
            heatmap=heatmap,
            organ_stats=stats.astype(np.float64),
            weights_trained=bool(trained.reshape(-1)[0]),
        )

    # -- transport ------------------------------------------------------------------------
    def _infer_retrying(
        self, vol: npt.NDArray[Any], aff: npt.NDArray[Any], flags: npt.NDArray[Any], carrier: dict[str, str]
    ) -> _Outputs:
        """One inference with connection retries; returns (labels, heatmap, stats, trained)."""
        from tritonclient.utils import InferenceServerException

        attempt = 0
        while True:
            try:
                if self._shm_usable:
                    try:
                        out = self._infer_shm(vol, aff, flags, carrier)
                        self.last_transport = "shm"
                        return out
                    except _ShmSetupError as exc:
                        LOG.warning(
                            "shared memory unavailable, using gRPC payloads",
                            extra={"fields": {"reason": str(exc)[:200]}},
                        )
                        if self.shm_mode == "auto":
                            self._shm_usable = False
                out = self._infer_grpc(vol, aff, flags, carrier)
                self.last_transport = "grpc"
                return out
            except InferenceServerException as exc:
                mapped = self._map_error(exc)
                unreachable = mapped.reason == "TRITON_UNAVAILABLE" and "UNAVAILABLE" in str(exc.status() or "")
                # spreading: a replica without the model (started after a roll-out) -> the next one
                elsewhere = self._spreads and mapped.reason == "TRITON_MODEL_NOT_READY"
                if not (unreachable or elsewhere) or attempt >= self.connect_retries:
                    raise mapped from None
                time.sleep(self.retry_backoff_s * (2**attempt))  # also lets a new channel reach the others
                attempt += 1

    def _inputs(self) -> list[Any]:
        import tritonclient.grpc as grpcclient

        return [
            grpcclient.InferInput("volume", [0, 0, 0], "INT16"),
            grpcclient.InferInput("affine", [4, 4], "FP64"),
            grpcclient.InferInput("labelled_organs", [NUM_ORGANS], "UINT8"),
        ]

    def _call(self, inputs: list[Any], outputs: list[Any], carrier: dict[str, str]) -> Any:
        return self._current().infer(
            self.model_name,
            inputs,
            outputs=outputs,
            client_timeout=self.timeout_s,
            headers=dict(carrier),
            parameters=dict(carrier) or None,
        )

    def _infer_grpc(
        self, vol: npt.NDArray[Any], aff: npt.NDArray[Any], flags: npt.NDArray[Any], carrier: dict[str, str]
    ) -> _Outputs:
        import tritonclient.grpc as grpcclient

        inputs = self._inputs()
        inputs[0].set_shape(list(vol.shape))
        for inp, arr in zip(inputs, (vol, aff, flags)):
            inp.set_data_from_numpy(arr)
        result = self._call(inputs, [grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES], carrier)
        try:
            return tuple(result.as_numpy(n) for n in OUTPUT_NAMES)
        except Exception:  # noqa: BLE001 - undecodable response
            return (None, None, None, None)

    def _infer_shm(
        self, vol: npt.NDArray[Any], aff: npt.NDArray[Any], flags: npt.NDArray[Any], carrier: dict[str, str]
    ) -> _Outputs:
        """Inputs and outputs through two registered system shared-memory regions."""
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        tag = f"atlasflow_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        in_arrays = (vol, aff, flags)
        in_sizes = [a.nbytes for a in in_arrays]
        out_specs = (
            (vol.shape, np.uint8),
            (vol.shape, np.uint8),
            ((NUM_ORGANS, len(STATS_COLUMNS)), np.float64),
            ((1,), np.uint8),
        )
        out_sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in out_specs]
        handles: list[tuple[str, Any]] = []
        registered: list[str] = []
        try:
            try:
                for suffix, size in (("in", sum(in_sizes)), ("out", sum(out_sizes))):
                    name = f"{tag}_{suffix}"
                    handles.append((name, shm.create_shared_memory_region(name, "/" + name, size)))
                shm.set_shared_memory_region(handles[0][1], list(in_arrays))
                for (name, _), size in zip(handles, (sum(in_sizes), sum(out_sizes))):
                    self._client.register_system_shared_memory(name, "/" + name, size, client_timeout=10.0)
                    registered.append(name)
            except (shm.SharedMemoryException, OSError, InferenceServerException) as exc:
                if (
                    isinstance(exc, InferenceServerException)
                    and "UNAVAILABLE" in str(exc.status() or "")
                    and "restricted" not in str(exc.message() or "")
                ):
                    raise  # server down: not a shared-memory problem
                raise _ShmSetupError(str(exc)) from None
            inputs = self._inputs()
            inputs[0].set_shape(list(vol.shape))
            offset = 0
            for inp, size in zip(inputs, in_sizes):
                inp.set_shared_memory(handles[0][0], size, offset)
                offset += size
            outputs = []
            offset = 0
            for name, size in zip(OUTPUT_NAMES, out_sizes):
                out = grpcclient.InferRequestedOutput(name)
                out.set_shared_memory(handles[1][0], size, offset)
                outputs.append(out)
                offset += size
            result = self._call(inputs, outputs, carrier)
            arrays: list[npt.NDArray[Any] | None] = []
            offset = 0
            for name, size, (_, dt) in zip(OUTPUT_NAMES, out_sizes, out_specs):
                meta = result.get_output(name)
                if meta is None:
                    arrays.append(None)
                else:
                    shape = [int(d) for d in meta.shape]
                    if int(np.prod(shape)) * np.dtype(dt).itemsize > size:
                        arrays.append(None)
                    else:
                        arrays.append(np.array(shm.get_contents_as_numpy(handles[1][1], dt, shape, offset), copy=True))
                offset += size
            return tuple(arrays)
        finally:
            for name in registered:
                try:
                    self._client.unregister_system_shared_memory(name, client_timeout=10.0)
                except InferenceServerException:
                    pass
            for _, handle in handles:
                try:
                    shm.destroy_shared_memory_region(handle)
                except Exception:  # noqa: BLE001 - best effort unlink
                    pass


class _ShmSetupError(Exception):
    """Creating or registering a shared-memory region failed (caller falls back to gRPC)."""
