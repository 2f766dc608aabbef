"""One-off segmentation of a NIfTI CT by a registered model (I/O edge of `atlasflow segment`).

The label map is written on the input's voxel grid (same shape, affine, sform/qform codes),
uint8 (uint16 beyond 255 labels), with the model's label ids (manifest ``labels``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.registry import DOMAIN, Manifest, ModelRegistry

LABELS_FILE = "labels.nii.gz"


def load_model(state_dir: str | Path, name: str, device: str = "cpu") -> Any:
    """The registered model ``name`` ready to call (files verified against the manifest)."""
    registry = ModelRegistry(state_dir)
    manifest: Manifest = registry.verify(name)
    if manifest.format == "nnunet-v2":
        from atlasflow.models.nnunet_infer import NnunetV2Model

        return NnunetV2Model(registry.path(name), manifest, device=device)
    if manifest.format == "monai-bundle":
        from atlasflow.models.monai_bundle import MonaiBundleModel

        return MonaiBundleModel(registry.path(name), manifest, device=device)
    raise InvalidArgument(
        "UNSUPPORTED_FORMAT",
        f"models of format {manifest.format!r} cannot be run by `atlasflow segment` yet",
        domain=DOMAIN,
        metadata={"format": manifest.format},
    )


def segment_file(
    ct_path: str | Path, name: str, out_dir: str | Path, state_dir: str | Path, *, device: str = "cpu"
) -> dict[str, Any]:
    """Segment ``ct_path`` with model ``name``; writes ``out_dir/labels.nii.gz``; returns a summary."""
    import nibabel as nib

    path = Path(ct_path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError("not a NIfTI-1/2 image")
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a bad file
        raise InvalidArgument("INVALID_NIFTI", f"cannot read {path.name} as NIfTI: {exc}", domain=DOMAIN) from None
    if len(img.shape) != 3:
        raise InvalidArgument("INVALID_VOLUME", "the CT must be a 3-D NIfTI volume", domain=DOMAIN)
    t0 = time.perf_counter()
    model = load_model(state_dir, name, device=device)
    t_load = time.perf_counter() - t0
    volume = np.asanyarray(img.dataobj)
    spacing = [float(z) for z in img.header.get_zooms()[:3]]
    t1 = time.perf_counter()
    labels = (
        model(volume, spacing, affine=img.affine) if getattr(model, "needs_affine", False) else model(volume, spacing)
    )
    t_infer = time.perf_counter() - t1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = img.header.copy()
    header.set_data_dtype(labels.dtype)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    seg = nib.Nifti1Image(labels, img.affine, header)
    seg.set_sform(img.get_sform(), int(img.header["sform_code"]))
    seg.set_qform(img.get_qform(), int(img.header["qform_code"]))
    nib.save(seg, str(out / LABELS_FILE))
    present = sorted(int(v) for v in np.unique(labels) if v)
    summary = {
        "model": name,
        "digest": model.manifest.digest,
        "labels_file": str(out / LABELS_FILE),
        "shape": list(labels.shape),
        "labels_present": {str(i): model.manifest.labels.get(i, "?") for i in present},
        "load_s": round(t_load, 3),
        "inference_s": round(t_infer, 3),
    }
    (out / "segment.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
