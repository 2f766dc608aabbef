"""NIfTI-1 writing without nibabel: header (`nifti_header`) and streamed, optionally gzipped data
(`write_nifti`).

The RAS+ affine goes into sform and qform (code 1); the data is streamed from the volume's own
buffer (no copy); ``.nii.gz`` uses ISA-L (PyPI ``isal``) level 1 when installed, else zlib
level 1, in chunks.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    pass


_HEADER = struct.Struct("<i10s18sihbb8h3f4h8f3fhbb4f2i80s24s2h6f4f4f4f16s4s")
_DATATYPE = {
    np.dtype(np.int16): (4, 16),
    np.dtype(np.int32): (8, 32),
    np.dtype(np.float32): (16, 32),
    np.dtype(np.uint8): (2, 8),
}


def _quaternion(affine: npt.NDArray[Any]) -> tuple[float, float, float, float, float, float, float]:
    """(b, c, d, qx, qy, qz, qfac) of an affine with orthogonal columns (nifti1_io.c)."""
    m = np.asarray(affine[:3, :3], dtype=np.float64)
    zooms = np.linalg.norm(m, axis=0)
    r = m / zooms
    qfac = 1.0
    if np.linalg.det(r) < 0:
        r[:, 2] = -r[:, 2]
        qfac = -1.0
    a = 1.0 + r[0, 0] + r[1, 1] + r[2, 2]
    if a > 0.5:
        a = 0.5 * np.sqrt(a)
        b = 0.25 * (r[2, 1] - r[1, 2]) / a
        c = 0.25 * (r[0, 2] - r[2, 0]) / a
        d = 0.25 * (r[1, 0] - r[0, 1]) / a
    else:
        xd = 1.0 + r[0, 0] - (r[1, 1] + r[2, 2])
        yd = 1.0 + r[1, 1] - (r[0, 0] + r[2, 2])
        zd = 1.0 + r[2, 2] - (r[0, 0] + r[1, 1])
        if xd > 1.0:
            b = 0.5 * np.sqrt(xd)
            c = 0.25 * (r[0, 1] + r[1, 0]) / b
            d = 0.25 * (r[0, 2] + r[2, 0]) / b
            a = 0.25 * (r[2, 1] - r[1, 2]) / b
        elif yd > 1.0:
            c = 0.5 * np.sqrt(yd)
            b = 0.25 * (r[0, 1] + r[1, 0]) / c
            d = 0.25 * (r[1, 2] + r[2, 1]) / c
            a = 0.25 * (r[0, 2] - r[2, 0]) / c
        else:
            d = 0.5 * np.sqrt(zd)
            b = 0.25 * (r[0, 2] + r[2, 0]) / d
            c = 0.25 * (r[1, 2] + r[2, 1]) / d
            a = 0.25 * (r[1, 0] - r[0, 1]) / d
        if a < 0:
            b, c, d = -b, -c, -d
    return (float(b), float(c), float(d), float(affine[0, 3]), float(affine[1, 3]), float(affine[2, 3]), qfac)


def nifti_header(shape: tuple[int, ...], dtype: np.dtype[Any], affine: npt.NDArray[Any]) -> bytes:
    """NIfTI-1 single-file header + empty extension flag (352 bytes); affine RAS+ (4, 4),
    written to sform and qform (code 1, scanner), units mm/s, no scaling."""
    code, bitpix = _DATATYPE[np.dtype(dtype)]
    b, c, d, qx, qy, qz, qfac = _quaternion(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    dim = [len(shape), *shape] + [1] * (7 - len(shape))
    pixdim = [qfac, *zooms.tolist()] + [1.0] * (7 - 3)
    header = _HEADER.pack(
        348,
        b"",
        b"",
        0,
        0,
        ord("r"),
        0,
        *dim,
        0.0,
        0.0,
        0.0,
        0,
        code,
        bitpix,
        0,
        *pixdim,
        352.0,
        1.0,
        0.0,
        0,
        0,
        2 | 8,
        0.0,
        0.0,
        0.0,
        0.0,
        0,
        0,
        b"atlasflow convert",
        b"",
        1,
        1,
        b,
        c,
        d,
        qx,
        qy,
        qz,
        *affine[0, :4].tolist(),
        *affine[1, :4].tolist(),
        *affine[2, :4].tolist(),
        b"",
        b"n+1\x00",
    )
    return header + b"\x00\x00\x00\x00"


def _compressor() -> tuple[Any, str]:
    """A gzip-stream compressobj: ISA-L level 1 when installed, else zlib level 1."""
    try:
        from isal import isal_zlib

        return isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31), "isal"
    except ImportError:
        return zlib.compressobj(1, zlib.DEFLATED, 31), "zlib"


def write_nifti(path: Path, array: npt.NDArray[Any], affine: npt.NDArray[Any]) -> str:
    """Write (X, Y, Z) `array` + RAS+ `affine` as NIfTI-1 (`.nii` or gzip `.nii.gz`).

    The array bytes are streamed in Fortran order from its own buffer (a Fortran-contiguous
    array, as `assemble` returns, is not copied). Returns the compressor used ("none",
    "isal" or "zlib").
    """
    data = np.asfortranarray(array)
    flat = data.T.reshape(-1) if data.flags.f_contiguous else data.ravel(order="F")
    view = flat.data.cast("B")
    header = nifti_header(data.shape, data.dtype, affine)
    tmp = path.with_name(path.name + ".part")
    chunk = 8 << 20
    with open(tmp, "wb") as f:
        if path.name.endswith(".gz"):
            comp, used = _compressor()
            f.write(comp.compress(header))
            for start in range(0, len(view), chunk):
                f.write(comp.compress(view[start : start + chunk]))
            f.write(comp.flush())
        else:
            used = "none"
            f.write(header)
            f.write(view)
    os.replace(tmp, path)
    return used
