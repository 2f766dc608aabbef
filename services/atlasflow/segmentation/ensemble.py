"""Versioned ensemble definitions (`ensembles/<version>.json`) and their typed form.

An ensemble file names its version (e.g. ``abdomen-trio-v1``), the nine AbdomenAtlas-8K classes
(ids 1..9, `atlasflow.common.organs`), and its members. Each member states its MONAI
architecture and constructor kwargs, its output activation, the seed used for untrained
(deterministic) initialisation, an optional checkpoint, and its preprocessing:

- ``target_spacing_mm``: model grid spacing (mm), axes RAS (X, Y, Z);
- ``hu_window``: HU clip window, scaled linearly to [0, 1];
- ``patch_size`` (voxels), ``overlap`` (fraction) and ``sw_batch_size`` for sliding-window
  inference with Gaussian blending.

Activations:
- ``"sigmoid"``: ``out_channels == 9``, one independent probability per organ (channel k is
  organ id k+1), as the reference U-Net / Swin UNETR do;
- ``"softmax"``: ``out_channels == 10``, channel 0 is background and channels 1..9 are the
  organ ids, as the reference nnU-Net does; the organ channels are used as per-organ
  probabilities.

Optional ensemble-level inference options (absent = off; the defaults keep results identical):

- ``"autocast"``: ``"none"`` (default) or ``"bf16"``: members run under
  ``torch.autocast(dtype=bfloat16)`` (GPU);
- ``"foreground_crop"``: ``{"threshold_hu": -500, "margin_mm": 10}`` or null (default): the
  pipeline crops the native CT to the bounding box of voxels with HU > threshold (the body,
  table included) grown by the margin before resampling and the sliding window; outputs are
  padded back to the full grid (zeros outside the box).

- ``"attention"`` (format 2): ``{"mode": "reference"}`` (default; docs/ranking.md) or ``{"mode": "enhanced"}``,
  or any other ranking strategy registered in `atlasflow.method.strategy` (`strategy_names`):
  which strategy's attention map the pipeline returns as its heatmap
  (`EnsembleConfig.strategy`). ``reference`` is the AbdomenAtlas recipe (std, entropy,
  overlap; `atlasflow.method.reference`); ``enhanced`` is the library's enhanced attention
  (`atlasflow.method.enhanced`: `suspect_regions` of the members' soft predictions plus
  swapped kidneys, heatmap = the reference heatmap inside that attention, at least 0.5). The
  labels do not depend on it.

File format (``"format"``, absent = 1): 1 = the fields above except ``"attention"``; 2 adds
``"attention"``. A format-1 file with an ``"attention"`` block and any other format are
refused (an older reader would silently ignore the block and return a different heatmap).

A checkpoint path is relative to the ensemble file's directory unless absolute; it may be a
MONAI/PyTorch ``state_dict`` (``.pt``/``.pth``) or a TorchScript file (``.ts``/``.torchscript``,
or any file that ``torch.jit.load`` accepts).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from atlasflow.common.errors import InvalidArgument, NotFound
from atlasflow.common.organs import ORGANS
from atlasflow.method.strategy import DEFAULT_STRATEGY, RankingStrategy, get_strategy, strategy_names

DOMAIN = "atlasflow.segmentation"
ENSEMBLE_DIR = Path(__file__).resolve().parent / "ensembles"
ACTIVATIONS = ("sigmoid", "softmax")
AUTOCAST = ("none", "bf16")
#: ensemble file formats this reader understands (``"format"``; absent = 1)
FORMATS = (1, 2)
_N = TypeVar("_N", int, float)


@dataclass(frozen=True)
class ForegroundCrop:
    """Crop to the body before inference: voxels with HU > ``threshold_hu``, bounding box
    grown by ``margin_mm`` on every side (per axis, in that axis' voxel spacing)."""

    threshold_hu: float = -500.0
    margin_mm: float = 10.0


@dataclass(frozen=True)
class Preprocessing:
    """Per-member preprocessing; spacing in mm on RAS axes (X, Y, Z), window in HU."""

    target_spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    patch_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member (architecture + kwargs + activation + weights + preprocessing)."""

    name: str
    architecture: str
    kwargs: dict[str, Any]
    activation: str
    seed: int
    preprocessing: Preprocessing
    checkpoint: Path | None = None


@dataclass(frozen=True)
class EnsembleConfig:
    """A versioned ensemble: ``version`` (e.g. ``abdomen-trio-v1``) and its members."""

    version: str
    members: tuple[MemberConfig, ...]
    threshold: float = 0.5
    description: str = ""
    source: Path | None = field(default=None, compare=False)
    autocast: str = "none"
    foreground_crop: ForegroundCrop | None = None
    #: the ranking strategy's registered name (``"attention": {"mode": ...}``)
    attention_mode: str = DEFAULT_STRATEGY
    format: int = 1

    @property
    def strategy(self) -> RankingStrategy:
        """The ranking strategy whose attention the pipeline returns (`attention_mode`)."""
        return get_strategy(self.attention_mode)

    @property
    def model_name(self) -> str:
        """Triton model name: the version with '-' replaced by '_' (``abdomen_trio_v1``)."""
        return triton_model_name(self.version)

    @property
    def weights_trained(self) -> bool:
        """True only if every member loads a checkpoint (otherwise seeded, untrained weights)."""
        return all(m.checkpoint is not None for m in self.members)


def triton_model_name(version: str) -> str:
    """Map an ensemble version to its Triton model name (``abdomen-trio-v1`` -> ``abdomen_trio_v1``)."""
    return version.replace("-", "_").replace(".", "_")


def _bad(message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument("INVALID_ENSEMBLE_CONFIG", message, domain=DOMAIN, metadata=metadata)


def _triple(value: Any, what: str, cast: Callable[[Any], _N]) -> tuple[_N, _N, _N]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _bad(f"{what} must be a list of 3 numbers", field=what)
    return cast(value[0]), cast(value[1]), cast(value[2])


def _parse_member(raw: dict[str, Any], base: Path) -> MemberConfig:
    try:
        pre = raw["preprocessing"]
        window = pre["hu_window"]
        if len(window) != 2 or float(window[0]) >= float(window[1]):
            raise _bad("hu_window must be [low, high] with low < high", field="hu_window")
        preprocessing = Preprocessing(
            target_spacing_mm=_triple(pre["target_spacing_mm"], "target_spacing_mm", float),
            hu_window=(float(window[0]), float(window[1])),
            patch_size=_triple(pre["patch_size"], "patch_size", int),
            overlap=float(pre["overlap"]),
            sw_batch_size=int(pre["sw_batch_size"]),
        )
        activation = str(raw["activation"])
        if activation not in ACTIVATIONS:
            raise _bad(f"activation must be one of {ACTIVATIONS}", field="activation")
        out_channels = int(raw["kwargs"]["out_channels"])
        expected = len(ORGANS) + (1 if activation == "softmax" else 0)
        if out_channels != expected:
            raise _bad(
                f"{activation} member needs out_channels={expected}",
                field="out_channels",
                member=str(raw.get("name")),
            )
        if not 0.0 <= preprocessing.overlap < 1.0:
            raise _bad("overlap must be in [0, 1)", field="overlap")
        ckpt = raw.get("checkpoint")
        checkpoint = None
        if ckpt:
            checkpoint = Path(ckpt) if Path(ckpt).is_absolute() else base / ckpt
        return MemberConfig(
            name=str(raw["name"]),
            architecture=str(raw["architecture"]),
            kwargs=dict(raw["kwargs"]),
            activation=activation,
            seed=int(raw.get("seed", 0)),
            preprocessing=preprocessing,
            checkpoint=checkpoint,
        )
    except KeyError as exc:
        raise _bad(f"ensemble member lacks field {exc.args[0]!r}", field=str(exc.args[0])) from None


def parse_ensemble(raw: dict[str, Any], base: Path = ENSEMBLE_DIR) -> EnsembleConfig:
    """Validate a decoded ensemble JSON document; relative checkpoints resolve against ``base``."""
    if "version" not in raw or not raw.get("members"):
        raise _bad("ensemble needs 'version' and a non-empty 'members' list")
    classes = {int(k): str(v) for k, v in raw.get("classes", ORGANS).items()}
    if classes != ORGANS:
        raise _bad("ensemble classes must be the nine AbdomenAtlas-8K organs, ids 1..9")
    members = tuple(_parse_member(m, base) for m in raw["members"])
    autocast = str(raw.get("autocast") or "none")
    if autocast not in AUTOCAST:
        raise _bad(f"autocast must be one of {AUTOCAST}", field="autocast")
    crop_raw = raw.get("foreground_crop")
    crop = None
    if crop_raw is not None:
        if not isinstance(crop_raw, dict):
            raise _bad("foreground_crop must be an object or null", field="foreground_crop")
        crop = ForegroundCrop(float(crop_raw.get("threshold_hu", -500.0)), float(crop_raw.get("margin_mm", 10.0)))
        if crop.margin_mm < 0:
            raise _bad("foreground_crop.margin_mm must be >= 0", field="foreground_crop")
    try:
        fmt = int(raw.get("format", 1))
    except (TypeError, ValueError):
        raise _bad("format must be an integer", field="format") from None
    if fmt not in FORMATS:
        raise _bad(f"ensemble format {fmt} is not supported (known: {FORMATS})", field="format")
    attention_raw = raw.get("attention")
    mode = DEFAULT_STRATEGY
    if attention_raw is not None:
        if fmt < 2:
            raise _bad("'attention' needs ensemble format 2", field="attention")
        if not isinstance(attention_raw, dict) or set(attention_raw) - {"mode"}:
            raise _bad('attention must be an object {"mode": ...}', field="attention")
        mode = str(attention_raw.get("mode", DEFAULT_STRATEGY))
        if mode not in strategy_names():
            raise _bad(f"attention.mode must be one of {strategy_names()}", field="attention.mode")
    return EnsembleConfig(
        version=str(raw["version"]),
        members=members,
        threshold=float(raw.get("threshold", 0.5)),
        description=str(raw.get("description", "")),
        autocast=autocast,
        foreground_crop=crop,
        attention_mode=mode,
        format=fmt,
    )


def load_ensemble(path_or_version: str | Path) -> EnsembleConfig:
    """Load an ensemble by file path or by version name (``ensembles/<version>.json``).

    Raises NotFound(``ENSEMBLE_NOT_FOUND``) for an unknown version and
    InvalidArgument(``INVALID_ENSEMBLE_CONFIG``) for a malformed file.
    """
    path = Path(path_or_version)
    if not path.suffix == ".json":
        path = ENSEMBLE_DIR / f"{path_or_version}.json"
    if not path.is_file():
        raise NotFound(
            "ENSEMBLE_NOT_FOUND",
            "unknown ensemble version",
            domain=DOMAIN,
            metadata={"ensemble": str(path_or_version)},
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise _bad("ensemble file is not valid JSON", ensemble=path.stem) from None
    cfg = parse_ensemble(raw, base=path.parent)
    return dataclasses.replace(cfg, source=path)


def available_versions() -> list[str]:
    """Versions shipped in ``ensembles/`` (file stems)."""
    return sorted(p.stem for p in ENSEMBLE_DIR.glob("*.json"))
