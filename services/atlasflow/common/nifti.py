"""NIfTI-1 encoding of (X, Y, Z) arrays with a RAS+ voxel-to-world affine, in memory.

The affine is written to both sform and qform (code 1, scanner) so that every reader,
dcm2niix-style or nibabel, gets the same geometry back.
"""

from __future__ import annotations

import gzip
import io
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt


def to_nifti_bytes(
    array: npt.NDArray[Any], affine: npt.NDArray[np.floating[Any]], *, compress: bool = True, level: int = 1
) -> bytes:
    """Encode `array` (X, Y, Z), RAS `affine` (4, 4) as NIfTI-1; gzip it when `compress`."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw: bytes = img.to_bytes()
    return gzip.compress(raw, compresslevel=level, mtime=0) if compress else raw


def from_nifti_bytes(data: bytes) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Decode NIfTI-1 (gzip or not) into (array in its stored dtype, (4, 4) float64 affine)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    img = nib.Nifti1Image.from_stream(io.BytesIO(data))
    array = np.asarray(img.dataobj)
    return array, np.asarray(img.affine, dtype=np.float64)
