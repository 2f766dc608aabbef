"""Content-addressed ensemble versions made by fine-tuning, with their model cards.

A version id is ``sha256`` over the canonical JSON of {member name -> weights digest, the
training manifest's digest, the code version (`code_version`), the hyperparameters, the parent
version}; its name is ``<parent family>-ft-<first 12 hex>`` (e.g. ``abdomen-trio-ft-3f2a…``),
which is also its Triton model name after `triton_model_name`.

Layout under the state dir (next to the weights the segmentation service loads)::

    <state>/versions/<name>/ensemble.json    the parent's ensemble file, version = <name>,
                                             checkpoints -> the files below (relative)
    <state>/versions/<name>/<member>.pt      fp32 state_dict per member
    <state>/versions/<name>/model_card.json  data (manifest digest, case counts), metrics,
                                             parent, gate result, weights digests
    <state>/versions/CURRENT                 the name of the promoted version (absent = the
                                             shipped one)

The segmentation service loads such a version by its ``ensemble.json`` path
(``ATLASFLOW_SEGMENTATION_ENSEMBLE`` accepts JSON paths) and stamps ``<name>`` as the model
version into every AI label version it produces (labels' ``Provenance.model_version``), so
label versions keep pointing at the model that made them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import atlasflow
from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.segmentation.ensemble import EnsembleConfig, load_ensemble
from atlasflow.training.dataset import DOMAIN, atomic_write, canonical_json

#: sources whose bytes define what training does (hashed into `code_version`)
_CODE = (
    "training/dataset.py",
    "training/loss.py",
    "training/finetune.py",
    "segmentation/models.py",
    "segmentation/grid.py",
    "segmentation/pipeline.py",
)


def code_version() -> str:
    """``<package version>+<12 hex>``: the hex is sha256 over the training and preprocessing
    sources, so a code change gives a new ensemble version even without a release."""
    root = Path(atlasflow.__file__).resolve().parent
    h = hashlib.sha256()
    for rel in _CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return f"{atlasflow.__version__}+{h.hexdigest()[:12]}"


def _family(parent_version: str) -> str:
    base = parent_version.split("-ft-", 1)[0]
    return base[:-3] if base.endswith("-v1") else base


def version_digest(
    weights: Mapping[str, str],
    manifest_digest: str,
    code: str,
    hyperparameters: Mapping[str, Any],
    parent_version: str,
) -> str:
    """``sha256:<hex>`` over the canonical JSON of the inputs that define a version."""
    doc = {
        "weights": dict(sorted(weights.items())),
        "manifest": manifest_digest,
        "code": code,
        "hyperparameters": dict(hyperparameters),
        "parent": parent_version,
    }
    return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()


def version_name(parent_version: str, digest: str) -> str:
    return f"{_family(parent_version)}-ft-{digest.split(':', 1)[1][:12]}"


@dataclass(frozen=True)
class EnsembleVersion:
    name: str
    digest: str
    folder: Path

    @property
    def ensemble_path(self) -> Path:
        return self.folder / "ensemble.json"

    @property
    def card_path(self) -> Path:
        return self.folder / "model_card.json"

    def card(self) -> dict[str, Any]:
        return dict(json.loads(self.card_path.read_text()))


def write_version(
    state_dir: Path,
    parent: EnsembleConfig,
    member_weights: Mapping[str, Path],
    *,
    manifest_digest: str,
    hyperparameters: Mapping[str, Any],
    train_cases: int,
    holdout_cases: int,
    metrics: Mapping[str, Any],
) -> EnsembleVersion:
    """Write a new version from the parent's ensemble file and the trained members' weight files
    (members not trained keep the parent's checkpoint, copied). Idempotent: the same inputs give
    the same name and folder."""
    if parent.source is None:
        raise FailedPrecondition("PARENT_WITHOUT_FILE", "the parent ensemble has no file", domain=DOMAIN)
    raw = json.loads(parent.source.read_text())
    sources: dict[str, Path] = {}
    for m in parent.members:
        path = member_weights.get(m.name) or m.checkpoint
        if path is None:
            raise FailedPrecondition(
                "UNTRAINED_MEMBER",
                "a member without weights cannot be versioned",
                domain=DOMAIN,
                metadata={"member": m.name},
            )
        sources[m.name] = Path(path)
    digests = {name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for name, p in sources.items()}
    code = code_version()
    digest = version_digest(digests, manifest_digest, code, hyperparameters, parent.version)
    name = version_name(parent.version, digest)
    folder = state_dir / "versions" / name
    folder.mkdir(parents=True, exist_ok=True)
    for member in raw["members"]:
        src = sources[member["name"]]
        dst = folder / f"{member['name']}{src.suffix or '.pt'}"
        if not dst.is_file():
            tmp = dst.with_suffix(dst.suffix + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        member["checkpoint"] = dst.name
    raw["version"] = name
    raw["description"] = f"fine-tuned from {parent.version} on manifest {manifest_digest} (atlasflow.training)"
    atomic_write(folder / "ensemble.json", (json.dumps(raw, indent=2) + "\n").encode())
    card = {
        "version": name,
        "digest": digest,
        "parent_version": parent.version,
        "code_version": code,
        "data": {"manifest_digest": manifest_digest, "train_cases": train_cases, "holdout_cases": holdout_cases},
        "hyperparameters": dict(hyperparameters),
        "weights": digests,
        "metrics": dict(metrics),
        "status": "candidate",
        "gate": None,
    }
    atomic_write(folder / "model_card.json", (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return EnsembleVersion(name, digest, folder)


def update_card(version: EnsembleVersion, **fields: Any) -> dict[str, Any]:
    card = version.card()
    card.update(fields)
    atomic_write(version.card_path, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())
    return card


def promote(state_dir: Path, version: EnsembleVersion) -> None:
    """Make ``version`` the current one (``versions/CURRENT``, written atomically)."""
    atomic_write(state_dir / "versions" / "CURRENT", (version.name + "\n").encode())


def current_ensemble(state_dir: Path, shipped: str = "abdomen-trio-v1") -> EnsembleConfig:
    """The promoted version's ensemble (or the shipped one when none was promoted)."""
    pointer = state_dir / "versions" / "CURRENT"
    if not pointer.is_file():
        return load_ensemble(shipped)
    name = pointer.read_text().strip()
    if "/" in name or name.startswith("."):
        raise InvalidArgument("INVALID_VERSION", "versions/CURRENT names no version", domain=DOMAIN)
    return load_ensemble(state_dir / "versions" / name / "ensemble.json")
