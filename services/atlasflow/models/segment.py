"""One-off segmentation of a NIfTI CT by a registered model (I/O edge of `atlasflow segment`).

The network runs on Triton (`served_model`; `atlasflow.segmentation.model_serving`): a given
Triton URL, or a local PyTriton started for the command; pre/post-processing and tiling here.

The label map is written on the input's voxel grid (same shape, affine, sform/qform codes),
uint8 (uint16 beyond 255 labels), with the model's label ids (manifest ``labels``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.registry import DOMAIN, Manifest, ModelRegistry

LABELS_FILE = "labels.nii.gz"


def load_model(state_dir: str | Path, name: str, device: str = "cpu", *, network: Any | None = None) -> Any:
    """The registered model ``name`` ready to call (files verified against the manifest).

    ``network``: the served network (`atlasflow.segmentation.model_serving.TritonNetwork`):
    only the pre/post-processing and tiling run here; None: everything in process."""
    registry = ModelRegistry(state_dir)
    manifest: Manifest = registry.verify(name)
    if manifest.format == "nnunet-v2":
        from atlasflow.models.nnunet_infer import NnunetV2Model

        return NnunetV2Model(registry.path(name), manifest, device=device, forward=network)
    if manifest.format == "monai-bundle":
        from atlasflow.models.monai_bundle import MonaiBundleModel

        return MonaiBundleModel(registry.path(name), manifest, device=device, network=network)
    raise InvalidArgument(
        "UNSUPPORTED_FORMAT",
        f"models of format {manifest.format!r} cannot be run by `atlasflow segment` yet",
        domain=DOMAIN,
        metadata={"format": manifest.format},
    )


@contextmanager
def served_model(
    state_dir: str | Path, name: str, *, triton_url: str | None = None, device: str = "cpu"
) -> Iterator[Any]:
    """The registered model with its network on Triton: ``triton_url`` (a Triton that serves
    it, e.g. the stack's ``triton_server --model NAME``) or, without it, a local PyTriton
    started for the block (the ``local-triton`` extra) with the network on ``device``."""
    from atlasflow.models.export import triton_model_name
    from atlasflow.segmentation.model_serving import TritonNetwork, local_triton

    manifest = ModelRegistry(state_dir).get(name)
    with contextlib.ExitStack() as stack:
        url = triton_url or stack.enter_context(local_triton(state_dir, [name], device))
        network = TritonNetwork(url, triton_model_name(manifest))
        stack.callback(network.close)
        yield load_model(state_dir, name, network=network)


def segment_file(
    ct_path: str | Path,
    name: str,
    out_dir: str | Path,
    state_dir: str | Path,
    *,
    device: str = "cpu",
    triton_url: str | None = None,
    in_process: bool = False,
) -> dict[str, Any]:
    """Segment ``ct_path`` with model ``name``; writes ``out_dir/labels.nii.gz``; returns a summary.

    The network runs on Triton (`served_model`: ``triton_url`` or a local PyTriton);
    ``in_process`` runs everything in this process instead (debugging, benchmarks)."""
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
    with contextlib.ExitStack() as stack:
        if in_process:
            model = load_model(state_dir, name, device=device)
        else:
            model = stack.enter_context(served_model(state_dir, name, triton_url=triton_url, device=device))
        t_load = time.perf_counter() - t0
        volume = np.asanyarray(img.dataobj)
        spacing = [float(z) for z in img.header.get_zooms()[:3]]
        t1 = time.perf_counter()
        labels = (
            model(volume, spacing, affine=img.affine)
            if getattr(model, "needs_affine", False)
            else model(volume, spacing)
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
        "network": "in-process" if in_process else ("triton " + (triton_url or "local PyTriton")),
        "load_s": round(t_load, 3),
        "inference_s": round(t_infer, 3),
    }
    (out / "segment.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
