"""Build and load ensemble members (MONAI networks) from their `MemberConfig`.

Without a checkpoint a member is initialised deterministically (``torch.manual_seed(seed)``
before construction), so every process that loads the same ensemble file gets bit-identical
weights; such a member is *untrained* (``member_weights_trained(cfg) is False``).

A checkpoint may be:
- a MONAI/PyTorch ``state_dict`` saved with ``torch.save`` (optionally wrapped as
  ``{"state_dict": ...}``, ``{"model": ...}`` or ``{"net": ...}``, keys optionally prefixed
  ``module.`` by DistributedDataParallel); it is loaded strictly into the configured
  architecture;
- a TorchScript file (``torch.jit.save``); its output channel count is checked with one dummy
  patch.
Keys or shapes that do not fit raise InvalidArgument(``CHECKPOINT_MISMATCH``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atlasflow.common.errors import FailedPrecondition, InvalidArgument
from atlasflow.segmentation.ensemble import DOMAIN, MemberConfig

_ARCHITECTURES = ("monai.UNet", "monai.SwinUNETR", "monai.DynUNet")
# torch.jit.load carries no annotations; what it returns is a ScriptModule.
_jit_load: Callable[..., torch.jit.ScriptModule] = torch.jit.load


def build_member(cfg: MemberConfig) -> torch.nn.Module:
    """Construct the configured architecture with seeded (untrained) weights, in eval mode.

    Networks take ``(N, 1, X, Y, Z)`` float32 input (HU window scaled to [0, 1]) and return
    ``(N, C, X, Y, Z)`` logits, C = 9 (sigmoid) or 10 (softmax with background).
    """
    from monai.networks.nets.dynunet import DynUNet
    from monai.networks.nets.swin_unetr import SwinUNETR
    from monai.networks.nets.unet import UNet

    kwargs: dict[str, Any] = dict(cfg.kwargs)
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "monai.UNet":
        net: torch.nn.Module = UNet(**kwargs)
    elif cfg.architecture == "monai.SwinUNETR":
        if any(p % 32 for p in cfg.preprocessing.patch_size):
            raise InvalidArgument(
                "INVALID_ENSEMBLE_CONFIG",
                "SwinUNETR patch dimensions must be divisible by 32",
                domain=DOMAIN,
                metadata={"member": cfg.name},
            )
        net = SwinUNETR(**kwargs)
    elif cfg.architecture == "monai.DynUNet":
        net = DynUNet(**kwargs)
    else:
        raise InvalidArgument(
            "INVALID_ENSEMBLE_CONFIG",
            f"unknown architecture; expected one of {_ARCHITECTURES}",
            domain=DOMAIN,
            metadata={"member": cfg.name, "architecture": cfg.architecture},
        )
    return net.eval()


def member_weights_trained(cfg: MemberConfig) -> bool:
    """True when the member loads a checkpoint, False for seeded untrained weights."""
    return cfg.checkpoint is not None


def _mismatch(cfg: MemberConfig, message: str, **metadata: Any) -> InvalidArgument:
    return InvalidArgument(
        "CHECKPOINT_MISMATCH",
        message,
        domain=DOMAIN,
        metadata={"member": cfg.name, "architecture": cfg.architecture, **metadata},
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives contain ``<root>/constants.pkl`` and ``<root>/code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    return None


def load_member(cfg: MemberConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Return the member network in eval mode on ``device``.

    No checkpoint: seeded untrained weights. State dict: loaded strictly into the configured
    architecture. TorchScript: loaded as is, output channels checked.
    Raises FailedPrecondition(``CHECKPOINT_NOT_FOUND``) if the file is missing and
    InvalidArgument(``CHECKPOINT_MISMATCH``) if its keys, shapes or outputs do not fit.
    """
    net = build_member(cfg)
    if cfg.checkpoint is None:
        return net.to(device)
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise FailedPrecondition(
            "CHECKPOINT_NOT_FOUND",
            "member checkpoint file is missing",
            domain=DOMAIN,
            metadata={"member": cfg.name},
        )
    if _is_torchscript(path):
        try:
            scripted = _jit_load(str(path), map_location=device)
        except Exception:  # noqa: BLE001 - corrupt archive
            raise _mismatch(cfg, "TorchScript checkpoint cannot be loaded", format="torchscript") from None
        scripted.eval()
        expected = int(cfg.kwargs["out_channels"])
        patch = (1, int(cfg.kwargs.get("in_channels", 1)), *cfg.preprocessing.patch_size)
        try:
            with torch.inference_mode():
                out = scripted(torch.zeros(patch, device=device))
        except Exception:  # noqa: BLE001 - wrong input contract
            raise _mismatch(cfg, "TorchScript model rejects a configured input patch", format="torchscript") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (patch[0], expected, *patch[2:]):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _mismatch(
                cfg,
                "TorchScript model output does not match the configured channels/patch",
                format="torchscript",
                expected_channels=expected,
                got_shape=str(shape),
            )
        return scripted
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file
        raise _mismatch(cfg, "checkpoint is neither a state_dict nor TorchScript", format="unknown") from None
    state = _extract_state_dict(obj)
    if state is None:
        raise _mismatch(cfg, "checkpoint holds no tensor state_dict", format="state_dict")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shapes:
        raise _mismatch(
            cfg,
            "checkpoint keys or shapes do not match the configured architecture",
            format="state_dict",
            missing_keys=len(missing),
            unexpected_keys=len(unexpected),
            shape_mismatches=len(bad_shapes),
            first_problem=(missing or unexpected or bad_shapes)[0],
        )
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()
