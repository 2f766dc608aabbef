"""What a case's attention asks of a reviewer: checked organ attention summaries, the case
priority and the organ bit mask (no grpc, no SQL).

Case priority (DESIGN.md, AbdomenAtlas `create_attention.py`): the total attention volume, in
ml, over the organs the case's source did NOT label (partial-label template); per case, organs
are ordered by heatmap mass (ml) descending. Volumes are in ml, never voxel counts, so cases of
different spacing compare fairly. When the attention library gives organs a `score` (the
enhanced strategy), the priority is the sum of the scores (unset = 0) over the unlabelled organs
instead.
Organs a human decided (see `atlasflow.ranking.label_versions`) leave the priority like
source-labelled ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import ORGANS
from atlasflow.ranking.entries import DOMAIN, AttentionPointer, OrganAttention

MAX_REASONS = 32
MAX_REASON_CHARS = 256
MAX_FEATURES = 64
MAX_FEATURE_NAME_CHARS = 64


def invalid_attention(message: str, **metadata: str) -> InvalidArgument:
    """InvalidArgument("INVALID_ATTENTION") for a malformed attention submission."""
    return InvalidArgument("INVALID_ATTENTION", message, domain=DOMAIN, metadata=metadata)


def _finite_nonneg(*values: float) -> bool:
    return all(math.isfinite(v) and v >= 0.0 for v in values)


def _validate_pointer(p: AttentionPointer, organ: int) -> AttentionPointer:
    vmin = tuple(int(v) for v in p.voxel_min)
    vmax = tuple(int(v) for v in p.voxel_max)
    wmin = tuple(float(v) for v in p.world_min_mm)
    wmax = tuple(float(v) for v in p.world_max_mm)
    first, last = (int(v) for v in p.slices)
    ok = (
        len(vmin) == len(vmax) == len(wmin) == len(wmax) == 3
        and all(0 <= a <= b for a, b in zip(vmin, vmax))
        and all(math.isfinite(a) and math.isfinite(b) and a <= b for a, b in zip(wmin, wmax))
        and 0 <= first <= last
    )
    if not ok:
        raise invalid_attention(
            "pointer box must be ordered (min <= max), voxel indices >= 0, mm finite", organ=str(organ)
        )
    return AttentionPointer(
        (vmin[0], vmin[1], vmin[2]),
        (vmax[0], vmax[1], vmax[2]),
        (wmin[0], wmin[1], wmin[2]),
        (wmax[0], wmax[1], wmax[2]),
        (first, last),
    )


def validate_organs(organs: Iterable[OrganAttention]) -> tuple[OrganAttention, ...]:
    """Check organ ids (1..9, no repeats), volumes and scores (finite, >= 0), reasons (at most
    32, each printable and at most 256 characters), features (at most 64, names printable and at
    most 64 characters, values finite) and pointers; return them ordered by
    heatmap_ml descending, ties by organ id. Raises InvalidArgument("INVALID_ATTENTION")."""
    out: list[OrganAttention] = []
    seen: set[int] = set()
    for oa in organs:
        organ = int(oa.organ)
        if organ not in ORGANS:
            raise invalid_attention("organ must be one of the nine AbdomenAtlas organs", organ=str(oa.organ))
        if organ in seen:
            raise invalid_attention("organ listed twice", organ=str(organ))
        seen.add(organ)
        values = (float(oa.attention_ml), float(oa.heatmap_ml), float(oa.volume_ml))
        if not _finite_nonneg(*values):
            raise invalid_attention("attention volumes must be finite and >= 0 ml", organ=str(organ))
        score = None if oa.score is None else float(oa.score)
        if score is not None and not _finite_nonneg(score):
            raise invalid_attention("organ score must be finite and >= 0", organ=str(organ))
        reasons = tuple(str(r) for r in oa.reasons)
        if len(reasons) > MAX_REASONS or any(
            not r or len(r) > MAX_REASON_CHARS or not r.isprintable() for r in reasons
        ):
            raise invalid_attention(
                f"at most {MAX_REASONS} reasons, each 1-{MAX_REASON_CHARS} printable characters", organ=str(organ)
            )
        pointer = None if oa.pointer is None else _validate_pointer(oa.pointer, organ)
        features = dict(oa.features)
        if len(features) > MAX_FEATURES or any(
            not (0 < len(k) <= MAX_FEATURE_NAME_CHARS and k.isprintable()) or not math.isfinite(float(x))
            for k, x in features.items()
        ):
            raise invalid_attention(
                f"at most {MAX_FEATURES} features, names 1-{MAX_FEATURE_NAME_CHARS} printable characters,"
                " values finite",
                organ=str(organ),
            )
        out.append(
            OrganAttention(
                organ,
                *values,
                reasons=reasons,
                pointer=pointer,
                score=score,
                features={str(k): float(x) for k, x in features.items()},
            )
        )
    return tuple(sorted(out, key=lambda o: (-o.heatmap_ml, o.organ)))


def _contributions(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> dict[int, float]:
    organs = list(organs)
    known = {int(o) for o in labelled_organs}
    scored = any(o.score is not None for o in organs)
    return {
        int(o.organ): float((o.score or 0.0) if scored else o.attention_ml) for o in organs if int(o.organ) not in known
    }


def case_priority(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> float:
    """Total attention_ml (ml) over the organs NOT labelled by the case's source.

    organs: per-organ attention summaries; labelled_organs: organ ids the source dataset
    labelled (their labels are trusted, so their attention does not call for review). When any
    organ carries a `score`, the scores (unset = 0) are summed instead of attention_ml.
    """
    return float(math.fsum(_contributions(organs, labelled_organs).values()))


def attention_mask(organs: Iterable[OrganAttention], labelled_organs: Iterable[int]) -> int:
    """Bit mask (bit o = organ id o) of the organs contributing > 0 to the priority."""
    mask = 0
    for organ, value in _contributions(organs, labelled_organs).items():
        if value > 0.0:
            mask |= 1 << organ
    return mask
