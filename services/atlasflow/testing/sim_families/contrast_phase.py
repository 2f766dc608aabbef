"""Family ``contrast_phase``: the contrast phase decides which organs the models see well
(parameters: ``params/contrast_phase.json``, decided before any ranking ran on this family).

- phase per case: native 0.4 / arterial 0.3 / portal-venous 0.3; each organ's boundary
  sharpness is the model's times ``phase_sharpness[phase][organ]`` (native: aorta 0.45,
  postcava 0.4, pancreas 0.5, gall bladder 0.7, stomach 0.7, kidneys 0.8, spleen 0.8, liver
  0.9; arterial: postcava 0.5, aorta 1.2, ...; venous: about 1); an error lands on an organ with
  weight ``1 / sharpness^2`` (poorly contrasted organs err more);
- anatomy: pool force_split 0.5 / upper 0.3 / dicom 0.2; scale 0.75-1.25; shift +-6 voxels;
  field-of-view cut at each end with probability 0.4, up to 20 %;
- models: sharpness 1.2-2.5, temperature 0.8-1.2, blur 0-0.7 voxels, smooth logit noise
  amplitude 1.0, cut 4 voxels outside;
- errors: 25 % clean cases, otherwise one: leak 0.4 (radius 0.2-0.4), missing 0.3 (20-45 %),
  shift 0.3 (2-4 voxels); held by 1/2/3 models alike; confidence 0.4-1.0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atlasflow.common.organs import ORGANS
from atlasflow.testing.sim_families.base import ParametricFamily, Plan, _choice, register_family


@register_family("contrast_phase")
class ContrastPhase(ParametricFamily):
    """Phase-dependent organ sharpness and error organs (see module doc)."""

    name = "contrast_phase"

    def draw_extra(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"phase": _choice(rng, self.params["phase"])}

    def organ_sharp(self, plan: Plan) -> dict[int, float]:
        table = self.params["phase_sharpness"][plan.extra["phase"]]
        return {k: float(table[n]) for k, n in ORGANS.items()}

    def organ_weights(self, plan: Plan) -> dict[int, float]:
        return {k: 1.0 / s**2 for k, s in self.organ_sharp(plan).items()}
