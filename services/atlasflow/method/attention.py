"""The attention library: the AbdomenAtlas ``create_attention.py`` recipe in torch, vectorised
over whole volumes, on whatever device holds the tensors (CPU here, the GPU next to the models
in the segmentation service).

Conventions: volumes are ``(X, Y, Z)`` on one grid (voxel axes of the native CT; the 4x4 affine
maps voxel indices to RAS+ mm); per-model stacks are ``(M, X, Y, Z)``. Soft predictions are
probabilities in [0, 1] (float) or uint8 ``p*255`` (the reference's storage). Organ ids are
AbdomenAtlas-8K 1..9 (`atlasflow.common.organs`).

The recipe (the ``reference`` strategy, `atlasflow.method.reference`; DESIGN.md "The method"),
per organ the case's source did NOT label:

1. each model's soft prediction is zeroed outside a 1-voxel dilation (3x3x3 cube) of that
   model's own post-processed mask (largest 26-connected component of ``p > 0.5``);
2. inconsistency: ``std`` over models (population std, ``np.std``); mask = ``std > 0.1``, then
   a binary opening (2 erosions, 2 dilations, 3x3x3 cube);
3. uncertainty: mean over models of ``-p ln p`` (0 at p = 0); mask = ``entropy > 0.05``, same
   opening;
4. overlap: voxels where this organ's ensemble mask (mean over models ``> 0.5``, largest
   26-connected component) and the ensemble mask of any other NON-VESSEL structure are both set
   (the reference's ``ORGAN_NAME_OVERLAP``; of our nine organs: all but aorta and postcava);
5. attention = union of the three masks; heatmap = ``std*std_mask + entropy*entropy_mask +
   overlap``, divided by its maximum (an all-zero heatmap stays zero instead of the reference's
   0/0 = NaN);
6. case priority = total attention voxels over organs; organs ordered by the sum of their uint8
   heatmap ``floor(heatmap*255)`` (organs with zero attention are not listed).

Exactness: with uint8 inputs the thresholds are decided exactly (the std threshold in integer
arithmetic, the entropy in float64 through a 256-entry table), so masks equal a float64
numpy + scipy implementation bit for bit (`atlasflow.testing.attention_baseline`); the heatmap is
float32 (|error| < 1e-6).

Speed: every term is zero outside the support of an organ's soft predictions, and the
morphology treats voxels outside the volume as background (scipy's ``border_value=0``), so all
per-organ work runs on the bounding box of that support; the results are the same as on the
full volume. Connected components use ``scipy.ndimage.label`` (C) on those boxes
(`atlasflow.method.masks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.method.masks import (
    Box,
    binary_opening,
    ensemble_raw,
    largest_component,
    mask_to_own_components,
    support_box,
    to_u8_probs,
)

STD_THRESHOLD = 0.1
ENTROPY_THRESHOLD = 0.05
OPENING_ITERATIONS = 2
#: Organs whose ensemble masks count for the overlap term (the reference's non-vessel list).
OVERLAP_PARTNERS: frozenset[int] = frozenset(i for i, n in ORGANS.items() if n not in ("aorta", "postcava"))


# ----------------------------------------------------------------------------- voxel terms


def voxel_entropy(p: torch.Tensor) -> torch.Tensor:
    """``-p ln p`` elementwise for probabilities in [0, 1] (0 where p == 0)."""
    p = p.to(torch.float32)
    return -p * torch.log(p.clamp_min(1e-12)) * (p > 0)


def entropy_table(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """``(256,)`` table of ``-p ln p`` at ``p = q/255`` for uint8 ``q``, computed in float64
    exactly as numpy does it (``-p * np.log(p)``, 0 at q = 0)."""
    p = np.arange(256, dtype=np.float64) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -p * np.log(p)
    t[0] = 0.0
    return torch.from_numpy(t).to(device=device, dtype=dtype)


def model_std(p: torch.Tensor) -> torch.Tensor:
    """Population std over models of ``(M, X, Y, Z)`` float probabilities (``np.std(axis=0)``).

    Accumulated model by model: a strided ``Tensor.std(dim=0)`` is ~20x slower on CPU."""
    mean = torch.zeros_like(p[0])
    for pm in p:
        mean += pm
    mean /= p.shape[0]
    var = torch.zeros_like(mean)
    for pm in p:
        var.addcmul_(pm - mean, pm - mean)
    var /= p.shape[0]
    return var.sqrt_()


def _std_u8(q: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Std over models of uint8 ``(M, X, Y, Z)`` ``p*255`` and the exact mask ``std > threshold``.

    ``M^2 * 255^2 * var = M * sum(q^2) - (sum q)^2`` is an integer: the threshold is compared in
    int32 (no rounding at the boundary); the std itself is float32 (|error| ~ 1e-7)."""
    m = q.shape[0]
    s = torch.zeros(q.shape[1:], dtype=torch.int32, device=q.device)
    s2 = torch.zeros_like(s)
    for qm in q:
        qi = qm.to(torch.int32)
        s += qi
        s2.addcmul_(qi, qi)
    num = s2.mul_(m).sub_(s.mul_(s))  # M sum q^2 - (sum q)^2 >= 0, in place
    limit = threshold * threshold * m * m * 255.0 * 255.0
    mask = num > limit  # int vs float: exact for these magnitudes (< 2^24)
    std = num.to(torch.float32).sqrt_().div_(m * 255.0)
    return std, mask


def _entropy_u8(q: torch.Tensor) -> torch.Tensor:
    """Mean over models of ``-p ln p`` for uint8 ``(M, X, Y, Z)`` ``p*255``, float64 (table)."""
    table = entropy_table(torch.float64, q.device)
    ent = torch.zeros(q.shape[1:], dtype=torch.float64, device=q.device)
    for qm in q:
        ent += table[qm.to(torch.int64)]
    ent /= q.shape[0]
    return ent


@dataclass
class OrganAttention:
    """Per-organ attention on one grid ``(X, Y, Z)`` (a crop or the whole volume).

    ``attention``: bool union mask; ``heatmap``: float32 in [0, 1]; ``std_mask``,
    ``entropy_mask``: the opened masks; ``overlap``: the overlap mask used.
    """

    attention: torch.Tensor
    heatmap: torch.Tensor
    std_mask: torch.Tensor
    entropy_mask: torch.Tensor
    overlap: torch.Tensor


def organ_attention(
    probs: torch.Tensor,
    overlap: torch.Tensor,
    *,
    std_threshold: float = STD_THRESHOLD,
    entropy_threshold: float = ENTROPY_THRESHOLD,
    opening_iterations: int = OPENING_ITERATIONS,
) -> OrganAttention:
    """Attention for one organ (recipe steps 2-5).

    ``probs``: ``(M, X, Y, Z)`` per-model soft predictions in [0, 1] (float) or uint8 ``p*255``,
    already zeroed outside each model's dilated mask (`mask_to_own_components`).
    ``overlap``: bool ``(X, Y, Z)``. With uint8 input the masks are exact (see module doc).
    """
    if probs.ndim != 4:
        raise ValueError("probs must be (M, X, Y, Z)")
    overlap = overlap.to(device=probs.device, dtype=torch.bool)
    if probs.dtype == torch.uint8:
        std, std_raw = _std_u8(probs, std_threshold)
        ent64 = _entropy_u8(probs)
        ent_raw = ent64 > entropy_threshold
        entropy = ent64.to(torch.float32)
        del ent64
    else:
        p = probs.to(torch.float32)
        std = model_std(p)
        std_raw = std > std_threshold
        entropy = torch.zeros_like(p[0])
        for pm in p:
            entropy += voxel_entropy(pm)
        entropy /= p.shape[0]
        ent_raw = entropy > entropy_threshold
    std_mask = binary_opening(std_raw, opening_iterations)
    entropy_mask = binary_opening(ent_raw, opening_iterations)
    attention = std_mask | entropy_mask | overlap
    heatmap = std.mul_(std_mask).add_(entropy.mul_(entropy_mask)).add_(overlap.to(torch.float32))
    peak = float(heatmap.max()) if heatmap.numel() else 0.0
    if peak > 0:
        heatmap /= peak
    return OrganAttention(
        attention=attention, heatmap=heatmap, std_mask=std_mask, entropy_mask=entropy_mask, overlap=overlap
    )


# ----------------------------------------------------------------------------- whole case


@dataclass
class OrganResult:
    """One organ of a case, on the crop ``box`` of the full grid.

    ``ensemble``: bool ensemble mask (largest component) on ``box``; ``ensemble_extra``: bool,
    the other components of the raw ensemble vote (dropped from the label); ``components``:
    number of 26-connected components of the raw vote; ``attention`` / ``heatmap`` (float32,
    [0, 1]) / ``std_mask`` / ``entropy_mask`` / ``overlap`` on ``box`` (None when the organ is
    labelled by the source or has no support); ``contested`` (bool, on ``box``, unlabelled
    organs): voxels where the models' masked predictions take different sides of 0.5
    (``0 < #{m: q_m >= 128} < M``); ``probs`` (uint8 ``(M, *box)``, unlabelled organs): the
    models' soft predictions as given (before step 1's masking, which would erase the doubts
    of a model outside its own mask), kept for the enhanced strategy's confidence terms
    (`atlasflow.method.enhanced`).
    """

    organ: int
    box: Box | None
    ensemble: torch.Tensor | None
    ensemble_extra: torch.Tensor | None
    components: int
    labelled: bool
    attention: OrganAttention | None = None
    contested: torch.Tensor | None = None
    probs: torch.Tensor | None = None

    def attention_voxels(self) -> int:
        return 0 if self.attention is None else int(self.attention.attention.sum())

    def heatmap_u8_sum(self) -> int:
        """Sum of the stored uint8 heatmap ``floor(heatmap*255)`` (the reference's organ order)."""
        if self.attention is None:
            return 0
        return int(torch.floor(self.attention.heatmap * 255.0).sum(dtype=torch.float64))

    def paste(self, what: str, shape: tuple[int, int, int]) -> torch.Tensor:
        """Full-grid ``(X, Y, Z)`` copy of ``attention`` / ``heatmap`` / ``std_mask`` /
        ``entropy_mask`` / ``overlap`` / ``ensemble`` (zeros outside ``box``)."""
        src = self.ensemble if what == "ensemble" else (getattr(self.attention, what) if self.attention else None)
        dtype = torch.float32 if what == "heatmap" else torch.bool
        out = torch.zeros(shape, dtype=dtype)
        if src is not None and self.box is not None:
            out[self.box] = src.to(device="cpu", dtype=dtype)
        return out


@dataclass
class CaseAttention:
    """Reference attention of one case: ``shape`` ``(X, Y, Z)``, one `OrganResult` per organ."""

    shape: tuple[int, int, int]
    organs: dict[int, OrganResult] = field(default_factory=dict)

    def score(self) -> int:
        """Reference case priority: total attention voxels over organs."""
        return sum(r.attention_voxels() for r in self.organs.values())

    def organ_order(self) -> list[int]:
        """Unlabelled organs with non-zero attention, by decreasing uint8 heatmap sum (stable)."""
        sums = {k: r.heatmap_u8_sum() for k, r in self.organs.items() if not r.labelled}
        return [k for k in sorted(sums, key=lambda k: -sums[k]) if sums[k] > 0]


def _organ_id(key: int | str) -> int:
    if isinstance(key, str):
        return ORGAN_IDS[key]
    return int(key)


def case_attention(
    probs: Mapping[int, torch.Tensor | npt.NDArray[np.generic]] | Mapping[str, torch.Tensor | npt.NDArray[np.generic]],
    labelled_organs: Iterable[int | str] = (),
    *,
    device: torch.device | str | None = None,
    available: Mapping[int, Sequence[bool]] | None = None,
) -> CaseAttention:
    """The reference recipe (steps 1-5) for one case.

    ``probs``: organ id (or name) -> ``(M, X, Y, Z)`` soft predictions (uint8 ``p*255`` or float
    in [0, 1]; floats are rounded to uint8 first, as stored by the reference), all on one grid.
    ``labelled_organs``: organs the case's source labels (partial-label template): their
    ensemble masks still count for the overlap of other organs, but they get no attention.
    ``available`` (heterogeneous ensembles, `atlasflow.segmentation.heterogeneous`): organ id ->
    ``(M,)`` flags, False where member m does not predict that organ at all. Such a member has
    no opinion on it: its row is left out of that organ's stack before anything else (it
    neither votes background in the ensemble mask nor adds std or entropy), so the organ's
    terms are those of the members that predict it; an organ no member predicts has no support.
    Absent (None, or an organ not in it) = every member predicts the organ.
    """
    labelled = {_organ_id(k) for k in labelled_organs}
    shape: tuple[int, int, int] | None = None
    crops: dict[int, tuple[Box | None, torch.Tensor | None]] = {}
    results: dict[int, OrganResult] = {}
    partner_count: torch.Tensor | None = None
    for key, pr in probs.items():
        k = _organ_id(key)
        q = to_u8_probs(pr)
        if device is not None:
            q = q.to(device)
        if q.ndim != 4:
            raise ValueError("soft predictions must be (M, X, Y, Z)")
        if available is not None and k in available:
            keep = [bool(f) for f in available[k]]
            if len(keep) != q.shape[0]:
                raise ValueError("available flags must have one entry per member")
            q = q[[m for m, f in enumerate(keep) if f]]
        if shape is None:
            shape = (int(q.shape[1]), int(q.shape[2]), int(q.shape[3]))
            partner_count = torch.zeros(shape, dtype=torch.uint8, device=q.device)
        elif tuple(q.shape[1:]) != shape:
            raise ValueError("all organs' soft predictions must share one grid")
        box = support_box(q) if q.shape[0] else None
        if box is None:
            results[k] = OrganResult(k, None, None, None, 0, k in labelled)
            crops[k] = (None, None)
            continue
        raw_crop = q[(slice(None), *box)].clone()
        qc = mask_to_own_components(raw_crop.clone())
        del q
        raw = ensemble_raw(qc)
        ens, n = largest_component(raw)
        extra = raw & ~ens
        results[k] = OrganResult(k, box, ens, extra, n, k in labelled, probs=None if k in labelled else raw_crop)
        crops[k] = (box, qc)
        if k in OVERLAP_PARTNERS:
            assert partner_count is not None
            partner_count[box] += ens.to(torch.uint8)
    assert shape is not None or not probs
    for k, res in results.items():
        box, masked = crops[k]
        if res.labelled or box is None or masked is None or res.ensemble is None:
            continue
        assert partner_count is not None
        others = partner_count[box].to(torch.int16) - (res.ensemble.to(torch.int16) if k in OVERLAP_PARTNERS else 0)
        overlap = res.ensemble & (others > 0)
        res.attention = organ_attention(masked, overlap)
        votes = (masked >= 128).sum(dim=0, dtype=torch.uint8)
        res.contested = (votes > 0) & (votes < masked.shape[0])
        crops[k] = (box, None)
    return CaseAttention(shape=shape or (0, 0, 0), organs=results)
