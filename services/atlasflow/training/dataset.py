"""Training data from radiologists' decisions: which organs of which case are targets, and the
training manifest a run trains on (no grpc, no SQL).

What counts as a decision: label assembly (atlasflow.labels.assembly) keeps, for each of the
nine organs of a case's head version, who decided it (``organ_provenance[o].provenance.source``)
and in which version (``.version_id``). A source of ``"radiologist"`` (accepted or revised by a
reviewer) or ``"original"`` (a human label shipped with the dataset) is a human decision; the
head's label map holds that organ exactly as that latest human version decided it, because a
later AI run never overwrites a human organ. ``"ai"`` organs are undecided.

Per case and organ the manifest records a loss weight (the *organ mask*):

- ``1.0`` for a human-decided organ (its mask, possibly empty = "organ absent", is a target);
- ``0.0`` for an undecided organ: masked out of the loss (partial-label training);
- ``pseudo_weight`` (option, default off) for an undecided organ whose current AI label is used
  as a pseudo-label.

Cases without any human organ are not used. Cases with human organs are split into ``train``
and ``holdout`` (the validation gate's cases) by a seeded hash of the case id, so the split of
a case never changes when other cases are added.

The manifest is canonical JSON (sorted keys, no spaces) named by its own SHA-256
(``manifests/<hex>.json``), written durably *before* training; a run trains on the manifest
file alone (label version ids, CT and label-map blob digests, organ masks, seed,
hyperparameters) and re-verifies its digest when it loads it.

The reader works on any object with the `LabelRepository` read surface used here
(``case_ids()``, ``head(case_id)`` returning a record with ``version_id``, ``ct_digest``,
``label_map_digest``, ``organ_provenance``); atlasflow.labels' SQLite and PostgreSQL repositories
fit it. It imports no labels code: a deployment passes the repository or an adapter over
labels' gRPC API (``ListLabelVersions``/``GetLabelVersion`` carry the same fields).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from atlasflow.common.blobstore import BlobStore
from atlasflow.common.disk import atomic_write
from atlasflow.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.organs import ORGANS

DOMAIN = "atlasflow.training"
HUMAN_SOURCES = frozenset({"radiologist", "original"})
MANIFEST_FORMAT = 1


# ----------------------------------------------------------------------------- the read surface


class _ProvenanceLike(Protocol):
    @property
    def source(self) -> str: ...
    @property
    def model_version(self) -> str: ...


class _OrganProvenanceLike(Protocol):
    @property
    def provenance(self) -> _ProvenanceLike: ...
    @property
    def version_id(self) -> str: ...


class VersionLike(Protocol):
    """The fields of a label version (atlasflow.labels.repository.LabelVersionRecord) read here."""

    @property
    def version_id(self) -> str: ...
    @property
    def case_id(self) -> str: ...
    @property
    def ct_digest(self) -> str: ...
    @property
    def label_map_digest(self) -> str: ...
    @property
    def organ_provenance(self) -> Mapping[int, Any]: ...


class DecisionSource(Protocol):
    """Where decisions are read from (a labels repository or an adapter over its API)."""

    def case_ids(self) -> list[str]: ...
    def head(self, case_id: str) -> Any: ...


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class CaseDecisions:
    """One case's head version and, per organ id 1..9, who decided it.

    human: organ -> the label version id whose write decided it (a human source);
    ai: organ -> the model version whose output the head holds for it ("" if unknown).
    """

    case_id: str
    version_id: str
    ct_digest: str
    label_map_digest: str
    human: Mapping[int, str]
    ai: Mapping[int, str]


def decisions_of(head: VersionLike) -> CaseDecisions:
    """Split a head version's organs into human-decided and AI (undecided) ones."""
    human: dict[int, str] = {}
    ai: dict[int, str] = {}
    for organ in ORGANS:
        op: _OrganProvenanceLike | None = head.organ_provenance.get(organ)
        if op is None:
            continue
        if op.provenance.source in HUMAN_SOURCES:
            human[organ] = op.version_id or head.version_id
        else:
            ai[organ] = op.provenance.model_version
    return CaseDecisions(head.case_id, head.version_id, head.ct_digest, head.label_map_digest, human, ai)


def collect_decisions(source: DecisionSource, case_ids: Iterable[str] | None = None) -> list[CaseDecisions]:
    """The decisions of every case (or of ``case_ids``), sorted by case id; cases without a
    version are skipped."""
    out = []
    for case_id in sorted(case_ids if case_ids is not None else source.case_ids()):
        head = source.head(case_id)
        if head is not None:
            out.append(decisions_of(head))
    return out


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestCase:
    """One case of a manifest. organ_weights: 9 loss weights, index k = organ id k + 1;
    decided_by: organ id (str) -> label version id of the human decision; pseudo_from: organ
    id (str) -> model version of a pseudo-label."""

    case_id: str
    version_id: str
    ct_digest: str
    label_map_digest: str
    organ_weights: tuple[float, ...]
    decided_by: Mapping[str, str]
    pseudo_from: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "version_id": self.version_id,
            "ct_digest": self.ct_digest,
            "label_map_digest": self.label_map_digest,
            "organ_weights": list(self.organ_weights),
            "decided_by": dict(sorted(self.decided_by.items())),
            "pseudo_from": dict(sorted(self.pseudo_from.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ManifestCase:
        return cls(
            str(d["case_id"]),
            str(d["version_id"]),
            str(d["ct_digest"]),
            str(d["label_map_digest"]),
            tuple(float(w) for w in d["organ_weights"]),
            {str(k): str(v) for k, v in d["decided_by"].items()},
            {str(k): str(v) for k, v in d.get("pseudo_from", {}).items()},
        )

    @property
    def human_organs(self) -> list[int]:
        return sorted(int(k) for k in self.decided_by)


@dataclass(frozen=True)
class Manifest:
    """What a training run trains on. train / holdout: the cases; seed; hyperparameters: the
    run's settings (a JSON object); parent_version: the ensemble version fine-tuned from."""

    parent_version: str
    seed: int
    hyperparameters: Mapping[str, Any]
    train: tuple[ManifestCase, ...]
    holdout: tuple[ManifestCase, ...]
    pseudo_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "parent_version": self.parent_version,
            "seed": self.seed,
            "hyperparameters": dict(self.hyperparameters),
            "pseudo_weight": self.pseudo_weight,
            "train": [c.to_dict() for c in self.train],
            "holdout": [c.to_dict() for c in self.holdout],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if int(d.get("format", 0)) != MANIFEST_FORMAT:
            raise InvalidArgument(
                "INVALID_MANIFEST",
                "unknown training manifest format",
                domain=DOMAIN,
                metadata={"format": str(d.get("format"))},
            )
        return cls(
            str(d["parent_version"]),
            int(d["seed"]),
            dict(d["hyperparameters"]),
            tuple(ManifestCase.from_dict(c) for c in d["train"]),
            tuple(ManifestCase.from_dict(c) for c in d["holdout"]),
            float(d.get("pseudo_weight", 0.0)),
        )

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical JSON."""
        return "sha256:" + hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def label_version_ids(self) -> list[str]:
        return sorted({c.version_id for c in (*self.train, *self.holdout)})


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that digests are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _holdout(case_id: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def build_manifest(
    decisions: Sequence[CaseDecisions],
    *,
    parent_version: str,
    seed: int,
    hyperparameters: Mapping[str, Any],
    holdout_fraction: float = 0.25,
    holdout_cases: Iterable[str] | None = None,
    pseudo_weight: float = 0.0,
) -> Manifest:
    """The manifest of the cases with at least one human-decided organ.

    holdout_cases: explicit held-out case ids (else a seeded hash puts about
    ``holdout_fraction`` of the cases there). pseudo_weight > 0 uses the head's AI labels of
    undecided organs as targets with that loss weight (train cases only: held-out cases are
    scored on human organs alone). Raises FailedPrecondition("NO_DECISIONS") when no case has
    a human organ.
    """
    if not 0.0 <= pseudo_weight <= 1.0:
        raise InvalidArgument("INVALID_ARGUMENT", "pseudo_weight must be in [0, 1]", domain=DOMAIN)
    chosen = set(holdout_cases) if holdout_cases is not None else None
    train: list[ManifestCase] = []
    holdout: list[ManifestCase] = []
    for d in sorted(decisions, key=lambda x: x.case_id):
        if not d.human:
            continue
        held = d.case_id in chosen if chosen is not None else _holdout(d.case_id, seed, holdout_fraction)
        pw = 0.0 if held else pseudo_weight
        weights = tuple(1.0 if o in d.human else pw for o in ORGANS)
        case = ManifestCase(
            d.case_id,
            d.version_id,
            d.ct_digest,
            d.label_map_digest,
            weights,
            {str(o): v for o, v in sorted(d.human.items())},
            {str(o): m for o, m in sorted(d.ai.items())} if pw > 0 else {},
        )
        (holdout if held else train).append(case)
    if not train and not holdout:
        raise FailedPrecondition("NO_DECISIONS", "no case has an organ decided by a human", domain=DOMAIN)
    return Manifest(parent_version, int(seed), dict(hyperparameters), tuple(train), tuple(holdout), pseudo_weight)


def write_manifest(manifest: Manifest, directory: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write ``<directory>/<hex>.json`` durably (temp file, fsync, rename); returns (path,
    ``sha256:<hex>``). Writing the same manifest again is a no-op."""
    data = manifest.canonical_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest.split(':', 1)[1]}.json"
    if not path.is_file():
        atomic_write(path, data)
    return path, digest


def load_manifest(path: str | os.PathLike[str]) -> tuple[Manifest, str]:
    """Read a manifest file and check that its name is its content's digest (DataLoss
    ``MANIFEST_DIGEST_MISMATCH`` otherwise); returns (manifest, digest)."""
    p = Path(path)
    data = p.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if p.stem != digest.split(":", 1)[1]:
        raise DataLoss("MANIFEST_DIGEST_MISMATCH", "training manifest does not match its digest", domain=DOMAIN)
    manifest = Manifest.from_dict(json.loads(data))
    if manifest.digest != digest:
        raise DataLoss("MANIFEST_DIGEST_MISMATCH", "training manifest is not canonical JSON", domain=DOMAIN)
    return manifest, digest


# ----------------------------------------------------------------------------- case arrays


@dataclass(frozen=True)
class CaseArrays:
    """One case on its native grid: hu (X, Y, Z) float32 HU, affine 4x4 voxel -> RAS mm,
    organs (9, X, Y, Z) uint8 one-hot targets (row k = organ id k + 1), weights (9,) float32."""

    case_id: str
    hu: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    organs: npt.NDArray[np.uint8]
    weights: npt.NDArray[np.float32]


def load_case(blobs: BlobStore, case: ManifestCase) -> CaseArrays:
    """Read a manifest case's CT and label map (NIfTI blobs, digests verified by the store)."""
    ct, affine = from_nifti_bytes(blobs.get(case.ct_digest))
    labels, _ = from_nifti_bytes(blobs.get(case.label_map_digest))
    label_map = np.asarray(labels).astype(np.uint8)
    if label_map.shape != ct.shape:
        raise InvalidArgument(
            "INVALID_LABEL_MAP", "label map does not fit the CT", domain=DOMAIN, metadata={"case": case.case_id}
        )
    organs = np.stack([label_map == o for o in ORGANS]).astype(np.uint8)
    return CaseArrays(
        case.case_id,
        np.asarray(ct, dtype=np.float32),
        affine,
        organs,
        np.asarray(case.organ_weights, dtype=np.float32),
    )
