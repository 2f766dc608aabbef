"""The enhanced attention's evidence (`suspect_regions`): compact regions where the outvoted
models are surer than the winners (each model judged against its own boundary profile), or
where all models agree but doubt more than the organ's own boundary profile explains; tuned on
the error simulator's seeds 0-99 and forced-kind variants of 0-49
(benchmarks/bench_error_detection.py). The `enhanced` strategy (`atlasflow.method.enhanced`)
adds the swapped kidneys of the plausibility findings.

Conventions: soft predictions are uint8 ``(M, X, Y, Z)`` ``p*255`` crops, labels bool
``(X, Y, Z)`` on the same crop; volumes in ml. Runs in torch on the predictions' device;
connected components (26-connected) are labelled on the CPU (scipy).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from atlasflow.method.masks import CUBE, binary_dilation, binary_opening

#: enhanced attention (`suspect_regions`), tuned on the simulator's seeds 0-49 (benchmarks/):
#: "unsure" voxels have a mean model probability in this open band
UNSURE_BAND = (0.2, 0.8)
#: opening iterations (3x3x3) of the unsure voxels: ordinary boundary bands are thinner
UNSURE_OPENING = 1
#: a component whose evidence is mostly unsure agreement must also hold at least this many
#: voxels (the ordinary boundary bands that survive the opening are a voxel-scale pattern)
UNSURE_MIN_VOXELS = 150
#: a suspect component must hold at least this volume (the reader's speck limit) ...
SUSPECT_MIN_ML = 1.0
#: ... and, where the models' decisions differ, the models outvoted there must be more sure
#: than the ones that won by at least this much (mean of each model's confidence relative to
#: its own typical confidence at that depth, `_model_profile_conf`; see `suspect_regions`)
ASYMMETRY_MIN = 0.1
#: share of a component's voxels that must be contested, or unsure with all models agreeing
EVIDENCE_FRACTION = 0.2
#: a kept component then grows back (geodesic dilation, 3x3x3) this many voxels into the raw,
#: unopened contested and unsure voxels around it: the opening that makes candidates robust
#: also strips the thin parts of a real error (a boundary shift is a 3-4 voxel shell)
SUSPECT_GROW = 5
#: a component smaller than `UNSURE_MIN_VOXELS` is still kept when at least this share of it
#: is suspect-contested or doubting beyond the profile (a small leak all three models doubt)
UNSURE_SMALL_FRACTION = 0.5


#: a voxel is "unsure" when the ensemble's confidence ``|2 mean - 1|`` is below this fraction
#: of the organ's typical confidence at the same distance from the label's boundary ...
DOUBT_RATIO = 0.8
#: ... and it lies at least this many voxels from that boundary (closer, every model doubts)
DOUBT_MIN_DEPTH = 1
#: depths beyond this share the typical confidence of this depth
DOUBT_MAX_DEPTH = 6


def _median_f32(x: torch.Tensor) -> float:
    """``np.median`` of a 1-D float32 tensor, as numpy computes it (mean of the two middle
    values, in float32, for an even count)."""
    n = x.numel()
    hi = torch.kthvalue(x, n // 2 + 1).values
    if n % 2:
        return float(hi)
    lo = torch.kthvalue(x, n // 2).values
    return float((lo + hi) / 2)


def _doubt_beyond_profile(mean: torch.Tensor, dbin: torch.Tensor) -> torch.Tensor:
    """Bool, shape of ``mean``: voxels where the ensemble is less sure than the organ's own
    boundary profile predicts. ``mean``: float32 mean probability ``(X, Y, Z)``; ``dbin``: each
    voxel's depth bin from the label's boundary (`_depth_bins`); the typical confidence at a depth is the
    median of ``|2 mean - 1|`` over all voxels of the crop at that depth, inside and outside
    (most of them are right: the profile is the models' own sharpness, so a thin organ whose
    interior never gets far from its boundary is not "unsure" for that)."""
    conf = torch.abs(2.0 * mean - 1.0)
    typical = torch.zeros(DOUBT_MAX_DEPTH + 1, dtype=torch.float32)
    for d in range(DOUBT_MIN_DEPTH, DOUBT_MAX_DEPTH + 1):
        sel = conf[dbin == d]
        typical[d] = _median_f32(sel) if sel.numel() else 1.0
    typical = typical.to(mean.device)
    return (dbin >= DOUBT_MIN_DEPTH) & (conf < DOUBT_RATIO * typical[dbin])


def _sq_distance_capped(target: torch.Tensor, reach: int) -> torch.Tensor:
    """Int16, shape of ``target`` (bool): squared Euclidean distance (voxels) from each voxel
    to the nearest ``target`` voxel of the array, exact wherever it is at most ``reach + 0.5``
    (every larger value is some number above that; the caller caps). Three separable min-plus
    passes over offsets ``-reach..reach`` per axis: a nearest point within ``reach + 0.5`` is
    within ``reach`` voxels along every axis, so the passes see it. Outside the array counts
    as no target (as ``scipy.ndimage.distance_transform_edt``)."""
    big = 3 * (reach + 1) ** 2
    d = torch.where(target, 0, big).to(torch.int16)
    for axis in range(3):
        n = d.shape[axis]
        out = d.clone()
        for o in range(1, min(reach, n - 1) + 1):
            add = o * o
            a = d.narrow(axis, o, n - o) + add  # neighbour at +o
            out.narrow(axis, 0, n - o).copy_(torch.minimum(out.narrow(axis, 0, n - o), a))
            b = d.narrow(axis, 0, n - o) + add  # neighbour at -o
            out.narrow(axis, o, n - o).copy_(torch.minimum(out.narrow(axis, o, n - o), b))
        d = out.clamp_(max=big)
    return d


def _depth_bins(side: torch.Tensor) -> torch.Tensor:
    """Int64, shape of ``side`` (the label, bool): each voxel's Euclidean distance (voxels) to
    the other side of the label's boundary, rounded and capped at `DOUBT_MAX_DEPTH` (>= 1;
    ``min(rint(distance_transform_edt), DOUBT_MAX_DEPTH)`` exactly, from integer squared
    distances: ``rint(sqrt(s)) >= b`` iff ``s > b^2 - b``)."""
    s = torch.where(side, _sq_distance_capped(~side, DOUBT_MAX_DEPTH), _sq_distance_capped(side, DOUBT_MAX_DEPTH))
    out = torch.zeros(side.shape, dtype=torch.int64, device=side.device)
    for b in range(1, DOUBT_MAX_DEPTH + 1):
        out += s > b * b - b
    return out


def _model_profile_conf(q: torch.Tensor, dbin: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``(M, X, Y, Z)``: each model's confidence ``|2p - 1|`` divided by that model's
    typical (median) confidence at the same depth from the label's boundary (``dbin``, from
    `_depth_bins`), capped at 1.5. The typical value is taken over ``where`` (bool; all voxels
    if None): `suspect_regions` passes the voxels where the models agree, so that a large error
    does not lower the typical confidence of its own depth. A sharp model and a soft one become
    comparable, and a model near the boundary is not "unsure" for being near it. Exact
    medians via a histogram of the 256 uint8 confidence levels per depth."""
    nb = DOUBT_MAX_DEPTH + 1
    base = dbin * 256
    levels = torch.arange(256, dtype=torch.float64, device=q.device)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for m in range(q.shape[0]):
        key = base + torch.abs(2 * q[m].to(torch.int16) - 255)  # depth * 256 + |2p - 1| * 255
        hist = torch.bincount((key if where is None else key[where]).reshape(-1), minlength=nb * 256).reshape(nb, 256)
        cum = torch.cumsum(hist, dim=1)
        half = (cum[:, -1] + 1) // 2
        typical = torch.searchsorted(cum, half[:, None]).reshape(-1).to(torch.float64)
        typical = torch.where(cum[:, -1] > 0, typical, 255.0)
        # (depth, level) -> level / typical(depth), capped: divided in float64, then float32
        table = torch.clamp(levels[None, :] / torch.clamp(typical, min=1.0)[:, None], max=1.5).to(torch.float32)
        out[m] = table.reshape(-1)[key]
    return out


def _open(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    return binary_opening(mask, iterations) if iterations else mask


def suspect_regions(
    q: npt.NDArray[np.uint8] | torch.Tensor, label: npt.NDArray[np.bool_] | torch.Tensor, voxel_ml: float
) -> tuple[npt.NDArray[np.bool_], dict[str, float]]:
    """Enhanced attention of one organ: the compact regions where the ensemble's label is
    likely wrong. ``q``: uint8 ``(M, X, Y, Z)`` soft predictions ``p*255`` as the models gave
    them (a crop); ``label``: bool ``(X, Y, Z)``. Returns a bool ``(X, Y, Z)`` numpy mask and its
    evidence (ml per kind). Runs in torch on ``q``'s device (the segmentation pipeline's GPU);
    the connected components are labelled on the CPU (scipy). Bit-exact against the numpy +
    scipy original kept as the oracle in atlasflow.testing.suspect_regions_numpy.

    Two kinds of evidence, each opened (3x3x3, once; `UNSURE_OPENING` times for the unsure
    voxels) so that the boundary wobble of ordinary models drops out, then joined into 26-connected candidate components:

    - contested: the models take different sides of 0.5. The ensemble follows the majority;
      it is suspect where the outvoted models are MORE sure of their side than the winners of
      theirs (mean over the outvoted minus mean over the winners >= `ASYMMETRY_MIN`, of each
      model's confidence ``|2p - 1|`` relative to its own typical confidence at that depth
      from the label's boundary where the models agree, `_model_profile_conf`): a model that
      errs alone is usually an unsure one, and two unsure models outvoting a sure one is how
      an ensemble goes wrong. Raw confidences made a sure model that errs alone look like the
      sure dissenter of an erring majority wherever the right models were near their own
      boundary (and so less sure): one confident model swapping the kidneys flagged both;
    - unsure agreement: every model takes the same side but the mean probability lies in
      `UNSURE_BAND`, over a region thick enough to survive the opening: models that share an
      error and doubt it (disagreement terms are blind there by construction). These voxels
      shape the candidates; their evidence is only the part where the ensemble doubts MORE
      than its own boundary profile predicts at that distance from the label's boundary
      (`_doubt_beyond_profile`): a thin organ (pancreas, a narrow liver lobe) is in the band
      all over because no voxel is far from its boundary, not because its label is wrong.

    A component is kept when at least `EVIDENCE_FRACTION` of its voxels are suspect-contested
    voxels and it holds >= `SUSPECT_MIN_ML`, or when that share is reached with the
    suspect-contested plus beyond-profile doubting voxels and it also holds >=
    `UNSURE_MIN_VOXELS` (thick boundary bands of unsure but right models make smaller ones), or
    when at least `UNSURE_SMALL_FRACTION` of it is such evidence. A kept component then grows
    back `SUSPECT_GROW` voxels into the raw contested and unsure voxels around it (what the
    opening stripped). Constants tuned on the simulator's seeds 0-99 and forced-kind variants
    of 0-49 (never on the report blocks 100-299)."""
    q = torch.as_tensor(q)
    side = torch.as_tensor(label, device=q.device).to(torch.bool)
    m = q.shape[0]
    p = q.to(torch.float32) / 255.0
    dec = q >= 128
    votes = dec.sum(dim=0)
    mean = p[0].clone()
    for pm in p[1:]:
        mean += pm  # numpy's axis-0 order: ((p0 + p1) + p2) / m in float32
    mean /= m
    contested = (votes > 0) & (votes < m)
    dbin = _depth_bins(side)
    conf = _model_profile_conf(q, dbin, ~contested)
    agree = dec == side[None]
    n_agree = agree.sum(dim=0)
    s_agree = conf[0] * agree[0]
    s_out = conf[0] * ~agree[0]
    for c, a in zip(conf[1:], agree[1:]):
        s_agree += c * a
        s_out += c * ~a
    c_agree = s_agree.to(torch.float64) / torch.clamp(n_agree, min=1)
    c_out = s_out.to(torch.float64) / torch.clamp(m - n_agree, min=1)
    suspect_c = contested & (c_out - c_agree >= ASYMMETRY_MIN)
    unsure = ~contested & (mean > UNSURE_BAND[0]) & (mean < UNSURE_BAND[1])  # shapes the candidates
    doubt = unsure & _doubt_beyond_profile(mean, dbin)  # is the evidence
    cand = _open(contested, 1) | _open(unsure, UNSURE_OPENING)
    lab_np, n = ndimage.label(cand.cpu().numpy(), structure=CUBE)  # components on the CPU (C)
    if n == 0:
        return np.zeros(tuple(side.shape), dtype=bool), {"contested_ml": 0.0, "unsure_ml": 0.0}
    lab = torch.from_numpy(lab_np.astype(np.int64, copy=False)).to(q.device)
    total = torch.bincount(lab.reshape(-1), minlength=n + 1)
    ev_c = torch.bincount(lab[suspect_c], minlength=n + 1)
    ev_u = torch.bincount(lab[doubt & cand], minlength=n + 1)
    total64 = total.to(torch.float64)  # the thresholds in float64, as numpy compares them
    big = total64 * voxel_ml >= SUSPECT_MIN_ML
    keep = big & (ev_c >= EVIDENCE_FRACTION * total64)
    keep |= big & (total >= UNSURE_MIN_VOXELS) & ((ev_c + ev_u) >= EVIDENCE_FRACTION * total64)
    keep |= big & ((ev_c + ev_u) >= UNSURE_SMALL_FRACTION * total64)
    keep[0] = False
    out = keep[lab]
    if SUSPECT_GROW and bool(out.any()):  # grow back what the opening stripped (see SUSPECT_GROW)
        room = contested | unsure
        for _ in range(SUSPECT_GROW):
            out = out | (binary_dilation(out, 1) & room)
    return out.cpu().numpy(), {
        "contested_ml": float((suspect_c & out).sum()) * voxel_ml,
        "unsure_ml": float((doubt & out).sum()) * voxel_ml,
    }
