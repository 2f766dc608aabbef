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
"""

from __future__ import annotations

import logging
import queue
import secrets
import select
import socket
import threading
from dataclasses import dataclass
from typing import Any

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
from atlasflow.ingest.dicom import DICOM_STATUS, c_store_status
from atlasflow.ingest.reception import C_STORE, Reception

log = logging.getLogger(__name__)

# pynetdicom must not log identifiers (patient data) of requests/responses.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: ACCEPTED_CALLING_AETS entry that accepts any calling AE title.
ANY_CALLING_AET = "*"

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ScpConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "ATLASFLOW"
    # Calling AE titles allowed to associate. Empty: none (deny by default: a hospital lists its
    # modalities and PACS); ("*",): any calling AE (an isolated test bench only).
    accepted_calling_aets: tuple[str, ...] = ()
    max_pdu: int = 0  # 0: unlimited
    max_associations: int = 16
    # ARTIM: how long an accepted TCP connection may wait for its A-ASSOCIATE-RQ (and a
    # release for its answer). pynetdicom does not notice a peer that connects and closes
    # without associating (a TCP health probe): that acceptor holds one of the
    # `max_associations` slots until this timer fires (30 s by pynetdicom's default).
    acse_timeout_s: float = 5.0
    # Reject an A-ASSOCIATE-RQ whose called AE title is not `ae_title` (reason 7, "called AE
    # title not recognised"); off: answer to any called AE title.
    check_called_aet: bool = True


#: Longest idle wait of the reactors once they wake on events (the stock 1 ms polls remain the
#: fallback for anything not wired to a wake-up: timers, a dead peer).
_IDLE_WAIT_S = 0.005
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
#: PDUs up to this size are read into one preallocated buffer (dcmtk sends <= 128 KiB).
_RECV_PREALLOC = 4 * 1024 * 1024


def _recv_exact(sock: socket.socket, nr_bytes: int) -> bytearray:
    """`nr_bytes` from a blocking socket into one buffer (pynetdicom's `recv` appends 4 KiB
    reads to a bytearray: ~130 calls per CT slice). Short only when the peer closed."""
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
            if not dul.to_provider_queue.queue and not dul.event_queue.queue:
                peer = getattr(dul.socket, "socket", None)
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
    assert wrapper is not None  # it holds `sock`
    stock_recv = wrapper.recv
    # A declared PDU length is the peer's word: preallocate only up to _RECV_PREALLOC.
    _replace(wrapper, "recv", lambda n: _recv_exact(sock, n) if n <= _RECV_PREALLOC else stock_recv(n))
    # Closed by `_close_wake` when the connection closes (the closures above form a reference
    # cycle with the association: left to the garbage collector, 2 fds per association would
    # linger until a full collection).
    _replace(assoc, "_atlasflow_wake", (wake_r, wake_w))


def _close_wake(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: close the association's wake-up socketpair. A reactor still waiting on it
    sees an error and falls back to its plain poll until it exits."""
    for sock in getattr(event.assoc, "_atlasflow_wake", ()):
        try:
            sock.close()
        except OSError:
            pass


class StoreScp:
    """Runs the pynetdicom server in its own threads; every C-STORE goes to ``reception``."""

    def __init__(self, config: ScpConfig, reception: Reception) -> None:
        self.config = config
        self.reception = reception
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.maximum_associations = config.max_associations
        self.ae.acse_timeout = config.acse_timeout_s
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
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, _tune_association),
            (evt.EVT_CONN_CLOSE, _close_wake),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, lambda _e: 0x0000),
        ]
        self._server = self.ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)

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
        return self.receive(data)

    def receive(self, data: bytes) -> int:
        """One C-STORE data set (Part-10 bytes) through `Reception`; its DICOM status."""
        try:
            self.reception.receive(data, C_STORE)
        except AtlasflowError as exc:
            return c_store_status(exc)
        except OSError:
            return STATUS_OUT_OF_RESOURCES
        return 0x0000
