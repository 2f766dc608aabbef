"""The SCP's event-driven reactors (`atlasflow.ingest.scp._tune_association`), in-process:
each association's wake-up socketpair is closed with its connection (no fd leak even with the
garbage collector off), and C-ECHO / C-STORE still complete over many associations."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.metrics import Metrics
from atlasflow.ingest.reception import Reception
from atlasflow.ingest.scp import ScpConfig, StoreScp
from atlasflow.ingest.store import IngestStore
from atlasflow.testing.data import TEST_DATA

CT_SLICE = TEST_DATA / "pydicom_ct_singles" / "pydicom" / "CT_small.dcm"


def _nodelay(event: evt.Event) -> None:
    import socket

    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture()
def scp(tmp_path: Path):
    store = IngestStore(
        tmp_path / "data", LocalBlobStore(tmp_path / "blobs"), spool_segment_bytes=1 << 20, spool_spares=1
    )
    server = StoreScp(
        ScpConfig(port=0, max_associations=4, accepted_calling_aets=("TESTSCU",)),
        Reception(store, Metrics("ingest-scp-test")),
    )
    server.start()
    yield server
    server.stop()


def test_wakeup_sockets_closed_with_each_association(scp):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    gc.collect()
    gc.disable()
    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="ATLASFLOW")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        time.sleep(0.2)
        before = _open_fds()
        for _ in range(25):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="ATLASFLOW")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        deadline = time.monotonic() + 5
        while _open_fds() - before > 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        # without the explicit close: +2 fds per association (50 here)
        assert _open_fds() - before <= 4
    finally:
        gc.enable()


def test_store_stream_over_event_driven_reactors(scp):
    ds = pydicom.dcmread(CT_SLICE)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ATLASFLOW", evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established
    t0 = time.perf_counter()
    statuses = []
    for i in range(40):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.543.{i + 1}"
        ds.InstanceNumber = i + 1
        statuses.append(assoc.send_c_store(ds).Status)
    elapsed = time.perf_counter() - t0
    assoc.release()
    assert statuses == [0x0000] * 40
    print(f"40 C-STOREs on one association: {elapsed:.3f} s")
