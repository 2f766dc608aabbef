"""Independent simulator families for judging ranking strategies on error models they were
not tuned on (issue 18; benchmarks/bench_ranking.py, leave-one-family-out).

Each family is one module in this folder that registers itself (`base.register_family`) and
keeps its parameters in ``params/<name>.json`` (written down, and committed, before any
ranking was run on it; the module docstring says the same in words). Importing this package
imports every module here, so adding a family touches no other file.

    from atlasflow.testing.sim_families import family_names, get_family
    case = get_family("soft_blur").simulate(7)   # an error_sim.SimCase
"""

from __future__ import annotations

import importlib
import pkgutil

from atlasflow.testing.sim_families.base import (
    GRID_MM,
    ParametricFamily,
    Plan,
    SimFamily,
    family_names,
    get_family,
    load_params,
    register_family,
)

_NOT_FAMILIES = {"base", "engine"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _NOT_FAMILIES and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "GRID_MM",
    "ParametricFamily",
    "Plan",
    "SimFamily",
    "family_names",
    "get_family",
    "load_params",
    "register_family",
]
