"""What the segmentation pipeline answers, without torch: the service process (the Triton
client, the worker) imports these; `atlasflow.segmentation.pipeline` produces them.

Organ ids are AbdomenAtlas-8K 1..9 (`atlasflow.common.organs`); per-organ arrays use row ``k``
for organ id ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.organs import NUM_ORGANS

#: = `atlasflow.segmentation.ensemble.DOMAIN` (not imported from there: ensemble imports
#: `atlasflow.method`, whose attention imports torch)
DOMAIN = "atlasflow.segmentation"

STATS_COLUMNS = ("volume_ml", "attention_ml", "heatmap_ml", "component_count")


@dataclass
class PipelineOutput:
    """Result on the INPUT grid (same shape and affine as the input volume).

    labels: ``(X, Y, Z)`` uint8, AbdomenAtlas ids 0..9 (0 = background).
    heatmap: ``(X, Y, Z)`` uint8, 0..255 = attention heatmap 0..1 (max over unlabelled organs;
        the ensemble's ranking strategy's attention, `EnsemblePipeline.strategy`).
    organ_stats: ``(9, 4)`` float64, row k = organ id k+1, columns `STATS_COLUMNS`:
        volume_ml (final label), attention_ml (attention mask), heatmap_ml (sum of the organ's
        heatmap x voxel volume), component_count (26-connected components of the ensemble
        mask before keeping the largest).
    weights_trained: False while any member runs seeded untrained weights.
    """

    labels: np.ndarray
    heatmap: np.ndarray
    organ_stats: np.ndarray
    weights_trained: bool
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)


def labelled_flags(organ_ids: Iterable[int]) -> np.ndarray:
    """Organ ids (1..9) -> ``(9,)`` uint8 flags, flag k for organ id k+1."""
    flags = np.zeros(NUM_ORGANS, dtype=np.uint8)
    for organ in organ_ids:
        if not 1 <= int(organ) <= NUM_ORGANS:
            raise InvalidArgument(
                "UNKNOWN_ORGAN", "organ ids must be 1..9", domain=DOMAIN, metadata={"organ": str(organ)}
            )
        flags[int(organ) - 1] = 1
    return flags
