"""Import and run a MONAI bundle (format ``monai-bundle``) as ``python -m monai.bundle run`` does.

    atlasflow model import monai-bundle <bundle_dir> --name NAME --state-dir DIR
    atlasflow segment ct.nii.gz --model NAME --out OUTDIR --state-dir DIR

A bundle in the standard layout: ``configs/metadata.json`` (the label map in
``network_data_format.outputs.pred.channel_def``: channel index = label id, 0 = background),
``configs/inference.json`` (or ``.yaml``) with ``network_def``, ``preprocessing``, ``inferer``
and ``postprocessing`` (and usually ``evaluator``: a ``SupervisedEvaluator``), and the weights
``models/model.pt`` (a state dict) or ``models/model.ts`` (TorchScript).

How it runs (`MonaiBundleModel`): the config is parsed with MONAI's own ``ConfigParser``; the
network, the transforms and the inferer are MONAI's classes instantiated from it, so their
arguments mean what they mean in MONAI. What ``monai.bundle run`` does around them is done
here, in atlasflow's segment path, on the volume `atlasflow.models.segment` has read:

1. ``LoadImaged``: ``NibabelReader.get_data`` of the volume with its affine (what LoadImaged
   reads from a NIfTI without ITK installed: the file's voxel array, ``img.affine``), float32,
   as a MetaTensor;
2. the other preprocessing transforms, in order, the bundle's own instances (so ``Invertd``
   finds them in the applied operations);
3. the DataLoader's collation (``list_data_collate``), the evaluator's eval mode + no_grad,
   the bundle's inferer on the batch (``SupervisedEvaluator``'s keys ``image`` / ``pred``;
   ``amp`` as the evaluator: float16 autocast on CUDA only);
4. ``decollate_batch`` and the postprocessing transforms in order, except ``SaveImaged``
   (atlasflow writes the label map itself: ``labels.nii.gz`` on the input's grid).

The result must be one channel on the input's voxel grid (an ``Invertd`` of the preprocessing
and an ``AsDiscreted(argmax=True)`` are required); its values are the label ids.

Supported (anything else is refused with `BundleImportError`, INVALID_ARGUMENT, and a reason):

preprocessing   LoadImaged first (keys ``image``; reader unset or NibabelReader; image_only),
                then `PRE_TRANSFORMS`
inferer         `INFERERS` with literal arguments
postprocessing  `POST_TRANSFORMS`; an ``Invertd`` (``orig_keys`` ``image``, ``transform``
                ``@preprocessing``), an ``AsDiscreted`` with ``argmax``; ``SaveImaged`` is dropped
network         any class of ``monai.networks.nets`` with literal arguments; weights loaded
                strictly (``torch.load(weights_only=True)``) or TorchScript
refused         other transforms and inferers; inside the parts above: ``$`` expressions (but
                the dtype names `SAFE_EXPRESSIONS`), ``%`` macros, ``_mode_`` / ``_requires_``
                / ``_disabled_``, and components nested in a component's arguments (parsing a
                bundle config can run arbitrary code: MONAI's advisory GHSA-873f-pvrv-4x83;
                atlasflow only instantiates the allowed classes with literal arguments and
                never evaluates the rest of the config: ``imports``, ``datalist``, handlers,
                ``SaveImaged``); a missing config/metadata/weights file,
                a weights file that does not fit the network, no label map.

Stored: ``configs/inference.json|yaml``, ``configs/metadata.json``, ``models/model.pt|ts``
(copies; the manifest digests them), and the Triton export of the network
(``triton/config.pbtxt``, ``triton/1/model.pt``: `atlasflow.models.export`). On the Triton
path (`atlasflow segment`) steps 1-4 stay here and the inferer's window batches go to the
served network.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.registry import DOMAIN, Manifest, ModelRegistry, check_name, sha256_file

IMPORTER = "atlasflow.models.monai_bundle"
IMPORTER_VERSION = "2"  # 2: the Triton export (triton/config.pbtxt, triton/1/model.pt)
FORMAT = "monai-bundle"

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_NAMES = ("model.pt", "model.ts")
IMAGE_KEY = "image"  # SupervisedEvaluator's fixed keys
PRED_KEY = "pred"

PRE_TRANSFORMS = frozenset(
    {
        "EnsureChannelFirstd",
        "EnsureTyped",
        "ToTensord",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "ScaleIntensityd",
        "NormalizeIntensityd",
        "CropForegroundd",
    }
)
POST_TRANSFORMS = frozenset(
    {
        "Activationsd",
        "Invertd",
        "AsDiscreted",
        "KeepLargestConnectedComponentd",
        "EnsureTyped",
        "ToTensord",
        "SaveImaged",
    }
)
DROPPED = frozenset({"SaveImaged"})
INFERERS = frozenset({"SlidingWindowInferer", "SimpleInferer"})
#: the only ``$`` expressions evaluated (dtypes, as bundles write them)
SAFE_EXPRESSIONS = frozenset(
    f"${mod}.{t}"
    for mod in ("np", "numpy", "torch")
    for t in ("float16", "float32", "float64", "uint8", "int16", "int32")
)
LOAD_ARGS = frozenset({"_target_", "keys", "image_only", "reader", "dtype", "ensure_channel_first"})


class BundleImportError(InvalidArgument):
    """A bundle feature atlasflow does not reproduce exactly (refused, never served differently)."""


def _refuse(reason: str, message: str, **metadata: Any) -> BundleImportError:
    return BundleImportError(reason, message, domain=DOMAIN, metadata={k: str(v) for k, v in metadata.items()})


def _short(target: Any) -> str:
    """``monai.transforms.Spacingd`` / ``Spacingd`` -> ``Spacingd``; other packages refused."""
    if not isinstance(target, str) or not target:
        raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", "a component's _target_ must be a class name", target=target)
    if "." in target and not target.startswith("monai."):
        raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", f"component {target!r} is not a MONAI class", target=target)
    return target.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- config checks


class _Checker:
    """Walks the raw config of the parts atlasflow instantiates, following ``@id`` references."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser

    def raw(self, ref: str) -> Any:
        try:
            return self.parser[ref]
        except (KeyError, IndexError, TypeError, ValueError):
            raise _refuse("INVALID_BUNDLE_CONFIG", f"the config has no {ref!r}", id=ref) from None

    def literal(self, value: Any, where: str, seen: frozenset[str] = frozenset(), *, top: bool = True) -> None:
        """No expressions, no special modes, no components inside a component's arguments
        (only the checked top-level ``_target_`` is instantiated); references resolved and
        checked too."""
        if isinstance(value, str):
            if value.startswith("$") and value not in SAFE_EXPRESSIONS:
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_EXPRESSION",
                    f"{where}: '$' expressions are not run by atlasflow ({value[:60]!r})",
                    where=where,
                )
            if value.startswith("@"):
                ref = value[1:]
                if ref in seen:
                    raise _refuse("INVALID_BUNDLE_CONFIG", f"{where}: circular reference {value!r}", where=where)
                if ref != "preprocessing":  # the Invertd reference, checked as a whole elsewhere
                    self.literal(self.raw(ref), f"{where} -> {value}", seen | {ref}, top=False)
            elif value.startswith("%"):
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_EXPRESSION", f"{where}: '%' file macros are not supported", where=where
                )
        elif isinstance(value, Mapping):
            if "_target_" in value and not top:
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_COMPONENT",
                    f"{where}: components inside a component's arguments are not instantiated by atlasflow",
                    where=where,
                    target=value["_target_"],
                )
            for key in ("_mode_", "_requires_"):
                if key in value:
                    raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", f"{where}: {key} is not supported", where=where)
            if value.get("_disabled_") not in (None, False, "false", "False"):
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_COMPONENT", f"{where}: _disabled_ components are not supported", where=where
                )
            for k, v in value.items():
                self.literal(v, f"{where}#{k}", seen, top=False)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.literal(v, f"{where}#{i}", seen, top=False)

    def transforms(self, part: str) -> list[dict[str, Any]]:
        raw = self.raw(part)
        if isinstance(raw, str) and raw.startswith("@"):
            raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", f"{part} must be a Compose written in place", part=part)
        if not isinstance(raw, Mapping) or _short(raw.get("_target_")) != "Compose":
            raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", f"{part} must be a Compose of transforms", part=part)
        items = raw.get("transforms")
        if not isinstance(items, list) or not all(isinstance(t, Mapping) for t in items):
            raise _refuse("UNSUPPORTED_BUNDLE_COMPONENT", f"{part}.transforms must be a list of components", part=part)
        extra = set(raw) - {"_target_", "transforms"}
        if extra:
            raise _refuse(
                "UNSUPPORTED_BUNDLE_COMPONENT", f"{part}: Compose arguments {sorted(extra)} are not supported"
            )
        return [dict(t) for t in items]


def _keys(t: Mapping[str, Any]) -> list[str]:
    k = t.get("keys")
    return [k] if isinstance(k, str) else [str(x) for x in (k or [])]


def check_config(parser: Any) -> dict[str, Any]:
    """Validate the parts atlasflow runs; returns the settings the manifest records."""
    c = _Checker(parser)
    net = c.raw("network_def")
    if not isinstance(net, Mapping):
        raise _refuse("UNSUPPORTED_NETWORK", "network_def must be a component (_target_ + arguments)")
    net_cls = _short(net.get("_target_"))
    import monai.networks.nets as nets

    if not isinstance(getattr(nets, net_cls, None), type):
        raise _refuse(
            "UNSUPPORTED_NETWORK", f"network {net_cls!r} is not a class of monai.networks.nets", network=net_cls
        )
    c.literal(net, "network_def")

    pre = c.transforms("preprocessing")
    if not pre or _short(pre[0].get("_target_")) != "LoadImaged":
        raise _refuse("UNSUPPORTED_BUNDLE_TRANSFORM", "preprocessing must start with LoadImaged")
    load = pre[0]
    if _keys(load) != [IMAGE_KEY]:
        raise _refuse("UNSUPPORTED_BUNDLE_TRANSFORM", "LoadImaged must load the key 'image' only", keys=_keys(load))
    extra = set(load) - LOAD_ARGS
    if extra:
        raise _refuse("UNSUPPORTED_BUNDLE_TRANSFORM", f"LoadImaged arguments {sorted(extra)} are not supported")
    if load.get("reader") not in (None, "NibabelReader") or load.get("image_only", True) is not True:
        raise _refuse("UNSUPPORTED_BUNDLE_TRANSFORM", "LoadImaged must use the default/NibabelReader with image_only")
    c.literal(load, "preprocessing#transforms#0")
    pre_names = ["LoadImaged"]
    spacing: list[float] = []
    for i, t in enumerate(pre[1:], start=1):
        name = _short(t.get("_target_"))
        if name not in PRE_TRANSFORMS:
            raise _refuse(
                "UNSUPPORTED_BUNDLE_TRANSFORM",
                f"preprocessing transform {name!r} is not supported (supported: {', '.join(sorted(PRE_TRANSFORMS))})",
                transform=name,
            )
        c.literal(t, f"preprocessing#transforms#{i}")
        if name == "Spacingd":
            pix: Any = t.get("pixdim")
            spacing = [float(p) for p in (pix if isinstance(pix, list) else [pix] * 3)]
        pre_names.append(name)

    inf = c.raw("inferer")
    if not isinstance(inf, Mapping) or _short(inf.get("_target_")) not in INFERERS:
        target = inf.get("_target_") if isinstance(inf, Mapping) else inf
        raise _refuse(
            "UNSUPPORTED_INFERER", f"inferer {target!r} is not supported (supported: {', '.join(sorted(INFERERS))})"
        )
    c.literal(inf, "inferer")

    post = c.transforms("postprocessing")
    post_names: list[str] = []
    have_invert = have_argmax = False
    for i, t in enumerate(post):
        name = _short(t.get("_target_"))
        if name not in POST_TRANSFORMS:
            raise _refuse(
                "UNSUPPORTED_BUNDLE_TRANSFORM",
                f"postprocessing transform {name!r} is not supported (supported: {', '.join(sorted(POST_TRANSFORMS))})",
                transform=name,
            )
        post_names.append(name)
        if name in DROPPED:
            continue  # not instantiated
        c.literal(t, f"postprocessing#transforms#{i}")
        if PRED_KEY not in _keys(t):
            continue
        if name == "Invertd":
            orig = t.get("orig_keys")
            orig_keys = [orig] if isinstance(orig, str) else list(orig or [])
            if t.get("transform") != "@preprocessing" or orig_keys != [IMAGE_KEY]:
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_TRANSFORM", "Invertd must invert '@preprocessing' with orig_keys 'image'"
                )
            have_invert = True
        if name == "AsDiscreted":
            if t.get("argmax") is not True:
                raise _refuse(
                    "UNSUPPORTED_BUNDLE_TRANSFORM",
                    "AsDiscreted must take the argmax (one label id per voxel); thresholded multi-label output is not supported",
                )
            have_argmax = True
    if not have_invert:
        raise _refuse(
            "UNSUPPORTED_BUNDLE_TRANSFORM",
            "postprocessing must invert the preprocessing (Invertd on 'pred'): labels are returned on the input's grid",
        )
    if not have_argmax:
        raise _refuse("UNSUPPORTED_BUNDLE_TRANSFORM", "postprocessing must end in label ids (AsDiscreted argmax=True)")

    amp = False
    try:
        ev = parser["evaluator"]
    except (KeyError, IndexError, TypeError, ValueError):
        ev = None
    if isinstance(ev, Mapping):
        if _short(ev.get("_target_")) != "SupervisedEvaluator":
            raise _refuse(
                "UNSUPPORTED_EVALUATOR", "evaluator must be a SupervisedEvaluator", evaluator=ev.get("_target_")
            )
        for key in ("inferer", "postprocessing"):
            if key in ev and ev[key] != f"@{key}":
                raise _refuse("UNSUPPORTED_EVALUATOR", f"evaluator.{key} must be '@{key}'")
        for key in ("prepare_batch", "decollate", "postprocessing_fn", "iteration_update", "amp_kwargs"):
            if key in ev:
                raise _refuse("UNSUPPORTED_EVALUATOR", f"evaluator argument {key!r} is not supported")
        amp = bool(ev.get("amp", False) is True)
    return {
        "network": net_cls,
        "preprocessing": pre_names,
        "inferer": dict(inf),
        "postprocessing": post_names,
        "dropped": [n for n in post_names if n in DROPPED],
        "amp": amp,
        "spacing": spacing,
    }


def read_labels(meta: Mapping[str, Any]) -> dict[int, str]:
    """``network_data_format.outputs.pred.channel_def`` -> {label id: name}, 0 = background."""
    try:
        chans = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = {int(k): str(v) for k, v in dict(chans).items()}
    except (KeyError, TypeError, ValueError):
        raise _refuse(
            "MISSING_LABEL_MAP",
            "metadata.json has no label map (network_data_format.outputs.pred.channel_def)",
        ) from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise _refuse("MISSING_LABEL_MAP", "channel_def must name the channels 0..N-1 (N >= 2)")
    return labels


def _parser(config: Path, meta: Path, bundle_root: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_meta(str(meta))
        parser.read_config(str(config))
    except Exception as exc:  # noqa: BLE001 - json / yaml / OS errors
        raise _refuse("INVALID_BUNDLE_CONFIG", f"cannot read the bundle config: {exc}") from None
    parser["bundle_root"] = str(bundle_root)
    return parser


def _files(bundle: Path) -> tuple[Path, Path, Path]:
    if not bundle.is_dir():
        raise _refuse("BUNDLE_NOT_FOUND", f"{bundle} is not a folder", path=bundle)
    meta = bundle / "configs" / "metadata.json"
    if not meta.is_file():
        raise _refuse("MISSING_BUNDLE_FILE", "configs/metadata.json is missing", file="configs/metadata.json")
    config = next((bundle / "configs" / n for n in CONFIG_NAMES if (bundle / "configs" / n).is_file()), None)
    if config is None:
        raise _refuse(
            "MISSING_BUNDLE_FILE", "configs/inference.json (or .yaml) is missing", file="configs/inference.json"
        )
    weights = next((bundle / "models" / n for n in WEIGHT_NAMES if (bundle / "models" / n).is_file()), None)
    if weights is None:
        raise _refuse("MISSING_BUNDLE_FILE", "models/model.pt (or model.ts) is missing", file="models/model.pt")
    return config, meta, weights


def _network(parser: Any, weights: Path) -> Any:
    import torch

    if weights.suffix == ".ts":
        try:
            return torch.jit.load(str(weights), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / ValueError
            raise _refuse("INVALID_WEIGHTS", f"models/model.ts is not TorchScript: {exc}") from None
    net = parser.get_parsed_content("network_def")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors
        raise _refuse("INVALID_WEIGHTS", f"models/model.pt is not a plain state dict: {exc}") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # CheckpointLoader's {"model": ...} layout
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - RuntimeError with the missing/unexpected keys
        raise _refuse("INVALID_WEIGHTS", f"models/model.pt does not fit network_def: {str(exc)[:300]}") from None
    return net


def import_monai_bundle(bundle_dir: str | Path, name: str, state_dir: str | Path, *, replace: bool = False) -> Manifest:
    """Check a bundle (module docstring), copy its config, metadata and weights into the registry."""
    check_name(name)
    src = Path(bundle_dir)
    config, meta_path, weights = _files(src)
    parser = _parser(config, meta_path, src)
    settings = check_config(parser)
    labels = read_labels(json.loads(meta_path.read_text()))
    net = _network(parser, weights)  # instantiates network_def and loads the weights strictly
    net_def = parser["network_def"]
    in_channels = int(net_def.get("in_channels", 1))
    out_channels = int(net_def.get("out_channels", len(labels)))
    roi = settings["inferer"].get("roi_size")
    registry = ModelRegistry(state_dir)
    staging = registry.staging()
    try:
        from atlasflow.models.export import export_bundle_network

        triton = export_bundle_network(staging, net, in_channels, out_channels, roi if isinstance(roi, list) else None)
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        shutil.copyfile(config, staging / "configs" / config.name)
        shutil.copyfile(meta_path, staging / "configs" / "metadata.json")
        shutil.copyfile(weights, staging / "models" / weights.name)
        manifest = Manifest(
            name=name,
            format=FORMAT,
            labels=labels,
            spacing_mm=tuple(settings["spacing"]),
            spacing_axes="xyz" if settings["spacing"] else "",
            files={},
            source=str(src.resolve()),
            importer=IMPORTER,
            importer_version=IMPORTER_VERSION,
            details={
                **settings,
                "config": f"configs/{config.name}",
                "weights": f"models/{weights.name}",
                "source_weights_sha256": sha256_file(weights),
                "triton": triton,
            },
        )
        return registry.commit(staging, manifest, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- inference


class MonaiBundleModel:
    """A registered ``monai-bundle`` model, loaded once; call per volume (module docstring)."""

    needs_affine = True

    def __init__(
        self, model_dir: str | Path, manifest: Manifest, device: str = "cpu", *, network: Any | None = None
    ) -> None:
        """In process (``network`` None): the bundle's network is loaded here. With
        ``network`` (a callable over window batches, e.g. the served network on Triton) the
        bundle's inferer calls it instead."""
        import torch

        base = Path(model_dir)
        self.manifest = manifest
        self.device = torch.device(device)
        config = base / str(manifest.details["config"])
        weights = base / str(manifest.details["weights"])
        parser = _parser(config, base / "configs" / "metadata.json", base)
        self.settings = check_config(parser)  # again: the stored config is what runs
        self.net = _network(parser, weights).to(self.device).eval() if network is None else network
        self.pre = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        post: list[Any] = []
        for i, t in enumerate(parser["postprocessing"]["transforms"]):
            if _short(t.get("_target_")) in DROPPED:
                continue
            xf = parser.get_parsed_content(f"postprocessing#transforms#{i}")
            if _short(t.get("_target_")) == "Invertd" and getattr(xf, "transform", None) is not self.pre:
                raise _refuse("INVALID_BUNDLE_CONFIG", "Invertd does not refer to the preprocessing instance")
            post.append(xf)
        self.post = post
        self.load = self.pre.transforms[0]
        n = len(manifest.labels)
        self.label_dtype = np.uint8 if n - 1 < 255 else np.uint16

    def _loaded(self, volume: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> dict[str, Any]:
        """What LoadImaged gives for this NIfTI (NibabelReader, the bundle's dtype)."""
        import nibabel as nib
        from monai.data import MetaTensor
        from monai.data.image_reader import NibabelReader
        from monai.utils import convert_to_dst_type

        loader = self.load._loader  # LoadImage inside LoadImaged: dtype, simple_keys, pattern, sep
        reader = NibabelReader()
        reader.filenames = ("volume",)  # what read() sets; get_data pairs images with names
        img_array, meta = reader.get_data(nib.Nifti1Image(volume, affine))
        img_array = convert_to_dst_type(img_array, dst=img_array, dtype=loader.dtype)[0]
        meta["filename_or_obj"] = "volume"
        img = MetaTensor.ensure_torch_and_prune_meta(
            img_array, meta, loader.simple_keys, pattern=loader.pattern, sep=loader.sep
        )
        if loader.ensure_channel_first:
            from monai.transforms import EnsureChannelFirst

            img = EnsureChannelFirst()(img)
        return {IMAGE_KEY: img}

    def __call__(
        self, volume: npt.ArrayLike, spacing_xyz: Sequence[float], affine: npt.ArrayLike | None = None
    ) -> npt.NDArray[Any]:
        """``volume`` ``(X, Y, Z)`` file voxel order + its 4x4 affine -> label ids ``(X, Y, Z)``."""
        import torch
        from monai.data import decollate_batch, list_data_collate
        from monai.transforms import apply_transform

        vol = np.asarray(volume)
        if vol.ndim != 3 or min(vol.shape) < 1:
            raise InvalidArgument("INVALID_VOLUME", "volume must be a non-empty (X, Y, Z) array", domain=DOMAIN)
        if affine is None:
            raise InvalidArgument("MISSING_AFFINE", "a MONAI bundle needs the volume's affine", domain=DOMAIN)
        aff = np.asarray(affine, dtype=np.float64)
        data: Any = self._loaded(vol, aff)
        for xf in self.pre.transforms[1:]:
            data = apply_transform(xf, data)
        batch = list_data_collate([data])
        inputs = batch[IMAGE_KEY].to(self.device)
        amp = bool(self.settings["amp"]) and self.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", enabled=amp):
            pred = self.inferer(inputs, self.net)
        item = decollate_batch({IMAGE_KEY: inputs, PRED_KEY: pred}, detach=True)[0]
        for xf in self.post:
            item = apply_transform(xf, item)
        out = item[PRED_KEY]
        arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != vol.shape:
            raise InvalidArgument(
                "GRID_MISMATCH",
                f"the bundle's output {list(arr.shape)} is not on the input grid {list(vol.shape)}",
                domain=DOMAIN,
            )
        return np.ascontiguousarray(np.rint(arr).astype(self.label_dtype))
