"""Family ``sure_models``: over-confident models that are sure of their errors (parameters:
``params/sure_models.json``, decided before any ranking ran on this family).

- anatomy: pool force_split 0.6 / upper 0.25 / dicom 0.15; scale 0.85-1.15 per axis; shift
  +-3 voxels; field-of-view cut at each end with probability 0.6, up to 30 % of the slices;
- models: sharpness 1.5-2.5 per voxel, temperature 0.4-0.7 (steeper than the distance implies:
  over-confident), no blur, no white noise, smooth logit noise amplitude 0.6 (sigma 2), cut
  3 voxels outside the mask;
- errors: 25 % clean cases, otherwise one error: missing 0.3 (30-55 % of the extent), leak 0.3
  (ball radius 0.3-0.5 of the organ's cube-root size), shift 0.2 (3-5 voxels), grow 0.1 (2
  voxels), swap 0.1; held by 1/2/3 models with probability 0.2/0.4/0.4; erring models'
  confidence 0.85-1.0.
"""

from __future__ import annotations

from atlasflow.testing.sim_families.base import ParametricFamily, register_family


@register_family("sure_models")
class SureModels(ParametricFamily):
    """The shared composition with this family's JSON (see module doc)."""

    name = "sure_models"
