"""Import an nnU-Net v2 trained-model folder into the registry (format ``nnunet-v2``).

    atlasflow model import nnunet <trained_model_folder> --name NAME [--folds 0,1]
        [--checkpoint checkpoint_final.pth] --state-dir DIR

The folder is nnU-Net's ``<Trainer>__<Plans>__<configuration>/`` with ``dataset.json``,
``plans.json`` and ``fold_<k>/<checkpoint>``. Every field the inference depends on is checked
here, and anything atlasflow does not reproduce exactly is refused with a specific reason
(`ModelImportError`, INVALID_ARGUMENT) instead of being served differently:

supported   trainers `SUPPORTED_TRAINERS` (nnUNetTrainer and its epoch-count variants, which
            change only training length; mirroring axes come from the checkpoint), 3-D
            configurations (``3d_fullres``, ``3d_lowres`` without a cascade, ``inherits_from``
            resolved), one input channel, ``CTNormalization`` or ``ZScoreNormalization``
            without a mask, ``DefaultPreprocessor``, ``SimpleITKIO`` (the default reader for
            NIfTI), any ``transpose_forward`` permutation, ``resample_data_or_seg_to_shape`` for
            data and probabilities with its keyword arguments, the architectures
            `SUPPORTED_ARCHITECTURES` (dynamic_network_architectures), label-based training
            (consecutive ids from 0, an ignore label allowed).
refused     2-D configurations and cascades, region-based labels, other readers (NibabelIO,
            ...), other normalisations, multi-channel inputs, other trainers, unknown plans
            fields, checkpoints that need arbitrary pickled objects.

Stored: ``plans.json``, ``dataset.json`` (copied), ``fold_<k>.pt`` (the network weights only,
a plain tensor state dict readable with ``torch.load(weights_only=True)``), and the Triton
export ``triton/config.pbtxt`` + ``triton/1/model.pt`` (`atlasflow.models.export`: the traced
fold networks with the mirroring and the fold average in one TorchScript module).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.registry import DOMAIN, Manifest, ModelRegistry, check_name, sha256_file

IMPORTER = "atlasflow.models.nnunet"
IMPORTER_VERSION = "2"  # 2: the Triton export (triton/config.pbtxt, triton/1/model.pt)
FORMAT = "nnunet-v2"

_EPOCH_VARIANT = re.compile(r"^nnUNetTrainer_\d+epochs?$")
SUPPORTED_TRAINERS = ("nnUNetTrainer", "nnUNetTrainer_<N>epochs", "nnUNetTrainerNoMirroring")
SUPPORTED_ARCHITECTURES = (
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
)
SUPPORTED_READERS = ("SimpleITKIO",)
SUPPORTED_NORMALISATIONS = ("CTNormalization", "ZScoreNormalization")
RESAMPLING_FN = "resample_data_or_seg_to_shape"
RESAMPLING_KWARGS = {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"}

PLANS_FIELDS = {
    "dataset_name",
    "plans_name",
    "original_median_spacing_after_transp",
    "original_median_shape_after_transp",
    "image_reader_writer",
    "transpose_forward",
    "transpose_backward",
    "configurations",
    "experiment_planner_used",
    "label_manager",
    "foreground_intensity_properties_per_channel",
}
CONFIG_FIELDS = {
    "data_identifier",
    "preprocessor_name",
    "batch_size",
    "patch_size",
    "median_image_size_in_voxels",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg_kwargs",
    "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
    "architecture",
    "batch_dice",
    "inherits_from",
    "next_stage",
}


class ModelImportError(InvalidArgument):
    """An import refused: ``reason`` says what (MISSING_FILE, UNSUPPORTED_TRAINER, ...)."""


def _refuse(reason: str, message: str, **metadata: Any) -> ModelImportError:
    return ModelImportError(reason, message, domain=DOMAIN, metadata={k: str(v) for k, v in metadata.items()})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _refuse("MISSING_FILE", f"{path.name} is missing from the nnU-Net model folder", file=str(path))
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise _refuse("INVALID_JSON", f"{path.name} is not valid JSON: {exc}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise _refuse("INVALID_JSON", f"{path.name} must hold a JSON object", file=str(path))
    return raw


def trainer_supported(name: str) -> bool:
    return name in ("nnUNetTrainer", "nnUNetTrainerNoMirroring") or bool(_EPOCH_VARIANT.match(name))


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The configuration ``name`` with ``inherits_from`` applied (as nnU-Net's PlansManager)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        raise _refuse("UNKNOWN_CONFIGURATION", f"plans.json has no configuration {name!r}", configuration=name)
    conf = dict(configs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = str(conf.pop("inherits_from"))
        if parent in seen or parent not in configs:
            raise _refuse("INVALID_PLANS", f"configuration {name!r} inherits from unknown or cyclic {parent!r}")
        seen.add(parent)
        base = dict(configs[parent])
        base.update(conf)
        conf = base
    return conf


def check_plans(plans: Mapping[str, Any], dataset: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """Check every plans/dataset field the inference depends on; returns the resolved configuration."""
    unknown = sorted(set(plans) - PLANS_FIELDS)
    if unknown:
        raise _refuse(
            "UNSUPPORTED_PLANS_FIELD", f"plans.json field {unknown[0]!r} is not handled by atlasflow", field=unknown[0]
        )
    reader = plans.get("image_reader_writer")
    if reader not in SUPPORTED_READERS:
        raise _refuse(
            "UNSUPPORTED_PLANS_FIELD",
            f"image_reader_writer {reader!r} is not supported (only {', '.join(SUPPORTED_READERS)})",
            field="image_reader_writer",
        )
    if plans.get("label_manager", "LabelManager") != "LabelManager":
        raise _refuse("UNSUPPORTED_PLANS_FIELD", "only nnU-Net's LabelManager is supported", field="label_manager")
    tf = list(plans.get("transpose_forward", [0, 1, 2]))
    if sorted(tf) != [0, 1, 2]:
        raise _refuse("INVALID_PLANS", "transpose_forward must be a permutation of 0, 1, 2", field="transpose_forward")
    conf = resolve_configuration(plans, configuration)
    unknown = sorted(set(conf) - CONFIG_FIELDS)
    if unknown:
        raise _refuse(
            "UNSUPPORTED_PLANS_FIELD",
            f"configuration field {unknown[0]!r} is not handled by atlasflow (cascades are not supported)",
            field=unknown[0],
        )
    if len(conf.get("patch_size", [])) != 3 or len(conf.get("spacing", [])) != 3:
        raise _refuse("UNSUPPORTED_CONFIGURATION", f"configuration {configuration!r} is not 3-D (2-D is not supported)")
    if conf.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise _refuse("UNSUPPORTED_PLANS_FIELD", "only DefaultPreprocessor is supported", field="preprocessor_name")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise _refuse("UNSUPPORTED_CHANNELS", "only single-channel models (one CT image) are supported")
    schemes = list(conf.get("normalization_schemes", []))
    masks = list(conf.get("use_mask_for_norm", [False]))
    if len(schemes) != 1 or schemes[0] not in SUPPORTED_NORMALISATIONS:
        raise _refuse(
            "UNSUPPORTED_PLANS_FIELD", f"normalization {schemes} is not supported", field="normalization_schemes"
        )
    if schemes[0] == "ZScoreNormalization" and any(masks):
        raise _refuse(
            "UNSUPPORTED_PLANS_FIELD",
            "ZScoreNormalization with use_mask_for_norm is not supported",
            field="use_mask_for_norm",
        )
    if schemes[0] == "CTNormalization":
        props = plans.get("foreground_intensity_properties_per_channel", {}).get("0")
        if not isinstance(props, dict) or not {"mean", "std", "percentile_00_5", "percentile_99_5"} <= set(props):
            raise _refuse(
                "INVALID_PLANS",
                "CTNormalization needs foreground_intensity_properties_per_channel['0'] (mean, std, percentiles)",
                field="foreground_intensity_properties_per_channel",
            )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if conf.get(key) != RESAMPLING_FN:
            raise _refuse(
                "UNSUPPORTED_PLANS_FIELD", f"{key} {conf.get(key)!r} is not supported (only {RESAMPLING_FN})", field=key
            )
        extra = sorted(set(conf.get(f"{key}_kwargs", {})) - RESAMPLING_KWARGS)
        if extra or conf.get(f"{key}_kwargs", {}).get("is_seg"):
            raise _refuse(
                "UNSUPPORTED_PLANS_FIELD", f"{key}_kwargs {extra or ['is_seg']} not supported", field=f"{key}_kwargs"
            )
    arch = conf.get("architecture")
    if not isinstance(arch, dict) or arch.get("network_class_name") not in SUPPORTED_ARCHITECTURES:
        name = arch.get("network_class_name") if isinstance(arch, dict) else None
        raise _refuse("UNSUPPORTED_ARCHITECTURE", f"network {name!r} is not supported", network=name)
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise _refuse("INVALID_DATASET_JSON", "dataset.json has no labels")
    if any(not isinstance(v, int) for v in labels.values()):
        raise _refuse("UNSUPPORTED_REGIONS", "region-based models (labels with lists of ids) are not supported")
    ids = sorted(v for k, v in labels.items() if k != "ignore")
    if ids != list(range(len(ids))):
        raise _refuse("INVALID_DATASET_JSON", "label ids must be consecutive integers from 0 (background)")
    return conf


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """nnU-Net's checkpoint dict, unpickled with ``weights_only=True`` (numpy scalars allowed)."""
    import numpy as np
    import torch

    allowed: list[Any] = [np.dtype, np.ndarray, np.float64, np.float32, np.int64]
    allowed.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    multiarray: Any = np.core.multiarray  # numpy < 2 layout (the project pins numpy < 2)
    allowed.extend([multiarray.scalar, multiarray._reconstruct])
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same refusal
        raise _refuse(
            "UNSAFE_CHECKPOINT",
            f"{path.name} needs objects beyond tensors and numpy scalars to load ({type(exc).__name__})",
            file=str(path),
        ) from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise _refuse("INVALID_CHECKPOINT", f"{path.name} is not an nnU-Net v2 checkpoint", file=str(path))
    return ckpt


def detect_folds(folder: Path, checkpoint: str) -> list[str]:
    folds = sorted(p.name[len("fold_") :] for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    if not folds:
        raise _refuse("MISSING_FILE", f"no fold_*/{checkpoint} in the model folder", file=str(folder))
    return folds


def import_nnunet(
    folder: str | Path,
    name: str,
    state_dir: str | Path,
    *,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    replace: bool = False,
) -> Manifest:
    """Check and register ``folder`` as model ``name``; returns the committed manifest."""
    import torch

    from atlasflow.models.export import export_nnunet
    from atlasflow.models.nnunet_infer import build_network

    check_name(name)
    src = Path(folder)
    if not src.is_dir():
        raise _refuse("MISSING_FILE", f"nnU-Net model folder {src} does not exist", file=str(src))
    dataset = _read_json(src / "dataset.json")
    plans = _read_json(src / "plans.json")
    fold_ids = [str(f) for f in folds] if folds else detect_folds(src, checkpoint)
    ckpts: list[dict[str, Any]] = []
    for f in fold_ids:
        path = src / f"fold_{f}" / checkpoint
        if not path.is_file():
            raise _refuse("MISSING_FILE", f"fold_{f}/{checkpoint} is missing", file=str(path), fold=f)
        ckpts.append(_load_checkpoint(path))
    trainer = str(ckpts[0]["trainer_name"])
    configuration = str(ckpts[0].get("init_args", {}).get("configuration", ""))
    for f, c in zip(fold_ids, ckpts):
        if str(c["trainer_name"]) != trainer or str(c.get("init_args", {}).get("configuration", "")) != configuration:
            raise _refuse(
                "INCONSISTENT_FOLDS", f"fold {f} has another trainer or configuration than fold {fold_ids[0]}"
            )
    if not trainer_supported(trainer):
        raise _refuse(
            "UNSUPPORTED_TRAINER",
            f"trainer {trainer!r} is not supported (supported: {', '.join(SUPPORTED_TRAINERS)})",
            trainer=trainer,
        )
    conf = check_plans(plans, dataset, configuration)
    mirror = ckpts[0].get("inference_allowed_mirroring_axes")
    mirror_axes = [int(a) for a in mirror] if mirror is not None else None

    registry = ModelRegistry(state_dir)
    staging = registry.staging()
    try:
        shutil.copyfile(src / "plans.json", staging / "plans.json")
        shutil.copyfile(src / "dataset.json", staging / "dataset.json")
        labels = {int(v): str(k) for k, v in dataset["labels"].items() if k != "ignore"}
        nets = []
        for f, c in zip(fold_ids, ckpts):
            weights = {k: v.detach().clone() for k, v in c["network_weights"].items()}
            torch.save(weights, staging / f"fold_{f}.pt")
            net = build_network(plans, conf, len(labels))
            try:
                net.load_state_dict(weights, strict=True)
            except RuntimeError as exc:
                raise _refuse(
                    "INVALID_CHECKPOINT", f"fold {f}'s weights do not fit the plans' network: {str(exc)[:300]}", fold=f
                ) from None
            nets.append(net)
        triton = export_nnunet(staging, nets, [int(p) for p in conf["patch_size"]], len(labels), mirror_axes)
        manifest = Manifest(
            name=name,
            format=FORMAT,
            labels=labels,
            spacing_mm=tuple(float(s) for s in conf["spacing"]),
            spacing_axes="".join("zyx"[i] for i in plans.get("transpose_forward", [0, 1, 2])),
            files={},
            source=str(src.resolve()),
            importer=IMPORTER,
            importer_version=IMPORTER_VERSION,
            details={
                "trainer": trainer,
                "configuration": configuration,
                "folds": fold_ids,
                "checkpoint": checkpoint,
                "mirror_axes": mirror_axes,
                "triton": triton,
                "source_checkpoints": {
                    f"fold_{f}/{checkpoint}": sha256_file(src / f"fold_{f}" / checkpoint) for f in fold_ids
                },
            },
        )
        return registry.commit(staging, manifest, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
