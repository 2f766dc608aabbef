"""A generated large CT instance (one uncompressed slice of a chosen size) for upload tests and
the upload memory benchmark (`benchmarks/bench_upload_memory.py`).

The pixel data is written to the file in 1 MiB blocks, so making a 300 MB instance does not
hold 300 MB in this process either.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from atlasflow.testing.peers import bench_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_large_ct_instance(path: Path, pixel_bytes: int, *, seed: str = "large") -> Path:
    """Write a valid CT Image Storage Part-10 file (Explicit VR Little Endian, 16-bit, one
    square frame of about `pixel_bytes` bytes of pixel data: side = ceil(sqrt(pixel_bytes / 2))).
    UIDs are deterministic per `seed`. Returns `path`."""
    side = max(2, math.ceil(math.sqrt(pixel_bytes / 2)))
    if side > 65535:
        raise ValueError("pixel_bytes too large for one frame")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(bench_uid(seed, "sop"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = bench_uid(seed, "sop")
    ds.StudyInstanceUID = bench_uid(seed, "study")
    ds.SeriesInstanceUID = bench_uid(seed, "series")
    ds.FrameOfReferenceUID = bench_uid(seed, "frame")
    ds.Modality = "CT"
    ds.PatientID = "LARGE"
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.1, 0.1]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.Rows = side
    ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = b""  # placeholder: the header is written by pydicom, the value here
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    n = side * side * 2
    raw = path.read_bytes()
    # the empty (7FE0,0010) OW element ends the file: tag(4) VR(2) reserved(2) length(4)
    tail = b"\xe0\x7f\x10\x00OW\x00\x00" + (0).to_bytes(4, "little")
    if not raw.endswith(tail):
        raise RuntimeError("unexpected encoding of the pixel data element")
    block = (np.arange(1 << 19, dtype=np.uint16) % 4096).astype("<u2").tobytes()  # 1 MiB
    with open(path, "r+b") as f:
        f.seek(len(raw) - 4)
        f.write(n.to_bytes(4, "little"))
        left = n
        while left:
            chunk = block[: min(len(block), left)]
            f.write(chunk)
            left -= len(chunk)
    return path
