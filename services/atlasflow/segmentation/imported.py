"""Imported models (`atlasflow.models.registry`: nnU-Net v2, MONAI bundles) as members of the
served ensembles (torch-free: the service process reads it).

``ATLASFLOW_SEGMENTATION_IMPORTED_MODELS`` (registry names, comma-separated) and
``ATLASFLOW_SEGMENTATION_MODELS_STATE_DIR`` (the registry's state dir) add those models to
every ensemble the service serves; the Triton server is started with the same models
(``triton_server --member NAME --state-dir DIR``): it serves their exported networks and
runs them in the ensemble pipeline (`atlasflow.segmentation.pipeline`, mapped by organ name
with `atlasflow.segmentation.heterogeneous`).

An ensemble with imported members is another Triton model than the ensemble alone:
`served_model_name` appends a digest of the members' names and registry digests
(``abdomen_trio_v1`` -> ``abdomen_trio_v1__with_<sha12>``), so a service and a Triton server
configured with different members (or a re-import with other weights) never silently talk to
each other: the service's calls fail ``TRITON_MODEL_NOT_READY`` instead. The job records the
members as ``<name>@<digest[:12]>`` next to the ensemble's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from atlasflow.common.errors import InvalidArgument

DOMAIN = "atlasflow.segmentation"


@dataclass(frozen=True)
class ImportedMember:
    """A registered model used as an ensemble member: its registry name and digest."""

    name: str
    digest: str

    @property
    def label(self) -> str:
        """How jobs list the member: ``<name>@<digest[:12]>``."""
        return f"{self.name}@{self.digest[:12]}"


def parse_names(value: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (empty entries dropped, order kept, duplicates refused)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise InvalidArgument(
            "INVALID_IMPORTED_MODELS", "an imported model is listed twice", domain=DOMAIN, metadata={"models": value}
        )
    return names


def resolve(state_dir: str | Path, names: Sequence[str]) -> list[ImportedMember]:
    """The registered models ``names`` of ``state_dir`` (manifests read, not the weights
    verified: the Triton server verifies every file when it loads them)."""
    if not names:
        return []
    if not str(state_dir):
        raise InvalidArgument(
            "MODELS_STATE_DIR_NOT_CONFIGURED",
            "imported ensemble members need the model registry's state dir (ATLASFLOW_SEGMENTATION_MODELS_STATE_DIR)",
            domain=DOMAIN,
        )
    from atlasflow.models.registry import ModelRegistry

    registry = ModelRegistry(state_dir)
    return [ImportedMember(n, registry.get(n).digest) for n in names]


def served_model_name(base: str, members: Sequence[ImportedMember]) -> str:
    """The Triton model name of ensemble model ``base`` with ``members`` (``base`` alone
    without members)."""
    if not members:
        return base
    h = hashlib.sha256()
    for m in members:
        h.update(f"{m.name}\0{m.digest}\n".encode())
    return f"{base}__with_{h.hexdigest()[:12]}"
