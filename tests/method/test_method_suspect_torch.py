"""The enhanced attention's suspect regions run in torch where the soft predictions are
(`atlasflow.method.suspect.suspect_regions`); the numpy + scipy original
(atlasflow.testing.suspect_regions_numpy) is the oracle: same masks and evidence, bit for bit, on
simulated cases of every error kind, and the capped distance bins equal scipy's Euclidean
distance transform, at the array's edges too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from atlasflow.method import suspect as P
from atlasflow.method.attention import case_attention
from atlasflow.testing import error_sim
from atlasflow.testing import suspect_regions_numpy as oracle


def test_depth_bins_equal_scipy_edt_including_edges_and_thin_parts() -> None:
    rng = np.random.default_rng(3)
    shapes = [
        ndimage.gaussian_filter(rng.standard_normal((40, 36, 30)), s) > t for s, t in ((3, 0.0), (1.5, 0.1), (5, 0.02))
    ]
    plate = np.zeros((30, 30, 20), dtype=bool)
    plate[:, 3:27, 9:11] = True  # touches two faces of the array, two voxels thick
    big = np.zeros((30, 30, 30), dtype=bool)
    big[1:29, 1:29, 1:29] = True  # interior depths well beyond the cap
    for side in [*shapes, plate, big]:
        assert side.any() and not side.all()  # (without both sides scipy's transform is undefined)
        assert np.array_equal(P._depth_bins(torch.from_numpy(side)).numpy(), oracle._depth_bins(side))


@pytest.mark.parametrize("kind", [None, *error_sim.ERRORS])
def test_suspect_regions_equal_the_numpy_original(kind: str | None) -> None:
    seeds = (33, 68, 87) if kind is None else (14, 33)
    compared = 0
    for seed in seeds:
        c = (
            error_sim.simulate_case(seed)
            if kind is None
            else error_sim.simulate_case(seed, error=kind, size_scale=0.7, shared=2, confidence=0.4)
        )
        ca = case_attention({k: torch.from_numpy(v) for k, v in c.probs.items()})
        vml = abs(float(np.linalg.det(c.affine[:3, :3]))) / 1000.0
        for k, r in ca.organs.items():
            if r.probs is None or r.ensemble is None:
                continue
            want, want_ev = oracle.suspect_regions_numpy(r.probs.numpy(), r.ensemble.numpy(), vml)
            got, got_ev = P.suspect_regions(r.probs, r.ensemble, vml)
            assert got.dtype == np.bool_ and np.array_equal(got, want), (seed, k)
            assert got_ev == want_ev, (seed, k)
            compared += int(want.any())
    if kind != "island":  # (these small islands draw no attention at this size: equal, and empty)
        assert compared > 0  # some organ of these cases has attention: the comparison is not all-empty
