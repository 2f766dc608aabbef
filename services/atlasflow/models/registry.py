"""Model registry: ``<state-dir>/models/<name>/`` holds a model's files and ``manifest.json``.

The manifest (JSON, `Manifest`) is what every consumer reads: the format (one of `FORMATS`),
the label map (id -> name, id 0 = background), the model's target spacing in mm (in the
format's own axis order, stated in ``spacing_axes``), SHA-256 + size of every stored file, the
source path it was imported from, and the importer's name and version. An importer (one per
format: `atlasflow.models.nnunet`, later a MONAI-bundle one) writes the files into a staging
folder and calls `ModelRegistry.commit`, which writes the manifest last and renames the
folder into place, so a half-imported model is never listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlasflow.common.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound

DOMAIN = "models.atlasflow"
FORMATS = ("nnunet-v2", "monai-bundle", "atlasflow-trio")
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_name(name: str) -> str:
    """A model name becomes a folder: lower-case letters, digits, ``.``, ``_``, ``-``, max 63."""
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(
            "INVALID_MODEL_NAME",
            "model name must match [a-z0-9][a-z0-9._-]{0,62}",
            domain=DOMAIN,
            metadata={"name": name},
        )
    return name


@dataclass(frozen=True)
class Manifest:
    """What a registered model is. ``labels``: id -> name (0 = background); ``spacing_mm``:
    the target spacing, axes named by ``spacing_axes`` (nnU-Net: its own array order, e.g.
    ``zyx`` for SimpleITK-read NIfTI); ``files``: relative path -> {sha256, size_bytes};
    ``details``: format-specific settings the inference needs (read by that format's code)."""

    name: str
    format: str
    labels: dict[int, str]
    spacing_mm: tuple[float, ...]
    spacing_axes: str
    files: dict[str, dict[str, Any]]
    source: str
    importer: str
    importer_version: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """SHA-256 over the sorted (path, file sha256) pairs: one id for the model's content."""
        h = hashlib.sha256()
        for rel in sorted(self.files):
            h.update(f"{rel}\0{self.files[rel]['sha256']}\n".encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        out["spacing_mm"] = list(self.spacing_mm)
        out["digest"] = self.digest
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        try:
            fmt = str(raw["format"])
            if fmt not in FORMATS:
                raise ValueError(f"unknown format {fmt!r}")
            return cls(
                name=str(raw["name"]),
                format=fmt,
                labels={int(k): str(v) for k, v in dict(raw["labels"]).items()},
                spacing_mm=tuple(float(s) for s in raw["spacing_mm"]),
                spacing_axes=str(raw["spacing_axes"]),
                files={str(k): dict(v) for k, v in dict(raw["files"]).items()},
                source=str(raw["source"]),
                importer=str(raw["importer"]),
                importer_version=str(raw["importer_version"]),
                details=dict(raw.get("details", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataLoss("INVALID_MANIFEST", f"model manifest is unreadable: {exc}", domain=DOMAIN) from None


class ModelRegistry:
    """The registered models under ``<state_dir>/models``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "models"

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file() and NAME_RE.match(p.name))

    def __iter__(self) -> Iterator[Manifest]:
        return (self.get(n) for n in self.names())

    def get(self, name: str) -> Manifest:
        path = self.path(name) / MANIFEST
        if not path.is_file():
            raise NotFound(
                "MODEL_NOT_FOUND", f"no model named {name!r} is registered", domain=DOMAIN, metadata={"name": name}
            )
        try:
            raw = json.loads(path.read_text())
        except ValueError:
            raise DataLoss("INVALID_MANIFEST", "model manifest is not JSON", domain=DOMAIN) from None
        return Manifest.from_json(raw)

    def verify(self, name: str) -> Manifest:
        """`get` + every stored file's SHA-256 checked against the manifest (DataLoss if not)."""
        manifest = self.get(name)
        base = self.path(name)
        for rel, info in manifest.files.items():
            f = base / rel
            if not f.is_file() or sha256_file(f) != info["sha256"]:
                raise DataLoss(
                    "MODEL_FILE_CORRUPT",
                    "a registered model file is missing or differs from its manifest digest",
                    domain=DOMAIN,
                    metadata={"name": name, "file": rel},
                )
        return manifest

    def staging(self) -> Path:
        """A fresh folder (on the registry's file system) for an importer to fill."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def commit(self, staging: Path, manifest: Manifest, *, replace: bool = False) -> Manifest:
        """Digest the staged files into ``manifest.files``, write the manifest, move into place."""
        target = self.path(manifest.name)
        if target.exists() and not replace:
            shutil.rmtree(staging, ignore_errors=True)
            raise AlreadyExists(
                "MODEL_EXISTS",
                f"a model named {manifest.name!r} is already registered (use --replace)",
                domain=DOMAIN,
                metadata={"name": manifest.name},
            )
        files = {
            str(p.relative_to(staging)): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        final = Manifest(**{**asdict(manifest), "files": files})
        (staging / MANIFEST).write_text(json.dumps(final.to_json(), indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        return final
