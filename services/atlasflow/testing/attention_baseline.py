"""BASELINE, not product code: a straightforward numpy + scipy transcription of the reference
attention recipe (DESIGN.md "The method"; AbdomenAtlas ``create_attention.py`` and
``utils/utils.py``), on full volumes in float64, one organ at a time, the way the reference
does it. It is the yardstick for `atlasflow.method.attention` (equality test and
``benchmarks/bench_attention.py``).

Input: organ id -> uint8 ``(M, X, Y, Z)`` ``p*255`` soft predictions on one grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

NON_VESSEL = (2, 3, 4, 5, 6, 8, 9)  # overlap partners: all of our organs but aorta (1), postcava (7)
STRUCT = ndimage.generate_binary_structure(3, 3)


def largest_cc(mask: npt.NDArray[Any]) -> npt.NDArray[Any]:
    lab, n = ndimage.label(mask, structure=STRUCT)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == np.argmax(counts)


def post_process(mask_float: npt.NDArray[Any], threshold: float) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``std_post_process`` / ``entropy_post_process``: threshold, 2 erosions, 2 dilations."""
    out = mask_float.copy()
    binary = mask_float > threshold
    binary = ndimage.binary_erosion(binary, structure=STRUCT, iterations=2)
    binary = ndimage.binary_dilation(binary, structure=STRUCT, iterations=2)
    out[~binary] = 0
    return out, binary


def reference_attention_numpy(
    probs_u8: Mapping[int, npt.NDArray[Any]], labelled: Iterable[int] = ()
) -> dict[int, dict[str, npt.NDArray[Any]]]:
    """Per organ: ``{"ensemble", "attention", "heatmap", "std_mask", "entropy_mask", "overlap"}``
    full-volume arrays (attention terms only for organs not in ``labelled``)."""
    labelled = set(labelled)
    # pass 1 (the reference's inference script): masked soft predictions, stored as uint8
    # p*255 as the reference stores them, and the ensemble masks
    masked: dict[int, npt.NDArray[Any]] = {}
    ensembles: dict[int, npt.NDArray[Any]] = {}
    for k, q in probs_u8.items():
        soft = q.astype(np.float64) / 255.0
        for m in range(soft.shape[0]):
            own = largest_cc(soft[m] > 0.5)
            dil = ndimage.binary_dilation(own, structure=STRUCT, iterations=1)
            soft[m][~dil] = 0
        masked[k] = np.round(soft * 255.0).astype(np.uint8)  # exact: soft = q/255 or 0
        ensembles[k] = largest_cc(soft.mean(axis=0) > 0.5)
        del soft
    # pass 2 (create_attention.py): per organ, read the stored uint8 back as float64
    out: dict[int, dict[str, npt.NDArray[Any]]] = {}
    for k, stored in masked.items():
        soft = stored.astype(np.float64) / 255.0
        res: dict[str, npt.NDArray[Any]] = {"ensemble": ensembles[k]}
        if k not in labelled:
            std_float, std_mask = post_process(np.std(soft, axis=0), 0.1)
            entropy = np.zeros(soft.shape[1:])
            for m in range(soft.shape[0]):
                p = soft[m]
                with np.errstate(divide="ignore", invalid="ignore"):
                    e = -p * np.log(p)
                e[p == 0] = 0
                entropy += e
            entropy /= soft.shape[0]
            ent_float, ent_mask = post_process(entropy, 0.05)
            overlap = np.zeros(soft.shape[1:], dtype=bool)
            for j in NON_VESSEL:
                if j != k and j in ensembles:
                    overlap |= ensembles[k] & ensembles[j]
            heat = std_float + ent_float + overlap
            peak = heat.max()
            if peak > 0:
                heat = heat / peak
            res.update(
                attention=std_mask | ent_mask | overlap,
                heatmap=heat,
                std_mask=std_mask,
                entropy_mask=ent_mask,
                overlap=overlap,
            )
        out[k] = res
    return out
