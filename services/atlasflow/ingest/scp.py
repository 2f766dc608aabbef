"""DICOM C-STORE / C-ECHO service class provider (pynetdicom), feeding `Reception`.

Success (0x0000) is returned only after the instance is durable (`Reception.receive`, the path
the gRPC upload takes too). Bad input gets a specific failure status (see
`atlasflow.ingest.dicom.DICOM_STATUS`) and a log line with the reason, never with patient data;
a write that fails for lack of resources gets 0xA700 Out of Resources. TCP_NODELAY is set on every accepted socket: without it, loopback transfers
are bound by Nagle + delayed ACK (~46 ms per instance, DESIGN.md).

Throughput (issue 3: at least Orthanc's rate for a 300-slice series from storescu): each
association's pynetdicom threads wake on events instead of 1 ms polls and read PDUs into one
buffer (`_tune_association`); pixel data is checked without a copy for native transfer
syntaxes; the content key of an instance is computed only when its SOP Instance UID is
already stored (`IngestStore.store_instance`); one flush per instance (the spool record).

Limits (issue 13, docs/security.md "DICOM"; defaults on `ScpConfig`): pynetdicom counts every
acceptor thread against ``maximum_associations``, including TCP connections that never send an
A-ASSOCIATE-RQ, so 16 idle connections used to block every new association until their ARTIM
expired. Here (`_LimitedServer`, `_Connections`) a connection is *pending* until its
A-ASSOCIATE-RQ arrives and is counted as an association only from then on:

- associations: at most ``max_associations`` in all and ``max_associations_per_peer`` per
  source IP address; one more gets A-ASSOCIATE-RJ rejected-transient, service-provider
  (presentation), "local limit exceeded" (PS3.8 9.3.4), and the metric event
  ``dicom_associations_rejected_total_limit`` / ``..._peer_limit``;
- pending connections (TCP accepted, TLS handshake, waiting for the A-ASSOCIATE-RQ): at most
  ``max_associations_per_peer`` per source address and ``max_associations`` in all; one more
  closes the *oldest* pending connection (of that peer, else of all; event
  ``dicom_pending_connections_closed``), so idle sockets can never lock a sender out; each also
  ends when the ACSE timeout (ARTIM) expires;
- PDUs: ``max_pdu`` is the Maximum Length announced (PS3.8 D.1); a P-DATA-TF longer than that,
  or any other PDU longer than 1 MiB, is answered with A-ABORT (provider, invalid PDU parameter
  value) before its body is read (event ``dicom_pdu_too_long``);
- idle: a connection silent for ``idle_timeout_s`` (no PDU, or a PDU stalled mid-way) is
  aborted (pynetdicom's network timeout + a socket timeout on every read);
- DIMSE: a message (command + data set) still incomplete ``dimse_timeout_s`` after its first
  fragment is aborted when its next fragment arrives (event ``dicom_dimse_timeouts``).

TLS (PS3.15 Annex B, the BCP 195 profiles): with ``tls_cert_file`` and ``tls_key_file`` set, a
second listener on ``tls_port`` speaks only TLS (1.2 or later); with ``tls_ca_file`` set too,
the peer must present a certificate of that CA (mutual TLS). The handshake runs on the
connection's own thread within the ACSE timeout (pynetdicom would run it on the accept loop,
where one silent peer blocks every other). The files are re-read when they change (a renewed
certificate is used by new connections); a pair that does not load keeps the previous one.

Audit (docs/security.md "Audit"; `atlasflow.ingest.scp_audit`): with an `ScpAudit`, every
association leaves one record in the service's common audit log when its connection closes
(calling AE, peer, TLS client certificate subject, outcome, instances stored, the study and
series UIDs seen); rejected ones go through the refusal throttle. An association is refused
(rejected-transient, temporary congestion) while the log cannot be read: fail closed.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # SOP classes are generated at import time
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from atlasflow.common.errors import AtlasflowError
from atlasflow.common.metrics import Metrics
from atlasflow.ingest.dicom import DICOM_STATUS, c_store_status
from atlasflow.ingest.reception import C_STORE, Reception
from atlasflow.ingest.scp_audit import AssociationAudit, ScpAudit

if TYPE_CHECKING:
    from atlasflow.ingest.settings import IngestSettings

log = logging.getLogger(__name__)

# pynetdicom must not log identifiers (patient data) of requests/responses.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: ACCEPTED_CALLING_AETS entry that accepts any calling AE title.
ANY_CALLING_AET = "*"

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

#: bounds of ``max_pdu`` (bytes): dcmtk's own minimum and a size one read may preallocate
MIN_PDU = 4096
MAX_PDU = 16 * 1024 * 1024
#: longest PDU other than P-DATA-TF (A-ASSOCIATE-RQ with user identity, release, abort)
_MAX_CONTROL_PDU = 1024 * 1024
_P_DATA_TF = 0x04
#: A-ABORT PDU (PS3.8 9.3.8), source 2 (service provider), reason 6 / 0
_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
_ABORT_NO_REASON = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])


@dataclass(frozen=True)
class ScpConfig:
    """The SCP's listeners and limits. The defaults are what the service ships with
    (docs/security.md "DICOM" gives the reasons)."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "ATLASFLOW"
    # Calling AE titles allowed to associate. Empty: none (deny by default: a hospital lists its
    # modalities and PACS); ("*",): any calling AE (an isolated test bench only).
    accepted_calling_aets: tuple[str, ...] = ()
    # Maximum Length of P-DATA-TF PDUs announced and accepted, bytes (MIN_PDU..MAX_PDU). 128 KiB
    # is the largest that dcmtk sends (fewer PDUs per slice than its 16 KiB default).
    max_pdu: int = 128 * 1024
    # Associations at once, in all and per source IP address.
    max_associations: int = 16
    max_associations_per_peer: int = 8
    # ARTIM: how long an accepted TCP connection may take for its TLS handshake and its
    # A-ASSOCIATE-RQ (and a release for its answer).
    acse_timeout_s: float = 10.0
    # Reject an A-ASSOCIATE-RQ whose called AE title is not `ae_title` (reason 7, "called AE
    # title not recognised"); off: answer to any called AE title.
    check_called_aet: bool = True
    # An association (or a PDU) with no data for this long is aborted.
    idle_timeout_s: float = 60.0
    # A DIMSE message still incomplete this long after its first fragment is aborted.
    dimse_timeout_s: float = 120.0
    # Plain DIMSE on `port`; off: TLS only.
    plaintext: bool = True
    # DICOM TLS: certificate chain and key (PEM) of this SCP; both set: a TLS listener on
    # `tls_port` (2762: IANA's dicom-tls). `tls_ca_file` set: client certificates of that CA
    # are required.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_port: int = 2762

    def __post_init__(self) -> None:
        problems = []
        if not MIN_PDU <= self.max_pdu <= MAX_PDU:
            problems.append(f"max_pdu must be {MIN_PDU}..{MAX_PDU} bytes")
        if self.max_associations < 1 or self.max_associations_per_peer < 1:
            problems.append("max_associations and max_associations_per_peer must be >= 1")
        if min(self.acse_timeout_s, self.idle_timeout_s, self.dimse_timeout_s) <= 0:
            problems.append("DICOM timeouts must be > 0")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("DICOM TLS needs both the certificate and the key file")
        if self.tls_ca_file and not self.tls_cert_file:
            problems.append("DICOM_TLS_CA_FILE needs DICOM_TLS_CERT_FILE and DICOM_TLS_KEY_FILE")
        if not self.plaintext and not self.tls_enabled:
            problems.append("DICOM_PLAINTEXT off needs DICOM TLS")
        if problems:
            raise ValueError("invalid DICOM settings: " + "; ".join(problems))

    @property
    def peer_limit(self) -> int:
        """Associations (and pending connections) per source address: never above the total."""
        return min(self.max_associations_per_peer, self.max_associations)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @classmethod
    def from_settings(cls, s: IngestSettings) -> ScpConfig:
        return cls(
            host=s.dicom_host,
            port=s.dicom_port,
            ae_title=s.ae_title,
            accepted_calling_aets=s.accepted_calling_aets,
            max_pdu=s.max_pdu,
            max_associations=s.max_associations,
            max_associations_per_peer=s.max_associations_per_peer,
            acse_timeout_s=s.acse_timeout_s,
            check_called_aet=s.check_called_aet,
            idle_timeout_s=s.dicom_idle_timeout_s,
            dimse_timeout_s=s.dimse_timeout_s,
            plaintext=s.dicom_plaintext,
            tls_cert_file=s.dicom_tls_cert_file,
            tls_key_file=s.dicom_tls_key_file,
            tls_ca_file=s.dicom_tls_ca_file,
            tls_port=s.dicom_tls_port,
        )


#: Longest idle wait of the reactors once they wake on events (the stock 1 ms polls remain the
#: fallback for anything not wired to a wake-up: timers, a dead peer).
_IDLE_WAIT_S = 0.005
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _recv_exact(sock: socket.socket, nr_bytes: int) -> bytearray:
    """`nr_bytes` from a blocking socket into one buffer (pynetdicom's `recv` appends 4 KiB
    reads to a bytearray: ~130 calls per CT slice). Short only when the peer closed; a peer
    silent for the socket's timeout (``idle_timeout_s``) raises TimeoutError."""
    buf = bytearray(nr_bytes)
    view, got = memoryview(buf), 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    return buf


def _replace(obj: object, name: str, value: object) -> None:
    """Replace one attribute of a pynetdicom object (a method, a queue's put): pynetdicom has no
    hook for its reactors' waits, so `_tune_association` patches them per association."""
    setattr(obj, name, value)


def _tune_association(event: evt.Event) -> None:
    """EVT_CONN_OPEN (before the association's threads start): TCP_NODELAY, and reactors that
    wake on events instead of polling.

    pynetdicom 3 (DESIGN.md): the DUL thread sleeps 1 ms whenever it finds nothing to do, and
    the association thread sleeps 1 ms before each look for a complete DIMSE message; on a
    C-STORE stream from one peer that adds ~1-2 ms per instance (the response waits for the
    DUL to wake, the next request for the DUL, the message for the association thread). Here,
    per association: every put on the DUL's queues (a response to send, an event, a
    primitive for the user) also writes a byte to a socketpair; the DUL waits in `select` on
    the peer's socket and that socketpair (at most `_IDLE_WAIT_S`), the association thread on
    a `threading.Event` set by every put onto its message queues. Each thread still runs its
    own checks (timers, release, abort) at least every `_IDLE_WAIT_S`. The state machines are
    untouched: only the waits change.
    """
    assoc = event.assoc
    dul = assoc.dul
    wrapper = getattr(dul, "socket", None)
    sock = getattr(wrapper, "socket", None)
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    ready = threading.Event()
    dul_waiting = [False]  # the DUL is (about to be) in select: a put must write a wake byte

    def wake() -> None:
        ready.set()
        if dul_waiting[0]:
            try:
                wake_w.send(b"\0")
            except OSError:  # buffer full (a wake-up is pending anyway) or closed
                pass

    def waking(q: queue.Queue[Any]) -> None:
        put = q.put

        def put_and_wake(item: object, *args: Any, **kwargs: Any) -> None:
            put(item, *args, **kwargs)
            wake()

        _replace(q, "put", put_and_wake)

    for q in (dul.to_provider_queue, dul.to_user_queue, dul.event_queue, assoc.dimse.msg_queue):
        waking(q)

    process_recv_primitive = dul._process_recv_primitive

    def wait_then_process() -> bool:
        # Called first in every DUL loop: idle (nothing to send, no event) -> wait for data.
        # The flag is raised before the queues are checked and a put checks it after its item
        # is queued: either this thread sees the item or the putter sees the flag.
        dul_waiting[0] = True
        try:
            peer = getattr(dul.socket, "socket", None)
            # TLS: bytes already decrypted (pending) are invisible to select
            tls_pending = isinstance(peer, ssl.SSLSocket) and peer.pending() > 0
            if not dul.to_provider_queue.queue and not dul.event_queue.queue and not tls_pending:
                try:
                    readable, _, _ = select.select([wake_r] if peer is None else [peer, wake_r], [], [], _IDLE_WAIT_S)
                    if wake_r in readable:
                        wake_r.recv(4096)
                except (OSError, ValueError):  # peer socket closed meanwhile: plain poll
                    pass
        finally:
            dul_waiting[0] = False
        return bool(process_recv_primitive())

    _replace(dul, "_process_recv_primitive", wait_then_process)
    dul._run_loop_delay = 0  # the wait above replaces the reactor's sleep

    get_msg = assoc.dimse.get_msg

    def get_msg_waiting(block: bool = False) -> Any:
        # The association reactor's look for a complete message: wait (bounded) for a put
        # onto the message queue or the DUL's user queue (release, abort) instead of polling.
        if not block and not assoc.dimse.msg_queue.queue and not dul.to_user_queue.queue:
            ready.wait(_IDLE_WAIT_S)
            ready.clear()
        return get_msg(block)

    _replace(assoc.dimse, "get_msg", get_msg_waiting)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # pynetdicom's standard handlers format a summary of every PDU and DIMSE message for
        # its INFO/DEBUG log lines, whether or not they are emitted (~0.1 ms per instance).
        for event_type, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event_type, handler)
    # Closed by `_close_wake` when the connection closes (the closures above form a reference
    # cycle with the association: left to the garbage collector, 2 fds per association would
    # linger until a full collection).
    _replace(assoc, "_atlasflow_wake", (wake_r, wake_w))


def _ae_text(title: str | bytes) -> str:
    """An AE title as text (pynetdicom 3 gives str; older ones bytes), trimmed."""
    text = title.decode("ascii", errors="replace") if isinstance(title, bytes) else str(title)
    return text.strip()[:16]


_DN_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def _tls_subject(sock: socket.socket) -> str:
    """The verified TLS client certificate's subject (``CN=modality,O=Hospital``), '' without one
    (plain DIMSE, or TLS without a client CA: an unverified certificate is not read)."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    try:
        cert = sock.getpeercert()
    except (OSError, ValueError):
        return ""
    subject: Any = (cert or {}).get("subject", ())  # ((("commonName", "x"),), ...)
    return ",".join(f"{_DN_SHORT.get(str(k), str(k))}={v}" for rdn in subject for k, v in rdn)


def _close_wake(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: close the association's wake-up socketpair. A reactor still waiting on it
    sees an error and falls back to its plain poll until it exits."""
    for sock in getattr(event.assoc, "_atlasflow_wake", ()):
        try:
            sock.close()
        except OSError:
            pass


class _TlsFiles:
    """The TLS listener's SSLContext, rebuilt when a file changed (inode, mtime, size): a
    renewed certificate (cert-manager, a Secret update) is used by the next connection. A
    pair that does not load keeps the previous context (warning)."""

    def __init__(self, config: ScpConfig) -> None:
        self.paths = [p for p in (config.tls_cert_file, config.tls_key_file, config.tls_ca_file) if p]
        self.config = config
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._context = self._build()  # start-up: a bad file is an error
        self._stamp = self._stamps()

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.paths:
            st = os.stat(p)  # follows symlinks: a Secret update swaps the ..data link
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
        ctx.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        if self.config.tls_ca_file:
            ctx.load_verify_locations(cafile=self.config.tls_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp != self._stamp:
                    self._context = self._build()
                    self._stamp = stamp
                    log.info("DICOM TLS: certificate files reloaded")
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("DICOM TLS: certificate files not reloaded, keeping the previous ones: %s", exc)
            return self._context


@dataclass(eq=False)
class _Conn:
    """One accepted TCP connection; `associated` from its A-ASSOCIATE-RQ on."""

    ip: str
    sock: socket.socket
    since: float = field(default_factory=time.monotonic)
    assoc: Any = None
    associated: bool = False
    done: bool = False

    def alive(self) -> bool:
        if self.done:
            return False
        a = self.assoc
        return a is None or a.ident is None or a.is_alive()  # not yet started, or running


class _Connections:
    """The connections of all the SCP's listeners, by source address (see the module doc)."""

    def __init__(self, config: ScpConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []

    def _live(self) -> list[_Conn]:
        self._conns = [c for c in self._conns if c.alive()]
        return self._conns

    def accepted(self, ip: str, sock: socket.socket) -> _Conn:
        """A new TCP connection: counted as pending; the oldest pending one is closed when
        its peer (or all peers) would be over the limit."""
        conn = _Conn(ip, sock)
        evict: list[_Conn] = []
        with self._lock:
            live = self._live()
            live.append(conn)
            pending = [c for c in live if not c.associated]
            mine = [c for c in pending if c.ip == ip]
            if len(mine) > self.config.peer_limit:
                evict.append(mine[0])
            elif len(pending) > self.config.max_associations:
                evict.append(pending[0])
            for c in evict:
                c.done = True
        for c in evict:
            self.metrics.count("dicom_pending_connections_closed")
            log.warning(
                "DICOM: closed a connection that sent no A-ASSOCIATE-RQ (too many pending)",
                extra={"fields": {"peer": c.ip, "age_s": round(time.monotonic() - c.since, 3)}},
            )
            _shutdown(c.sock)
            if c.assoc is not None:
                # the association thread waits for its A-ASSOCIATE-RQ until the ACSE timeout:
                # None is what that wait returns on timeout (it then ends the association)
                c.assoc.dul.to_user_queue.put(None)
        return conn

    def requested(self, conn: _Conn) -> str | None:
        """An A-ASSOCIATE-RQ on `conn`: None (counted from now on) or the limit it exceeds."""
        with self._lock:
            if conn.done:
                return "closed"
            others = [c for c in self._live() if c.associated and c is not conn]
            if len(others) >= self.config.max_associations:
                return "total_limit"
            if sum(c.ip == conn.ip for c in others) >= self.config.peer_limit:
                return "peer_limit"
            conn.associated = True
            return None

    def closed(self, conn: _Conn) -> None:
        with self._lock:
            conn.done = True


def _shutdown(sock: socket.socket) -> None:
    """Ends the connection under its owner thread (which then sees EOF and closes it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _PduGuard:
    """Reads PDUs for pynetdicom's DUL (`AssociationSocket.recv`): checks each declared length
    before reading the body (P-DATA-TF <= max_pdu, others <= 1 MiB) and the time since the
    first fragment of the DIMSE message in progress; either over -> A-ABORT, connection shut.
    pynetdicom reads a PDU as recv(6) (type, reserved, length) then recv(length)."""

    def __init__(self, sock: socket.socket, config: ScpConfig, metrics: Metrics, ip: str) -> None:
        self.sock = sock
        self.config = config
        self.metrics = metrics
        self.ip = ip
        self._next: tuple[int, int] | None = None
        self.message_started: float | None = None  # first fragment of the message in progress

    def recv(self, nr_bytes: int) -> bytearray:
        declared, self._next = self._next, None
        if declared is not None and declared[1] == nr_bytes:
            refusal = self._check(*declared)
            if refusal is not None:
                return self._refuse(*refusal)
        data = _recv_exact(self.sock, nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            self._next = (pdu_type, length)
        return data

    def _check(self, pdu_type: int, length: int) -> tuple[str, bytes, dict[str, Any]] | None:
        if pdu_type != _P_DATA_TF:
            if length > _MAX_CONTROL_PDU:
                return "dicom_pdu_too_long", _ABORT_INVALID_PARAMETER, {"pdu_type": pdu_type, "length": length}
            return None
        if length > self.config.max_pdu:
            return "dicom_pdu_too_long", _ABORT_INVALID_PARAMETER, {"length": length, "max_pdu": self.config.max_pdu}
        now = time.monotonic()
        if self.message_started is None:
            self.message_started = now
        elif now - self.message_started > self.config.dimse_timeout_s:
            return "dicom_dimse_timeouts", _ABORT_NO_REASON, {"dimse_timeout_s": self.config.dimse_timeout_s}
        return None

    def _refuse(self, event: str, abort: bytes, fields: dict[str, Any]) -> bytearray:
        # The DUL thread is the only writer of this socket: the A-ABORT goes out directly, then
        # a short read makes pynetdicom end the association (transport closed, Evt17).
        self.metrics.count(event)
        log.warning("DICOM: association aborted (%s)", event, extra={"fields": {"peer": self.ip, **fields}})
        try:
            self.sock.sendall(abort)
        except OSError:
            pass
        _shutdown(self.sock)
        return bytearray()

    def message_complete(self) -> None:
        self.message_started = None


_current_conn = threading.local()


class _LimitedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection accounting (`_Connections`) and a TLS
    handshake on the connection's own thread (`tls` set: TLS only on this listener)."""

    connections: _Connections
    tls: _TlsFiles | None
    metrics: Metrics

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()  # the TLS handshake: process_request_thread
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        conn = self.connections.accepted(str(client_address[0]), request)
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address, conn), name="DicomConnection", daemon=True
        )
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any, conn: _Conn) -> None:
        sock = request
        try:
            if self.tls is not None:
                request.settimeout(self.connections.config.acse_timeout_s)
                try:
                    sock = self.tls.context().wrap_socket(request, server_side=True)
                except (OSError, ValueError) as exc:
                    self.metrics.count("dicom_tls_handshakes_failed")
                    log.warning(
                        "DICOM TLS: handshake failed",
                        extra={"fields": {"peer": conn.ip, "reason": type(exc).__name__, "detail": str(exc)[:200]}},
                    )
                    self.connections.closed(conn)
                    self.shutdown_request(request)
                    return
                conn.sock = sock
                if conn.done:  # closed as the oldest pending connection meanwhile
                    self.shutdown_request(sock)
                    return
            _current_conn.conn = conn
            try:
                self.finish_request(sock, client_address)  # creates and starts the Association
            finally:
                _current_conn.conn = None
        except Exception:
            self.connections.closed(conn)
            self.handle_error(sock, client_address)
            self.shutdown_request(sock)


class StoreScp:
    """Runs the pynetdicom server(s) in their own threads; every C-STORE goes to ``reception``."""

    def __init__(self, config: ScpConfig, reception: Reception, audit: ScpAudit | None = None) -> None:
        self.config = config
        self.reception = reception
        #: the association records (`atlasflow.ingest.scp_audit`); None: not audited (tests)
        self.audit = audit
        self.metrics = reception.metrics
        self.connections = _Connections(config, self.metrics)
        self.tls = _TlsFiles(config) if config.tls_enabled else None
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        # pynetdicom's own count includes pending connections (and closed ones whose threads
        # are still ending): ours (`_Connections`) decides
        self.ae.maximum_associations = 1 << 20
        self.ae.acse_timeout = config.acse_timeout_s
        self.ae.network_timeout = config.idle_timeout_s
        self.ae.dimse_timeout = config.dimse_timeout_s
        self.ae.require_called_aet = config.check_called_aet
        if ANY_CALLING_AET in config.accepted_calling_aets:
            log.warning("DICOM: accepting any calling AE title (ACCEPTED_CALLING_AETS=*)")
        elif config.accepted_calling_aets:
            self.ae.require_calling_aet = list(config.accepted_calling_aets)
        else:
            # No AE accepted. pynetdicom reads an empty list as "any", so require one random,
            # unguessable title: every peer gets A-ASSOCIATE-RJ "calling AE title not recognised".
            log.warning("DICOM: no calling AE title accepted; set ACCEPTED_CALLING_AETS to your modalities/PACS")
            self.ae.require_calling_aet = [secrets.token_hex(8).upper()]
        for sop in (CTImageStorage, EnhancedCTImageStorage):
            self.ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server: _LimitedServer | None = None
        self._tls_server: _LimitedServer | None = None

    @property
    def port(self) -> int:
        """The plaintext listener's port (0: none, TLS only)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (0: none)."""
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else 0

    def start(self) -> None:
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, lambda _e: 0x0000),
        ]
        if self.config.plaintext:
            self._server = self._start_server(self.config.port, None, handlers)
        if self.tls is not None:
            self._tls_server = self._start_server(self.config.tls_port, self.tls, handlers)

    def _start_server(self, port: int, tls: _TlsFiles | None, handlers: list[EventHandlerType]) -> _LimitedServer:
        server = cast(
            _LimitedServer,
            self.ae.make_server((self.config.host, port), evt_handlers=handlers, server_class=_LimitedServer),
        )
        server.connections, server.tls, server.metrics = self.connections, tls, self.metrics
        thread = threading.Thread(target=server.serve_forever, name="DicomAcceptor", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        return server

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    def _on_conn_open(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN (the connection's thread, before the association's threads start)."""
        conn: _Conn | None = getattr(_current_conn, "conn", None)
        _tune_association(event)
        assoc = event.assoc
        wrapper = assoc.dul.socket
        sock = getattr(wrapper, "socket", None)
        if wrapper is None or sock is None:
            return
        # every read waits at most the idle timeout (a PDU stalled half-way included)
        sock.settimeout(self.config.idle_timeout_s)
        ip = conn.ip if conn is not None else str(assoc.requestor.address)
        guard = _PduGuard(sock, self.config, self.metrics, ip)
        _replace(wrapper, "recv", guard.recv)
        msg_put = assoc.dimse.msg_queue.put

        def put_message(item: Any, *args: Any, **kwargs: Any) -> None:
            guard.message_complete()
            msg_put(item, *args, **kwargs)

        _replace(assoc.dimse.msg_queue, "put", put_message)
        if conn is not None:
            conn.assoc = assoc
            _replace(assoc, "_atlasflow_conn", conn)
        port = getattr(assoc.requestor, "port", 0)
        peer = f"ipv6:[{ip}]:{port}" if ":" in ip else f"ipv4:{ip}:{port}"
        _replace(assoc, "_atlasflow_audit", AssociationAudit(peer, client_identity=_tls_subject(sock)))

    def _on_conn_close(self, event: evt.Event) -> None:
        _close_wake(event)
        conn = getattr(event.assoc, "_atlasflow_conn", None)
        if conn is not None:
            self.connections.closed(conn)
        audited: AssociationAudit | None = getattr(event.assoc, "_atlasflow_audit", None)
        if self.audit is not None and audited is not None:
            _replace(event.assoc, "_atlasflow_audit", None)  # one record per association
            if audited.requested and not (audited.accepted or audited.rejected or audited.aborted):
                # The DUL thread closes the connection as soon as the peer has the A-ASSOCIATE-RJ
                # and drops it; the association thread triggers EVT_REJECTED only after its send,
                # so under load this close comes first: the rejection was recorded as OK.
                audited.rejected = self._rejection_of(audited)
            self.audit.ended(audited)

    def _on_accepted(self, event: evt.Event) -> None:
        audited: AssociationAudit | None = getattr(event.assoc, "_atlasflow_audit", None)
        if audited is not None:
            audited.accepted = True

    def _on_rejected(self, event: evt.Event) -> None:
        """EVT_REJECTED: why (pynetdicom does not say: the same checks, in its order)."""
        audited: AssociationAudit | None = getattr(event.assoc, "_atlasflow_audit", None)
        if audited is None or audited.rejected:
            return
        audited.rejected = self._rejection_of(audited) or "other"

    def _rejection_of(self, audited: AssociationAudit) -> str:
        """Why pynetdicom rejects this A-ASSOCIATE-RQ (a key of `REJECTIONS`), '' if it would not."""
        ae = self.ae
        allowed = [t.strip() for t in ae.require_calling_aet]
        if ae.require_calling_aet and audited.calling_ae not in allowed:
            return "calling_ae"
        if ae.require_called_aet and audited.called_ae != self.config.ae_title.strip():
            return "called_ae"
        return ""

    def _on_aborted(self, event: evt.Event) -> None:
        audited: AssociationAudit | None = getattr(event.assoc, "_atlasflow_audit", None)
        if audited is not None:
            audited.aborted = True

    def _on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED (A-ASSOCIATE-RQ received, before negotiation): the association limits,
        and the audit log (an association is refused while it cannot be read)."""
        assoc = event.assoc
        audited: AssociationAudit | None = getattr(assoc, "_atlasflow_audit", None)
        rq = getattr(assoc.requestor, "primitive", None)
        if audited is not None:
            audited.requested = True
            if rq is not None:
                audited.calling_ae = _ae_text(rq.calling_ae_title)
                audited.called_ae = _ae_text(rq.called_ae_title)
        conn = getattr(assoc, "_atlasflow_conn", None)
        if conn is None:
            return
        over = self.connections.requested(conn)
        if over is None and self.audit is not None and not self.audit.writable():
            log.error("DICOM: association refused, the audit log cannot be read", extra={"fields": {"peer": conn.ip}})
            self.metrics.count("dicom_associations_rejected_audit_unavailable")
            if audited is not None:
                audited.rejected = "audit_unavailable"
            # rejected-transient (2), service-provider presentation related (3), temporary congestion (1)
            assoc.acse.send_reject(0x02, 0x03, 0x01)
            assoc.is_rejected = True
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        if over is None:
            return
        if audited is not None:
            audited.rejected = over
        self.metrics.count(f"dicom_associations_rejected_{over}")
        log.warning(
            "DICOM: association rejected, local limit exceeded",
            extra={
                "fields": {
                    "peer": conn.ip,
                    "limit": over,
                    "max_associations": self.config.max_associations,
                    "max_associations_per_peer": self.config.max_associations_per_peer,
                }
            },
        )
        # rejected-transient (2), service-provider presentation related (3), local limit (2)
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _handle_store(self, event: evt.Event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001
            log.warning("c-store rejected", extra={"fields": {"reason": "CORRUPT_DICOM"}})
            status = DICOM_STATUS.get("CORRUPT_DICOM", STATUS_CANNOT_UNDERSTAND)
        else:
            status = self.receive(data, getattr(event.assoc, "_atlasflow_audit", None))
        return status

    def receive(self, data: bytes, audited: AssociationAudit | None = None) -> int:
        """One C-STORE data set (Part-10 bytes) through `Reception`; its DICOM status. The
        association's audit (``audited``) counts it."""
        try:
            stored = self.reception.receive(data, C_STORE)
        except AtlasflowError as exc:
            status = c_store_status(exc)
        except OSError:
            status = STATUS_OUT_OF_RESOURCES
        else:
            if audited is not None:
                audited.instance_stored(stored.study_uid, stored.series_uid, stored.case_id, stored.series_id)
            return 0x0000
        if audited is not None:
            audited.refused += 1
        return status
