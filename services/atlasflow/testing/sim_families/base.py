"""The simulator-family interface, its registry, and `ParametricFamily`, the composition most
families share (anatomy -> errors -> three models' soft predictions), driven by the family's
JSON parameters.

A family is an object with ``name``, ``params`` (its committed JSON, parameters decided before
any ranking was run on it) and ``simulate(seed) -> SimCase`` (deterministic in ``seed``), and
``plan(seed)``: the case's drawn design (anatomy source, phase, errors: kind, organ slot, how
many models share it, confidence) without building volumes, so the documented error mix can be
checked cheaply. A family module registers itself with ``@register_family``; the package imports
every module in this folder, so a new family is one new module + its JSON (nothing else
changes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from atlasflow.common.organs import ORGANS
from atlasflow.testing.error_sim import SimCase
from atlasflow.testing.sim_families.engine import (
    KL,
    KR,
    ErrorPlan,
    Model,
    anatomy_pool,
    build_case,
    smooth_noise,
    vary_anatomy,
)

PARAMS_DIR = Path(__file__).resolve().parent / "params"
#: The working grid (mm, in plane; slices at least this thick) of the engine's anatomy pool:
#: an evaluation setting shared by every family (small volumes for a 2-core CPU), fixed with them.
GRID_MM = 4.5
#: An organ needs this many voxels on the varied grid to be chosen for an error.
MIN_ORGAN_VOXELS = 20


@dataclass
class Plan:
    """A case's drawn design: ``source`` (anatomy pool name), ``n_errors``, per error ``kinds``,
    ``organ_u`` (uniform draws that pick the organ among those present), ``shared``,
    ``confidence``; ``extra``: family-specific draws (phase, calibration order, ...)."""

    source: str
    kinds: list[str]
    organ_u: list[float]
    shared: list[int]
    confidence: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


class SimFamily(Protocol):
    """A simulator family (see module doc)."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def plan(self, seed: int) -> Plan: ...

    def simulate(self, seed: int) -> SimCase: ...


_F = TypeVar("_F", bound=Callable[[], SimFamily])
_FAMILIES: dict[str, Callable[[], SimFamily]] = {}


def register_family(name: str) -> Callable[[_F], _F]:
    """Decorator: register a zero-argument family factory under ``name`` (once)."""

    def add(factory: _F) -> _F:
        if name in _FAMILIES:
            raise ValueError(f"simulator family {name!r} is already registered")
        _FAMILIES[name] = factory
        return factory

    return add


def family_names() -> tuple[str, ...]:
    """Registered families, sorted by name."""
    return tuple(sorted(_FAMILIES))


def get_family(name: str) -> SimFamily:
    """A new instance of the family registered as ``name`` (KeyError naming the known ones)."""
    if name not in _FAMILIES:
        raise KeyError(f"unknown simulator family {name!r} (registered: {', '.join(family_names())})")
    fam = _FAMILIES[name]()
    if fam.name != name:
        raise ValueError(f"family registered as {name!r} calls itself {fam.name!r}")
    return fam


def load_params(name: str) -> dict[str, Any]:
    """The committed JSON parameters of family ``name`` (``params/<name>.json``)."""
    data: dict[str, Any] = json.loads((PARAMS_DIR / f"{name}.json").read_text())
    if data.get("name") != name:
        raise ValueError(f"params/{name}.json names {data.get('name')!r}")
    return data


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = sorted(weights)
    w = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


class ParametricFamily:
    """The shared composition, configured by ``params`` (schema: ``anatomy`` {pool weights,
    scale, shift_vox, fov_cut_p, fov_cut_max}; ``models`` {per-model ranges of sharp,
    temperature, ceiling, floor, blur; white, noise_sigma, noise_amp, cutoff}; ``errors``
    {clean_p, count weights, kinds weights, size per kind, shared weights, confidence range,
    organ_weights (optional, organ name -> weight)}). Subclasses override `draw_extra`,
    `models_for` and `organ_sharp` for what is their own."""

    name = ""

    def __init__(self) -> None:
        self.params = load_params(self.name)

    # -- hooks
    def draw_extra(self, rng: np.random.Generator) -> dict[str, Any]:
        """Family-specific per-case draws (made after the errors are planned)."""
        return {}

    def organ_sharp(self, plan: Plan) -> dict[int, float]:
        """Per-organ multiplier of the models' boundary sharpness (1 = as the models')."""
        return {}

    def organ_weights(self, plan: Plan) -> dict[int, float]:
        """Relative chance that an error lands on each organ (default: ``errors.organ_weights``
        or uniform)."""
        w = self.params["errors"].get("organ_weights") or {}
        return {k: float(w.get(n, 1.0)) for k, n in ORGANS.items()}

    def models_for(self, plan: Plan, rng: np.random.Generator, shape: tuple[int, int, int]) -> list[Model]:
        """The three models of a case, each drawn from the ``models`` ranges."""
        mp = self.params["models"]
        out = []
        for _ in range(3):
            out.append(
                Model(
                    sharp=float(rng.uniform(*mp["sharp"])),
                    temperature=float(rng.uniform(*mp["temperature"])),
                    ceiling=float(rng.uniform(*mp["ceiling"])),
                    floor=float(rng.uniform(*mp["floor"])),
                    blur=float(rng.uniform(*mp["blur"])),
                    white=float(mp["white"]),
                    cutoff=float(mp["cutoff"]),
                    noise=smooth_noise(shape, rng, float(mp["noise_sigma"]), float(mp["noise_amp"])),
                    rng_seed=int(rng.integers(0, 2**31)),
                )
            )
        return out

    # -- the protocol
    def plan(self, seed: int) -> Plan:
        rng = np.random.default_rng([seed, 0])
        ep = self.params["errors"]
        source = _choice(rng, self.params["anatomy"]["pool"])
        n = 0 if rng.random() < ep["clean_p"] else int(_choice(rng, ep["count"]))
        kinds = [_choice(rng, ep["kinds"]) for _ in range(n)]
        organ_u = [float(rng.random()) for _ in range(n)]
        shared = [int(_choice(rng, ep["shared"])) for _ in range(n)]
        confidence = [float(rng.uniform(*ep["confidence"])) for _ in range(n)]
        return Plan(source, kinds, organ_u, shared, confidence, self.draw_extra(rng))

    def simulate(self, seed: int) -> SimCase:
        plan = self.plan(seed)
        rng = np.random.default_rng([seed, 1])
        base, aff0 = anatomy_pool(GRID_MM)[plan.source]
        truth, affine, ainfo = vary_anatomy(base, aff0, rng, self.params["anatomy"])
        counts = np.bincount(truth.ravel(), minlength=10)
        present = [k for k in ORGANS if counts[k] >= MIN_ORGAN_VOXELS]
        weights = self.organ_weights(plan)
        errors: list[ErrorPlan] = []
        for kind, u, shared, conf in zip(plan.kinds, plan.organ_u, plan.shared, plan.confidence):
            if kind == "swap" and not (KL in present and KR in present):
                kind = "leak"  # no kidney pair in this anatomy (the dicom slab, a cut FOV)
            cand = [k for k in present if k not in {e.organ for e in errors}]
            if kind == "swap":
                organ = KL
            elif not cand:
                continue
            else:
                w = np.cumsum([weights.get(k, 1.0) for k in cand])
                organ = cand[int(np.searchsorted(w, u * w[-1], side="right").clip(0, len(cand) - 1))]
            holders = tuple(int(m) for m in rng.permutation(3)[:shared])
            size = tuple(self.params["errors"]["size"][kind])
            errors.append(ErrorPlan(kind, organ, holders, conf, (float(size[0]), float(size[1]))))
        shape = (int(truth.shape[0]), int(truth.shape[1]), int(truth.shape[2]))
        models = self.models_for(plan, rng, shape)
        info = {"family": self.name, "source": plan.source, **ainfo, **plan.extra}
        return build_case(f"{self.name}-{seed}", truth, affine, models, errors, rng, self.organ_sharp(plan), info)
