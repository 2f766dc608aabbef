"""Family ``error_sim``: the error-detection benchmark's simulator (`atlasflow.testing.error_sim`)
as it is, on a coarser grid (parameters: ``params/error_sim.json``).

- anatomy: error_sim's own (80 % the force-split map, 20 % the DICOM slab; scale 0.85-1.15 per
  axis, shift +-4 voxels, 0-25 % of the slices off either end with probability 0.5 each), drawn
  with ``size_scale = grid_factor`` (0.6667) and the affine's spacing divided by it: the same
  anatomy in ml on voxels 1.5x as large;
- one error per case, kind uniform over leak / missing / island / swap / shift (swap -> leak
  without a kidney pair), held by 1, 2 or 3 models (uniform), erring models' confidence
  0.3-1.0; models: sigmoid of the signed distance, sharpness 1.2-2.5 per voxel, smooth logit
  noise (sigma 2, amplitude 1.2), cut 4 voxels outside the mask; no clean cases by design (a
  1-model error leaves the ensemble unchanged: those cases are the negatives).

``enhanced`` was tuned on this simulator (seeds 0-99, full resolution): its seeds here start at
``seed_offset`` (10000), and its held-out figures are the ones most favourable to enhanced.
``plan`` simulates the case (error_sim draws its design and its volumes from one stream).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atlasflow.testing.error_sim import SimCase, simulate_case
from atlasflow.testing.sim_families.base import Plan, load_params, register_family


@register_family("error_sim")
class ErrorSimFamily:
    """error_sim.simulate_case on the coarser grid (see module doc)."""

    name = "error_sim"

    def __init__(self) -> None:
        self.params: dict[str, Any] = load_params(self.name)

    def simulate(self, seed: int) -> SimCase:
        g = float(self.params["grid_factor"])
        c = simulate_case(seed, size_scale=g)
        aff = np.asarray(c.affine, dtype=np.float64).copy()
        aff[:3, :3] /= g
        c.affine = aff
        c.ct = None
        c.name = f"{self.name}-{seed}"
        c.extra = {**c.extra, "family": self.name}
        return c

    def plan(self, seed: int) -> Plan:
        c = self.simulate(seed)
        return Plan(
            str(c.extra.get("source")), [c.error], [0.0], [c.shared], [float(str(c.extra.get("confidence", 1.0)))]
        )
