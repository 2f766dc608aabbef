"""The population prior of organ geometry: per organ ``ln(volume)``, centroid offsets between
organs and the left/right kidney volume ratio, as running statistics updatable case by case,
and its JSON persistence. The bundled prior (`PRIOR_PATH`, ``plausibility_prior.json`` next to
this module, shipped in the wheel) is built from the bundled label maps
(``python -m atlasflow.testing.error_sim --write-prior``); the ranking service updates a copy with the
human-decided organs of stored cases (`atlasflow.ranking.prior`).

Conventions: volumes in ml, centroids in RAS+ mm (``affine``: 4x4 voxel -> RAS+ mm, nibabel
convention), organ ids AbdomenAtlas-8K 1..9 (`atlasflow.common.organs`). An organ "cut by the
FOV" touches the first or last slice along the slice axis (the voxel axis closest to S).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from atlasflow.common.organs import ORGAN_IDS, ORGANS
from atlasflow.method.geometry import measure_labels

PRIOR_PATH = Path(__file__).with_name("plausibility_prior.json")


class OrganMeasure(Protocol):
    """What `PopulationPrior.update` reads from an organ: `atlasflow.method.geometry.OrganGeometry`
    or a stored summary of it (`atlasflow.ranking.prior.OrganSummary`)."""

    @property
    def volume_ml(self) -> float: ...

    @property
    def centroid_mm(self) -> Sequence[float] | npt.NDArray[np.float64]: ...

    @property
    def fov_cut(self) -> bool: ...


@dataclass
class Running:
    """Running mean / variance (Welford): ``n``, ``mean``, ``m2``."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def std(self, floor: float) -> float:
        var = self.m2 / (self.n - 1) if self.n > 1 else 0.0
        return max(math.sqrt(max(var, 0.0)), floor)

    def to_list(self) -> list[float]:
        return [self.n, round(self.mean, 6), round(self.m2, 6)]

    @classmethod
    def from_list(cls, v: list[float]) -> Running:
        return cls(int(v[0]), float(v[1]), float(v[2]))


@dataclass
class PopulationPrior:
    """Population statistics of organ geometry, updatable case by case.

    ``log_volume[k]``: ln(ml) of organ k (organs not cut by the FOV only);
    ``offset[(k, j)][a]``: centroid_k - centroid_j along RAS axis a, mm (S only when neither is cut);
    ``kidney_log_ratio``: ln(V_left / V_right) (neither cut). Standard deviations have floors
    (`log_volume_floor`, `offset_floor_mm`) so that a thin prior never claims certainty.
    """

    log_volume: dict[int, Running] = field(default_factory=dict)
    offset: dict[tuple[int, int], list[Running]] = field(default_factory=dict)
    kidney_log_ratio: Running = field(default_factory=Running)
    cases: int = 0
    log_volume_floor: float = 0.25
    offset_floor_mm: float = 15.0
    notes: str = ""

    # -- updates
    def update(self, geoms: Mapping[int, OrganMeasure]) -> None:
        """Add one case's organ geometry (from `measure_labels` / `measure_masks`)."""
        self.cases += 1
        for k, g in geoms.items():
            if g.volume_ml <= 0:
                continue
            if not g.fov_cut:
                self.log_volume.setdefault(k, Running()).add(math.log(g.volume_ml))
            for j, h in geoms.items():
                if j == k or h.volume_ml <= 0:
                    continue
                runs = self.offset.setdefault((k, j), [Running(), Running(), Running()])
                for a in range(3):
                    if a == 2 and (g.fov_cut or h.fov_cut):
                        continue
                    runs[a].add(float(g.centroid_mm[a] - h.centroid_mm[a]))
        left, right = geoms.get(ORGAN_IDS["kidney_left"]), geoms.get(ORGAN_IDS["kidney_right"])
        if left and right and left.volume_ml > 0 and right.volume_ml > 0 and not (left.fov_cut or right.fov_cut):
            self.kidney_log_ratio.add(math.log(left.volume_ml / right.volume_ml))

    def update_from_labels(self, labels: npt.NDArray[np.integer[Any]], affine: npt.NDArray[np.float64]) -> None:
        """Add one stored label map (``(X, Y, Z)`` AbdomenAtlas ids 0..9, voxel -> RAS mm)."""
        self.update(measure_labels(labels, affine))

    # -- queries
    def volume_z(self, k: int, volume_ml: float) -> float | None:
        r = self.log_volume.get(k)
        if r is None or r.n < 2 or volume_ml <= 0:
            return None
        return (math.log(volume_ml) - r.mean) / r.std(self.log_volume_floor)

    def median_volume_ml(self, k: int) -> float | None:
        r = self.log_volume.get(k)
        return None if r is None or r.n < 2 else math.exp(r.mean)

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "atlasflow.plausibility_prior/1",
            "cases": self.cases,
            "notes": self.notes,
            "log_volume_floor": self.log_volume_floor,
            "offset_floor_mm": self.offset_floor_mm,
            "log_volume": {ORGANS[k]: r.to_list() for k, r in sorted(self.log_volume.items())},
            "offset": {
                f"{ORGANS[k]}-{ORGANS[j]}": [r.to_list() for r in runs] for (k, j), runs in sorted(self.offset.items())
            },
            "kidney_log_ratio": self.kidney_log_ratio.to_list(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PopulationPrior:
        p = cls(
            cases=int(d.get("cases", 0)),
            notes=str(d.get("notes", "")),
            log_volume_floor=float(d.get("log_volume_floor", 0.25)),
            offset_floor_mm=float(d.get("offset_floor_mm", 15.0)),
        )
        p.log_volume = {ORGAN_IDS[n]: Running.from_list(v) for n, v in d.get("log_volume", {}).items()}
        for key, runs in d.get("offset", {}).items():
            a, b = key.split("-")
            p.offset[(ORGAN_IDS[a], ORGAN_IDS[b])] = [Running.from_list(v) for v in runs]
        p.kidney_log_ratio = Running.from_list(d.get("kidney_log_ratio", [0, 0.0, 0.0]))
        return p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> PopulationPrior:
        """The prior at ``path``, or the bundled one (`PRIOR_PATH`)."""
        return cls.from_dict(json.loads(Path(path or PRIOR_PATH).read_text()))
