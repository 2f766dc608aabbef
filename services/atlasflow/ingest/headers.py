"""Header-only copies of stored DICOM instances (StreamSeriesInstances ``headers_only``)."""

from __future__ import annotations

import io

from pydicom import dcmread

_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}


def dicom_header_bytes(data: bytes) -> bytes:
    """The prefix of a DICOM Part-10 file up to (not including) the top-level (7FE0,0010)
    PixelData element (or (7FE0,0008/0009) Float/Double Float Pixel Data): File Meta plus every
    attribute before the pixel data, itself a readable Part-10 file. The whole file when it
    has no pixel data or uses a deflated transfer syntax (no byte offset to cut at)."""
    fp = io.BytesIO(data)
    ds = dcmread(fp, stop_before_pixels=True)
    if str(ds.file_meta.get("TransferSyntaxUID", "")) in _DEFLATED:
        return data
    offset = fp.tell()  # pydicom rewinds to the start of the pixel data element
    if offset >= len(data) or data[offset : offset + 2] not in (b"\xe0\x7f", b"\x7f\xe0"):
        return data
    return data[:offset]
