"""Family ``soft_blur``: under-confident, blurred, noisy models with small, doubted errors
(parameters: ``params/soft_blur.json``, decided before any ranking ran on this family).

- anatomy: pool force_split 0.6 / upper 0.25 / dicom 0.15; scale 0.9-1.1; shift +-2 voxels;
  field-of-view cut at each end with probability 0.3, up to 15 %;
- models: sharpness 1.0-2.0, temperature 1.5-2.5 (flat), p scaled into [floor 0-0.03,
  ceiling 0.75-0.95], Gaussian blur 1-2 voxels, white noise std 0.03 on p, smooth logit noise
  amplitude 1.5 (sigma 2.5), cut 5 voxels outside the mask;
- errors: 30 % clean cases, otherwise one: fragment 0.3 (detached ball, radius 0.15-0.3 of the
  cube-root size), missing 0.25 (10-25 %), shrink 0.15 (1 voxel), grow 0.1 (1 voxel), leak 0.2
  (radius 0.15-0.3); held by 1/2/3 models with probability 0.3/0.5/0.2; confidence 0.2-0.6.
"""

from __future__ import annotations

from atlasflow.testing.sim_families.base import ParametricFamily, register_family


@register_family("soft_blur")
class SoftBlur(ParametricFamily):
    """The shared composition with this family's JSON (see module doc)."""

    name = "soft_blur"
