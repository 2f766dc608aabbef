"""ORACLE, not product code: the enhanced attention's `suspect_regions` as it was first written,
in numpy + scipy on the CPU (distance transforms by `scipy.ndimage.distance_transform_edt`,
morphology by `scipy.ndimage`). `atlasflow.method.suspect.suspect_regions` is the torch
version that runs where the soft predictions are; tests/ranking/test_ranking_suspect_torch.py
checks that both give the same masks and evidence bit for bit, and
``benchmarks/bench_attention.py --enhanced`` times both. The constants are the product's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from atlasflow.method.suspect import (
    ASYMMETRY_MIN,
    DOUBT_MAX_DEPTH,
    DOUBT_MIN_DEPTH,
    DOUBT_RATIO,
    EVIDENCE_FRACTION,
    SUSPECT_GROW,
    SUSPECT_MIN_ML,
    UNSURE_BAND,
    UNSURE_MIN_VOXELS,
    UNSURE_OPENING,
    UNSURE_SMALL_FRACTION,
)

_CUBE = np.ones((3, 3, 3), dtype=bool)


def _doubt_beyond_profile(mean: npt.NDArray[Any], dbin: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Oracle of `plausibility._doubt_beyond_profile` (same contract)."""
    conf = np.abs(2.0 * mean - 1.0)
    typical = np.zeros(DOUBT_MAX_DEPTH + 1, dtype=np.float32)
    for d in range(DOUBT_MIN_DEPTH, DOUBT_MAX_DEPTH + 1):
        sel = conf[dbin == d]
        typical[d] = float(np.median(sel)) if sel.size else 1.0
    return (dbin >= DOUBT_MIN_DEPTH) & (conf < DOUBT_RATIO * typical[dbin])


def _depth_bins(side: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Oracle of `plausibility._depth_bins`: scipy's Euclidean distance transforms, rounded, capped."""
    depth = np.where(side, ndimage.distance_transform_edt(side), ndimage.distance_transform_edt(~side))
    return np.minimum(np.rint(depth), DOUBT_MAX_DEPTH).astype(np.int64)


def _model_profile_conf(
    q: npt.NDArray[Any], dbin: npt.NDArray[Any], where: npt.NDArray[Any] | None = None
) -> npt.NDArray[Any]:
    """Oracle of `plausibility._model_profile_conf` (same contract), numpy histograms."""
    cq = np.abs(2 * q.astype(np.int16) - 255).astype(np.int64)  # 0..255, |2p - 1| * 255
    out = np.empty(q.shape, dtype=np.float32)
    nb = DOUBT_MAX_DEPTH + 1
    for m in range(q.shape[0]):
        key = dbin * 256 + cq[m]
        hist = np.bincount((key if where is None else key[where]).ravel(), minlength=nb * 256).reshape(nb, 256)
        cum = np.cumsum(hist, axis=1)
        half = (cum[:, -1] + 1) // 2
        typical = np.array(
            [int(np.searchsorted(cum[d], half[d])) if cum[d, -1] else 255 for d in range(nb)], dtype=np.float32
        )
        out[m] = np.minimum(cq[m] / np.maximum(typical[dbin], 1.0), 1.5)
    return out


def _open(mask: npt.NDArray[Any], iterations: int) -> npt.NDArray[Any]:
    return ndimage.binary_opening(mask, structure=_CUBE, iterations=iterations) if iterations else mask


def suspect_regions_numpy(
    q: npt.NDArray[Any], label: npt.NDArray[Any], voxel_ml: float
) -> tuple[npt.NDArray[Any], dict[str, float]]:
    """The numpy + scipy original of `atlasflow.method.suspect.suspect_regions` (same
    arguments and results)."""
    m = q.shape[0]
    p = q.astype(np.float32) / 255.0
    dec = q >= 128
    votes = dec.sum(axis=0)
    mean = p.mean(axis=0)
    side = np.asarray(label, dtype=bool)
    contested = (votes > 0) & (votes < m)
    dbin = _depth_bins(side)
    conf = _model_profile_conf(q, dbin, ~contested)
    agree = dec == side[None]
    n_agree = agree.sum(axis=0)
    c_agree = (conf * agree).sum(axis=0) / np.maximum(n_agree, 1)
    c_out = (conf * ~agree).sum(axis=0) / np.maximum(m - n_agree, 1)
    suspect_c = contested & (c_out - c_agree >= ASYMMETRY_MIN)
    unsure = ~contested & (mean > UNSURE_BAND[0]) & (mean < UNSURE_BAND[1])  # shapes the candidates
    doubt = unsure & _doubt_beyond_profile(mean, dbin)  # is the evidence
    cand = _open(contested, 1) | _open(unsure, UNSURE_OPENING)
    lab, n = ndimage.label(cand, structure=_CUBE)
    if n == 0:
        return cand, {"contested_ml": 0.0, "unsure_ml": 0.0}
    total = np.bincount(lab.ravel(), minlength=n + 1)
    ev_c = np.bincount(lab[suspect_c], minlength=n + 1)
    ev_u = np.bincount(lab[doubt & cand], minlength=n + 1)
    ml = total * voxel_ml
    keep = (ml >= SUSPECT_MIN_ML) & (ev_c >= EVIDENCE_FRACTION * total)
    keep |= (ml >= SUSPECT_MIN_ML) & (total >= UNSURE_MIN_VOXELS) & ((ev_c + ev_u) >= EVIDENCE_FRACTION * total)
    keep |= (ml >= SUSPECT_MIN_ML) & ((ev_c + ev_u) >= UNSURE_SMALL_FRACTION * total)
    keep[0] = False
    out = keep[lab]
    if SUSPECT_GROW and out.any():  # grow back what the opening stripped (see SUSPECT_GROW)
        out = ndimage.binary_dilation(out, structure=_CUBE, iterations=SUSPECT_GROW, mask=contested | unsure) | out
    return out, {
        "contested_ml": float((suspect_c & out).sum()) * voxel_ml,
        "unsure_ml": float((doubt & out).sum()) * voxel_ml,
    }
