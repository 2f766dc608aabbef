"""nnU-Net v2 inference, equal to ``nnUNetPredictor`` with its defaults, in atlasflow's code.

What nnUNetPredictor (nnunetv2 2.8, ``predict_from_raw_data.py``) does with its defaults
(tile step 0.5, Gaussian weighting, mirroring on, CPU) for a SimpleITKIO model, step by step,
and what this module does for the same step:

1. Read: SimpleITK's array is the NIfTI voxel array with its axes reversed, ``(Z, Y, X)`` =
   file ``(k, j, i)``, spacing reversed; no reorientation. Here: ``volume`` is the file's voxel
   array ``(X, Y, Z)`` (nibabel order, NOT reoriented), ``spacing_xyz`` its voxel size in mm;
   both reversed. The label map comes back on the same voxel grid.
2. ``transpose_forward`` of the plans applied to the array and the spacing.
3. Crop to the bounding box of the hole-filled non-zero mask (``scipy.ndimage.binary_fill_holes``).
4. Normalise: CTNormalization (clip to the foreground 0.5/99.5 percentiles, minus mean, over
   std) or ZScoreNormalization (whole crop), float32.
5. Resample to the configuration's spacing (new shape = round(old_spacing / new_spacing *
   shape)) by ``resample_data_or_seg_to_shape``'s rules: anisotropic (max/min spacing > 3 in the
   current, else the target spacing; exactly one low-resolution axis) -> in-plane spline of
   ``order`` slice by slice, then ``order_z`` (0 = nearest) along the low-resolution axis;
   otherwise a 3-D spline of ``order``. The spline is ``scipy.ndimage.zoom(grid_mode=True,
   mode='nearest')`` clipped to the input range (what skimage's ``resize(mode='edge',
   anti_aliasing=False)`` runs).
6. Pad to at least the patch size (constant 0, centred, the odd voxel after), tiles at steps
   ``round(k * (size - patch) / (n - 1))`` with ``n = ceil((size - patch) / (patch / 2)) + 1``,
   each tile predicted on the tile and its flips over every non-empty subset of the allowed
   mirror axes (averaged), weighted by a Gaussian (sigma = patch / 8, scaled to max 10, zeros
   replaced by the minimum, float16), accumulated in float16 and divided by the summed weights.
   Here the flips of one tile go through the network as one batch (same sum order).
7. Folds: the float16 logits summed fold by fold and divided by the fold count.
   On Triton (`sliding_window_served`, `atlasflow segment`'s path): the same, fold after
   fold, with the tiles sent in batches of ``tile_batch`` to the served network
   (`atlasflow.models.export`), which returns each tile's mirrored logits for that fold.
8. Logits resampled back to the cropped shape (step 5's rules, ``resampling_fn_probabilities``
   kwargs, default order 1), argmax over classes (first maximum on ties) = label id, pasted into
   the uncropped volume, ``transpose_backward``, axes reversed back to the file order.

Shapes: volumes ``(X, Y, Z)`` in the file's voxel order; network arrays ``(C, *spatial)`` in
nnU-Net's order. Runs on ``device`` (torch) for the network; resampling on CPU (scipy).
"""

from __future__ import annotations

import itertools
import json
import math
import pydoc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.nnunet import resolve_configuration
from atlasflow.models.registry import DOMAIN, Manifest

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
#: the served network of a model: ``(N, 1, *patch)`` float32 tiles, fold index -> ``(N, K, *patch)`` float32
TileForward = Callable[[torch.Tensor, int], torch.Tensor]


# ----------------------------------------------------------------------------- resampling


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    return [int(round(s / t * n)) for s, t, n in zip(spacing, new_spacing, shape)]


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    sp = np.asarray(spacing, dtype=np.float64)
    return [int(a) for a in np.where(max(sp) / sp == 1)[0]]


def separate_z_axis(
    current: Sequence[float], new: Sequence[float], force: bool | None, threshold: float = ANISO_THRESHOLD
) -> int | None:
    """The axis resampled separately (nearest by default), or None (nnU-Net's rules)."""
    axes: list[int] | None
    if force is not None:
        axes = _lowres_axes(current) if force else None
    elif max(current) / min(current) > threshold:
        axes = _lowres_axes(current)
    elif max(new) / min(new) > threshold:
        axes = _lowres_axes(new)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return axes[0]


def _spline(img: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage ``resize(img, shape, order, mode='edge', anti_aliasing=False)`` on float64."""
    zoom = [1.0 / (o / n) for o, n in zip(img.shape, shape)]
    out = ndimage.zoom(img, zoom, order=order, mode="nearest", cval=0, grid_mode=True)
    if order > 0:
        np.clip(out, img.min(), img.max(), out=out)
    return out


def resample_to_shape(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = False,
    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD,
    is_seg: bool = False,
) -> np.ndarray:
    """``(C, *shape)`` -> ``(C, *new_shape)`` in ``data``'s dtype by nnU-Net's
    ``resample_data_or_seg_to_shape`` rules (module docstring, step 5)."""
    if is_seg:
        raise InvalidArgument(
            "UNSUPPORTED_RESAMPLING", "segmentation resampling is not used at inference", domain=DOMAIN
        )
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, separate_z_anisotropy_threshold)
    shape = np.array(data.shape[1:])
    target = np.array([int(n) for n in new_shape])
    if np.all(shape == target):
        return data
    out = np.zeros((data.shape[0], *target), dtype=data.dtype)
    src = data.astype(np.float64, copy=False)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = _spline(src[c], [int(n) for n in target], order)
            continue
        in_plane = [int(n) for i, n in enumerate(target) if i != axis]
        tmp_shape = target.copy()
        tmp_shape[axis] = shape[axis]
        tmp = np.zeros(tmp_shape, dtype=np.float64)
        for k in range(shape[axis]):
            idx: list[Any] = [slice(None)] * 3
            idx[axis] = k
            tmp[tuple(idx)] = _spline(src[c][tuple(idx)], in_plane, order)
        if shape[axis] == target[axis]:
            out[c] = tmp
            continue
        scale = float(shape[axis]) / float(target[axis])
        coords = scale * (np.arange(target[axis], dtype=np.float64) + 0.5) - 0.5
        if order_z == 0:
            # map_coordinates(order=0, mode='nearest') of the 3-D map = a pick along the axis
            pick = ndimage.map_coordinates(
                np.arange(shape[axis], dtype=np.float64), coords[None], order=0, mode="nearest"
            ).astype(np.int64)
            out[c] = np.take(tmp, pick, axis=axis)
        else:
            grids = np.mgrid[tuple(slice(0, int(n)) for n in target)].astype(np.float64)
            grids[axis] = scale * (grids[axis] + 0.5) - 0.5
            out[c] = ndimage.map_coordinates(tmp, grids, order=order_z, mode="nearest")
    return out


# ----------------------------------------------------------------------------- sliding window


def compute_steps(image_size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    steps = []
    for size, p in zip(image_size, patch):
        n = int(math.ceil((size - p) / (p * step))) + 1
        stride = (size - p) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def gaussian_weights(
    patch: Sequence[int], device: torch.device, sigma_scale: float = 1.0 / 8, scale: float = 10.0
) -> torch.Tensor:
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = ndimage.gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / scale
    t = torch.from_numpy(g).to(device=device, dtype=torch.float16)
    mask = t == 0
    t[mask] = torch.min(t[~mask])
    return t


def pad_to(data: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Centre-pad ``(C, *spatial)`` with 0 to at least ``patch``; returns it and the un-pad slicer."""
    pads: list[tuple[int, int]] = []
    slicer: list[slice] = [slice(None)]
    for n, p in zip(data.shape[1:], patch):
        diff = max(int(p) - int(n), 0)
        pads.append((diff // 2, diff - diff // 2))
        slicer.append(slice(diff // 2, diff // 2 + int(n)))
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]
    if any(flat):
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0)
    return data, tuple(slicer)


@dataclass(frozen=True)
class NnunetSettings:
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    normalisation: str
    intensity: Mapping[str, float]
    data_kwargs: Mapping[str, Any]
    prob_kwargs: Mapping[str, Any]
    mirror_axes: tuple[int, ...] | None
    num_classes: int
    tile_step: float = 0.5


def build_network(plans: Mapping[str, Any], conf: Mapping[str, Any], num_classes: int) -> torch.nn.Module:
    """The plans' network (dynamic_network_architectures, nnU-Net's own classes), no deep supervision."""
    arch = conf["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(str(kwargs[key]))
    cls = pydoc.locate(str(arch["network_class_name"]))
    if cls is None:
        raise InvalidArgument("UNSUPPORTED_ARCHITECTURE", "network class not found", domain=DOMAIN)
    kwargs["deep_supervision"] = False
    net = cls(input_channels=1, num_classes=num_classes, **kwargs)  # type: ignore[operator]
    assert isinstance(net, torch.nn.Module)
    return net


class NnunetV2Model:
    """A registered ``nnunet-v2`` model, loaded once; call per volume (module docstring)."""

    def __init__(
        self,
        model_dir: str | Path,
        manifest: Manifest,
        device: str = "cpu",
        *,
        forward: TileForward | None = None,
        tile_batch: int = 4,
    ) -> None:
        """In process (``forward`` None): the fold networks are loaded here and run fold by
        fold. With ``forward`` (the served network, e.g. on Triton: `TileForward`) no
        network is loaded; tiles go ``tile_batch`` at a time to ``forward``."""
        base = Path(model_dir)
        plans = json.loads((base / "plans.json").read_text())
        dataset = json.loads((base / "dataset.json").read_text())
        conf = resolve_configuration(plans, str(manifest.details["configuration"]))
        labels = dataset["labels"]
        num_classes = len([k for k in labels if k != "ignore"])
        tf = tuple(int(i) for i in plans.get("transpose_forward", [0, 1, 2]))
        tb = tuple(int(i) for i in plans.get("transpose_backward", [0, 1, 2]))
        mirror = manifest.details.get("mirror_axes")
        self.settings = NnunetSettings(
            patch_size=tuple(int(p) for p in conf["patch_size"]),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in conf["spacing"]),  # type: ignore[arg-type]
            transpose_forward=tf,  # type: ignore[arg-type]
            transpose_backward=tb,  # type: ignore[arg-type]
            normalisation=str(conf["normalization_schemes"][0]),
            intensity=dict(plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})),
            data_kwargs=dict(conf.get("resampling_fn_data_kwargs", {})),
            prob_kwargs=dict(conf.get("resampling_fn_probabilities_kwargs", {})),
            mirror_axes=tuple(int(a) for a in mirror) if mirror is not None else None,
            num_classes=num_classes,
        )
        self.device = torch.device(device)
        self.manifest = manifest
        self.forward = forward
        self.tile_batch = max(1, int(tile_batch))
        self.folds: list[torch.nn.Module] = []
        for f in manifest.details["folds"] if forward is None else []:
            net = build_network(plans, conf, num_classes)
            net.load_state_dict(torch.load(base / f"fold_{f}.pt", map_location="cpu", weights_only=True))
            self.folds.append(net.to(self.device).eval())
        self.label_dtype = np.uint8 if num_classes - 1 < 255 else np.uint16

    # -- steps --------------------------------------------------------------------------------
    def normalise(self, data: np.ndarray) -> np.ndarray:
        s = self.settings
        data = data.astype(np.float32, copy=False)
        for c in range(data.shape[0]):
            img = data[c]
            if s.normalisation == "CTNormalization":
                p = s.intensity
                np.clip(img, p["percentile_00_5"], p["percentile_99_5"], out=img)
                img -= p["mean"]
                img /= max(p["std"], 1e-8)
            else:
                mean, std = img.mean(), img.std()
                img -= mean
                img /= max(std, 1e-8)
        return data

    @torch.inference_mode()
    def _tile_logits(self, net: torch.nn.Module, tile: torch.Tensor) -> torch.Tensor:
        """``(1, C, *patch)`` -> mirrored-averaged logits ``(K, *patch)`` float32."""
        axes = self.settings.mirror_axes
        if not axes:
            return net(tile)[0]
        dims = [a + 2 for a in axes]
        combos = [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]
        batch = torch.cat([tile] + [torch.flip(tile, c) for c in combos])
        out = net(batch)
        pred = out[0:1].clone()
        for i, c in enumerate(combos):
            pred += torch.flip(out[i + 1 : i + 2], c)
        pred /= len(combos) + 1
        return pred[0]

    @torch.inference_mode()
    def sliding_window(self, net: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
        """``(C, *spatial)`` float32 -> ``(K, *spatial)`` float16 logits (step 6)."""
        s = self.settings
        padded, unpad = pad_to(data, s.patch_size)
        padded = padded.to(self.device)
        steps = compute_steps(padded.shape[1:], s.patch_size, s.tile_step)
        logits = torch.zeros((s.num_classes, *padded.shape[1:]), dtype=torch.half, device=self.device)
        weight = torch.zeros(padded.shape[1:], dtype=torch.half, device=self.device)
        gauss = gaussian_weights(s.patch_size, self.device)
        for sx, sy, sz in itertools.product(*steps):
            sl = (slice(sx, sx + s.patch_size[0]), slice(sy, sy + s.patch_size[1]), slice(sz, sz + s.patch_size[2]))
            tile = padded[(slice(None), *sl)][None].contiguous()
            pred = self._tile_logits(net, tile)
            pred *= gauss
            logits[(slice(None), *sl)] += pred
            weight[sl] += gauss
        torch.div(logits, weight, out=logits)
        if torch.any(torch.isinf(logits)):
            raise InvalidArgument("NUMERIC_OVERFLOW", "inf in the predicted logits", domain=DOMAIN)
        return logits[unpad].cpu()

    @torch.inference_mode()
    def sliding_window_served(self, forward: TileForward, data: torch.Tensor) -> torch.Tensor:
        """Steps 6-7 with the served network: ``forward(tiles, fold)`` gets ``(N, 1, *patch)``
        tiles and returns that fold's mirrored logits ``(N, K, *patch)``
        (`atlasflow.models.export`); fold after fold, the Gaussian accumulation as
        `sliding_window`'s, tile by tile in order; the folds summed and averaged."""
        total: torch.Tensor | None = None
        n_folds = len(self.manifest.details["folds"])
        for f in range(n_folds):
            out = self._served_fold(forward, data, f)
            total = out if total is None else total.add_(out)
        assert total is not None
        if n_folds > 1:
            total /= n_folds
        return total

    def _served_fold(self, forward: TileForward, data: torch.Tensor, fold: int) -> torch.Tensor:
        s = self.settings
        padded, unpad = pad_to(data, s.patch_size)
        steps = compute_steps(padded.shape[1:], s.patch_size, s.tile_step)
        logits = torch.zeros((s.num_classes, *padded.shape[1:]), dtype=torch.half)
        weight = torch.zeros(padded.shape[1:], dtype=torch.half)
        gauss = gaussian_weights(s.patch_size, torch.device("cpu"))
        slicers = [
            (slice(sx, sx + s.patch_size[0]), slice(sy, sy + s.patch_size[1]), slice(sz, sz + s.patch_size[2]))
            for sx, sy, sz in itertools.product(*steps)
        ]
        for start in range(0, len(slicers), self.tile_batch):
            group = slicers[start : start + self.tile_batch]
            tiles = torch.stack([padded[(slice(None), *sl)] for sl in group]).contiguous()
            preds = forward(tiles, fold)
            if tuple(preds.shape) != (len(group), s.num_classes, *s.patch_size):
                raise InvalidArgument(
                    "SERVED_MODEL_MISMATCH",
                    f"the served network returned {list(preds.shape)} for {len(group)} tiles",
                    domain=DOMAIN,
                )
            for sl, pred in zip(group, preds.float()):
                pred *= gauss
                logits[(slice(None), *sl)] += pred
                weight[sl] += gauss
        torch.div(logits, weight, out=logits)
        if torch.any(torch.isinf(logits)):
            raise InvalidArgument("NUMERIC_OVERFLOW", "inf in the predicted logits", domain=DOMAIN)
        return logits[unpad]

    @torch.inference_mode()
    def __call__(self, volume: npt.ArrayLike, spacing_xyz: Sequence[float]) -> np.ndarray:
        """``volume`` ``(X, Y, Z)`` file voxel order, ``spacing_xyz`` mm -> label ids ``(X, Y, Z)``."""
        s = self.settings
        vol = np.asarray(volume)
        if vol.ndim != 3 or min(vol.shape) < 1:
            raise InvalidArgument("INVALID_VOLUME", "volume must be a non-empty (X, Y, Z) array", domain=DOMAIN)
        data = vol.transpose(2, 1, 0)[None].astype(np.float32)
        spacing = [abs(float(x)) for x in spacing_xyz][::-1]
        data = data.transpose([0, *[i + 1 for i in s.transpose_forward]])
        spacing = [spacing[i] for i in s.transpose_forward]
        shape_before_crop = data.shape[1:]
        mask = ndimage.binary_fill_holes(data[0] != 0)
        if not mask.any():
            raise InvalidArgument("EMPTY_VOLUME", "the volume has no non-zero voxel", domain=DOMAIN)
        bbox = tuple(slice(int(np.min(ix)), int(np.max(ix)) + 1) for ix in np.nonzero(mask))
        data = np.ascontiguousarray(data[(slice(None), *bbox)])
        cropped_shape = data.shape[1:]
        new_shape = compute_new_shape(cropped_shape, spacing, s.spacing)
        data = self.normalise(data)
        data = resample_to_shape(data, new_shape, spacing, s.spacing, **s.data_kwargs)
        x = torch.from_numpy(np.ascontiguousarray(data))
        n_threads = torch.get_num_threads()
        logits: torch.Tensor | None = None
        if self.forward is not None:
            logits = self.sliding_window_served(self.forward, x)
        for net in self.folds:
            out = self.sliding_window(net, x)
            logits = out if logits is None else logits.add_(out)
        assert logits is not None
        if len(self.folds) > 1:
            logits /= len(self.folds)
        torch.set_num_threads(n_threads)
        probs = resample_to_shape(logits.numpy(), cropped_shape, s.spacing, spacing, **s.prob_kwargs)
        seg = probs.argmax(0)
        full = np.zeros(shape_before_crop, dtype=self.label_dtype)
        full[bbox] = seg
        full = full.transpose(s.transpose_backward)
        return np.ascontiguousarray(full.transpose(2, 1, 0))
