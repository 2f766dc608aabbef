"""Malformed and fuzzed instances against a running ingest service (subprocess), through the
gRPC upload and through C-STORE (pynetdicom SCU sending the raw file bytes undecoded).

Deterministic malformed cases (non-DICOM bytes, truncations, huge declared lengths, wrong VRs)
must be rejected: gRPC INVALID_ARGUMENT with an ErrorInfo (domain atlasflow.ingest), C-STORE a
failure status. Random byte flips of a real file may be rejected or accepted (a flip inside the
pixel data is still a valid image), but never crash, hang (per-call timeouts) or answer with an
internal error; the service still answers afterwards.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from atlasflow.common.clients import sync_channel
from atlasflow.ingest.client import upload_requests
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.testing import peers

REPO = Path(__file__).resolve().parents[2]

N_FLIPS = 40


def _patch_vr(data: bytes, tag: tuple[int, int], vr: bytes) -> bytes:
    key = struct.pack("<HH", *tag)
    i = data.index(key, 132)
    return data[: i + 4] + vr + data[i + 6 :]


def _patch_length(data: bytes, tag: tuple[int, int], long_form: bool) -> bytes:
    key = struct.pack("<HH", *tag)
    i = data.index(key, 132)
    if long_form:  # OB/OW/UN/SQ/UT: 2 reserved bytes, then a 4-byte length
        return data[: i + 8] + struct.pack("<I", 0xFFFFFFF0) + data[i + 12 :]
    return data[: i + 6] + struct.pack("<H", 0xFFFF) + data[i + 8 :]


def malformed_cases(real: bytes) -> dict[str, bytes]:
    rng = random.Random(1234)
    cases: dict[str, bytes] = {
        "empty": b"",
        "text": b"hello, this is not DICOM\n" * 10,
        "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "dicm_only": bytes(128) + b"DICM",
        "preamble_garbage_meta": bytes(128) + b"DICM" + rng.randbytes(300),
    }
    for n in (1, 7, 131, 4096):
        cases[f"random_{n}"] = rng.randbytes(n)
    for frac in (0.01, 0.05, 0.2, 0.5, 0.9, 0.999):
        cases[f"truncated_{frac}"] = real[: int(len(real) * frac)]
    cases["huge_pixel_length"] = _patch_length(real, (0x7FE0, 0x0010), long_form=True)
    cases["huge_modality_length"] = _patch_length(real, (0x0008, 0x0060), long_form=False)
    cases["rows_vr_sq"] = _patch_vr(real, (0x0028, 0x0010), b"SQ")
    cases["rows_vr_un_len"] = _patch_vr(real, (0x0028, 0x0010), b"UN")
    cases["pixel_vr_sq"] = _patch_vr(real, (0x7FE0, 0x0010), b"SQ")
    cases["modality_vr_at"] = _patch_vr(real, (0x0008, 0x0060), b"AT")
    return cases


def flip_cases(real: bytes, header_bytes: int) -> dict[str, bytes]:
    """Random byte flips, most of them inside the header (where they matter)."""
    rng = random.Random(99)
    cases = {}
    for k in range(N_FLIPS):
        buf = bytearray(real)
        for _ in range(rng.choice((1, 4, 16))):
            pos = rng.randrange(132, header_bytes) if rng.random() < 0.8 else rng.randrange(132, len(buf))
            buf[pos] = rng.randrange(256)
        cases[f"flip_{k}"] = bytes(buf)
    return cases


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    real = peers.build_ct_series(root / "series", 1, seed="fuzz")[0].read_bytes()
    with peers.IngestProcess(root / "ingest", env={"SPOOL_SEGMENT_MB": "8"}) as ingest:
        yield ingest, real


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def _upload(stub, data: bytes, name: str):
    path_like = type("P", (), {"read_bytes": lambda self: data, "name": name})()
    return stub.UploadInstances(upload_requests([path_like]), timeout=20)


def test_grpc_upload_rejects_malformed_and_survives_fuzz(service):
    ingest, real = service
    header_bytes = real.index(b"\xe0\x7f\x10\x00")  # start of (7FE0,0010)
    malformed = malformed_cases(real)
    flips = flip_cases(real, header_bytes)
    outcomes: dict[str, str] = {}
    with sync_channel(ingest.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for name, data in {**malformed, **flips}.items():
            try:
                _upload(stub, data, name)
                outcomes[name] = "OK"
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
                info = _error_info(err)
                assert info is not None and info.domain == "atlasflow.ingest", name
                outcomes[name] = info.reason
        for name in malformed:
            assert outcomes[name] != "OK", f"{name} was accepted"
        assert outcomes["empty"] == outcomes["text"] == "NOT_DICOM"
        assert outcomes["truncated_0.5"] == "CORRUPT_DICOM"
        # the service still answers, and a valid instance is still accepted
        assert not _upload(stub, real, "valid").receipts[0].duplicate
        stub.ListSeries(ingest_pb2.ListSeriesRequest(), timeout=10)
    tried = len(malformed) + len(flips)
    print(f"gRPC fuzz: {tried} inputs, {sum(v != 'OK' for v in outcomes.values())} rejected")
    assert tried >= 60


def test_c_store_rejects_malformed_and_survives_fuzz(service, tmp_path):
    ingest, real = service
    header_bytes = real.index(b"\xe0\x7f\x10\x00")
    # C-STORE sends the data set; the File Meta (which carries the transfer syntax) must parse
    # for the SCU to send at all, so the malformations are applied after it. pynetdicom's SCU
    # reads the file with pydicom and re-encodes it: a huge declared pixel length is repaired
    # (the value is re-measured) before it reaches the wire, so that case is gRPC-only.
    cases = {
        k: v
        for k, v in malformed_cases(real).items()
        if k.startswith(
            ("truncated_0.5", "truncated_0.9", "truncated_0.999", "huge_modality", "rows_", "pixel_", "modality_")
        )
    }
    cases.update(flip_cases(real, header_bytes))
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context(Verification)
    results: dict[str, int | str] = {}
    for name, data in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        assoc = ae.associate("127.0.0.1", ingest.dicom_port, ae_title="ATLASFLOW")
        assert assoc.is_established, name
        try:
            status = assoc.send_c_store(path)
            results[name] = int(status.Status) if "Status" in status else "no-response"
        except Exception as exc:  # noqa: BLE001 - the SCU itself may refuse to send garbage
            results[name] = f"scu:{type(exc).__name__}"
        finally:
            if assoc.is_established:
                assoc.release()
    for name, result in results.items():
        if not name.startswith("flip_"):
            assert result != 0, f"{name} was accepted over C-STORE"
        if isinstance(result, int) and result != 0:
            assert result >= 0xA000 or result == 0x0122, (name, hex(result))
    assoc = ae.associate("127.0.0.1", ingest.dicom_port, ae_title="ATLASFLOW")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    print(f"C-STORE fuzz: {len(cases)} inputs, {sum(r != 0 for r in results.values())} rejected")
    assert len(cases) >= 40
