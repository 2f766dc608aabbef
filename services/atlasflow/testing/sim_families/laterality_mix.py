"""Family ``laterality_mix``: mixed calibration across the three models and one or two errors
per case, mostly left/right swaps and fragments (parameters: ``params/laterality_mix.json``,
decided before any ranking ran on this family).

- anatomy: pool force_split 0.75 / upper 0.25 (both hold the kidney pair); scale 0.85-1.15;
  shift +-4 voxels; field-of-view cut at each end with probability 0.3, up to 20 %;
- models: drawn as sharpness 1.2-2.2, temperature 0.9-1.1, blur 0-0.5, smooth logit noise
  amplitude 1.0, cut 4 voxels outside; then per case, in random order, one model is made
  over-confident (temperature 0.5), one under-confident (temperature 2.0, ceiling 0.85), one
  stays as drawn;
- errors: 25 % clean cases, otherwise 1 (0.6) or 2 (0.4) errors on different organs: swap 0.35
  (a second swap in a case becomes a fragment), fragment 0.35 (radius 0.2-0.4 of the cube-root
  size), shift 0.15 (2-4 voxels), missing 0.15 (25-45 %); held by 1/2/3 models with
  probability 0.2/0.4/0.4; confidence 0.5-1.0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from atlasflow.testing.sim_families.base import ParametricFamily, Plan, register_family
from atlasflow.testing.sim_families.engine import Model


@register_family("laterality_mix")
class LateralityMix(ParametricFamily):
    """Mixed per-model calibration, swaps and fragments (see module doc)."""

    name = "laterality_mix"

    def plan(self, seed: int) -> Plan:
        p = super().plan(seed)
        if p.kinds.count("swap") > 1:
            first = p.kinds.index("swap")
            p.kinds = [k if k != "swap" or i == first else "fragment" for i, k in enumerate(p.kinds)]
        return p

    def draw_extra(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"roles": [str(r) for r in rng.permutation(["over", "as_drawn", "under"])]}

    def models_for(self, plan: Plan, rng: np.random.Generator, shape: tuple[int, int, int]) -> list[Model]:
        roles = self.params["calibration_roles"]
        out = []
        for m, role in zip(super().models_for(plan, rng, shape), plan.extra["roles"]):
            out.append(replace(m, **roles[role]) if role in roles else m)
        return out
