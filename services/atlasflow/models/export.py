"""Export of a registered model's network for Triton (written at import, digested in the manifest).

Layout inside the model's registry folder (``<state-dir>/models/<name>/``)::

    triton/config.pbtxt      backend "pytorch" (libtorch), max_batch_size 0, FP32 in and out
    triton/1/model.pt        TorchScript of the served network

The same ``model.pt`` is what the local PyTriton binding loads (`atlasflow.segmentation.
model_serving`), so the equality tests run the exported artifact. A stock Triton serves
``triton/`` as one model of a model repository under the name `triton_model_name` (copy or
link the folder to ``<repository>/<that name>/``; ``config.pbtxt`` names no model, so the
folder name is the model name).

What the served network computes (one call = one batch of sliding-window tiles):

nnunet-v2     ``INPUT__0`` FP32 ``[N, 1, *patch]`` (normalised, resampled tiles in nnU-Net's
              axis order) and ``INPUT__1`` INT64 ``[1]`` (the fold index) -> ``OUTPUT__0``
              FP32 ``[N, K, *patch]``: that fold's logits averaged over the tile and its flips
              over every non-empty subset of the allowed mirror axes (nnUNetPredictor's
              mirroring, the flips of the N tiles in one network batch). The fold networks
              are traced (``torch.jit.trace``; dynamic_network_architectures' classes do not
              script), the mirroring wrapper is scripted. Folds are separate calls, fold
              after fold over the whole volume, as nnUNetPredictor does: its float16
              accumulation per fold is kept (a fold average inside the served model changed
              ~0.03 % of the voxels of the tiny test model, float16 rounding of near-ties),
              and the client holds one float16 accumulator, not one per fold. Tiling, the
              Gaussian weighting and everything around stay on the client
              (`atlasflow.models.nnunet_infer`).
monai-bundle  ``INPUT__0`` FP32 ``[N, C, -1, -1, -1]`` (one window batch of the bundle's
              inferer) -> ``OUTPUT__0`` FP32 ``[N, K, -1, -1, -1]``: the bundle's network
              (``torch.jit.script``; traced on the inferer's roi if it does not script;
              a bundle's own ``model.ts`` as is). The inferer, pre- and post-processing stay
              on the client (`atlasflow.models.monai_bundle`).

Why TorchScript on the PyTorch backend (not ONNX): the trace of PlainConvUNet /
ResidualEncoderUNet and the script of MONAI's UNet reproduce the eager network bit for bit on
CPU (checked at export: the exported module is run on one example batch and must equal the
eager network exactly), the mirroring and fold averaging stay one scripted module with
dynamic batch, and no exporter beyond torch is needed (torch's ONNX exporter needs onnxscript
and onnxruntime, which are not installed here, and InstanceNorm/flip export is a source of
numeric differences).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atlasflow.common.errors import InvalidArgument
from atlasflow.models.registry import DOMAIN, Manifest

TRITON_DIR = "triton"
MODEL_FILE = "triton/1/model.pt"
CONFIG_FILE = "triton/config.pbtxt"
INPUT = "INPUT__0"
FOLD_INPUT = "INPUT__1"  # nnunet-v2 only: INT64 [1], the fold index (0 .. folds - 1)
OUTPUT = "OUTPUT__0"
BACKEND = "pytorch"


def triton_model_name(manifest: Manifest) -> str:
    """``<name>`` + the first 12 hex digits of the registry digest: a new import (other
    weights, other export) is a new Triton model, never a silent swap."""
    return f"{re.sub(r'[^a-z0-9_]', '_', manifest.name)}_{manifest.digest[:12]}"


class MirrorFoldNet(torch.nn.Module):
    """nnUNetPredictor's per-tile prediction for a batch of tiles of one fold: the mirroring TTA."""

    combos: list[list[int]]

    def __init__(self, nets: Sequence[torch.nn.Module], combos: list[list[int]]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.combos = combos

    def forward(self, x: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        f = int(fold.reshape(-1)[0])
        pred = torch.zeros(0)
        found = False
        for i, net in enumerate(self.nets):
            if i == f:
                found = True
                if len(self.combos) == 0:
                    pred = net(x)
                else:
                    batch = torch.cat([x] + [torch.flip(x, c) for c in self.combos])
                    out = net(batch)
                    pred = out[0:n].clone()
                    for j in range(len(self.combos)):
                        pred += torch.flip(out[(j + 1) * n : (j + 2) * n], self.combos[j])
                    pred /= float(len(self.combos) + 1)
        if not found:
            raise ValueError("fold index out of range")
        return pred


# TorchScript reads the class annotation as a type, not the postponed string of `from __future__ import annotations`.
MirrorFoldNet.__annotations__["combos"] = list[list[int]]


def mirror_combos(mirror_axes: Sequence[int] | None) -> list[list[int]]:
    """Every non-empty subset of the mirror axes, as tensor dims of ``(N, C, *spatial)``."""
    if not mirror_axes:
        return []
    dims = [int(a) + 2 for a in mirror_axes]
    return [list(c) for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def _check_equal(exported: Any, eager: torch.nn.Module, example: Sequence[torch.Tensor], what: str) -> None:
    with torch.inference_mode():
        a, b = exported(*example), eager(*example)
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or not torch.equal(a, b):
        raise InvalidArgument(
            "EXPORT_MISMATCH",
            f"the TorchScript export of the {what} does not reproduce the network exactly",
            domain=DOMAIN,
        )


Spec = tuple[str, str, Sequence[int]]  # tensor name, Triton dtype (FP32 / INT64), dims


def config_pbtxt(inputs: Sequence[Spec], outputs: Sequence[Spec]) -> str:
    """Triton model configuration (no ``name``: the repository folder names the model)."""

    def tensors(specs: Sequence[Spec]) -> str:
        return ", ".join(
            f'{{ name: "{n}" data_type: TYPE_{t} dims: [ {", ".join(str(int(v)) for v in d)} ] }}' for n, t, d in specs
        )

    return (
        f'backend: "{BACKEND}"\n'
        "max_batch_size: 0\n"
        f"input [ {tensors(inputs)} ]\n"
        f"output [ {tensors(outputs)} ]\n"
        'parameters: { key: "INFERENCE_MODE" value: { string_value: "true" } }\n'
    )


def _write(staging: Path, module: Any, inputs: Sequence[Spec], outputs: Sequence[Spec]) -> dict[str, Any]:
    (staging / MODEL_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(module, str(staging / MODEL_FILE))
    (staging / CONFIG_FILE).write_text(config_pbtxt(inputs, outputs))
    return {
        "backend": BACKEND,
        "model_file": MODEL_FILE,
        "config_file": CONFIG_FILE,
        "inputs": [[n, t, list(d)] for n, t, d in inputs],
        "outputs": [[n, t, list(d)] for n, t, d in outputs],
    }


def export_nnunet(
    staging: Path,
    nets: Sequence[torch.nn.Module],
    patch: Sequence[int],
    num_classes: int,
    mirror_axes: Sequence[int] | None,
) -> dict[str, Any]:
    """Trace the fold networks, script the mirroring/fold wrapper, write ``triton/``; returns
    the manifest's ``details["triton"]``."""
    example = torch.zeros((2, 1, *[int(p) for p in patch]))
    example[:, :, ::2] = 1.0  # not constant: a real check of the trace
    traced = []
    with torch.inference_mode():
        for net in nets:
            net.eval()
            tr = torch.jit.trace(net, example, check_trace=False)
            _check_equal(tr, net, [example], "nnU-Net network")
            traced.append(tr)
    combos = mirror_combos(mirror_axes)
    wrapper = torch.jit.script(MirrorFoldNet(traced, combos))
    for f in range(len(nets)):
        fold = torch.tensor([f], dtype=torch.int64)
        _check_equal(wrapper, MirrorFoldNet(list(nets), combos), [example, fold], "mirroring wrapper")
    info = _write(
        staging,
        wrapper,
        [(INPUT, "FP32", [-1, 1, *patch]), (FOLD_INPUT, "INT64", [1])],
        [(OUTPUT, "FP32", [-1, num_classes, *patch])],
    )
    info["folds"] = len(nets)
    info["window"] = [int(p) for p in patch]
    info["mirror_combos"] = combos
    return info


def export_bundle_network(
    staging: Path, net: torch.nn.Module, in_channels: int, num_classes: int, roi: Sequence[int] | None
) -> dict[str, Any]:
    """Script the bundle's network (trace on the roi if it does not script), write ``triton/``."""
    net = net.eval()
    side = [int(r) for r in roi] if roi else [32, 32, 32]
    example = torch.linspace(0, 1, in_channels * int(torch.tensor(side).prod())).reshape(1, in_channels, *side)
    module: Any
    if isinstance(net, torch.jit.ScriptModule):
        module, how = net, "torchscript (bundle's model.ts)"
    else:
        try:
            module, how = torch.jit.script(net), "script"
        except Exception:  # noqa: BLE001 - not scriptable: trace on the inferer's window
            with torch.inference_mode():
                module, how = torch.jit.trace(net, example, check_trace=False), "trace"
        _check_equal(module, net, [example], "bundle network")
    info = _write(
        staging,
        module,
        [(INPUT, "FP32", [-1, in_channels, -1, -1, -1])],
        [(OUTPUT, "FP32", [-1, num_classes, -1, -1, -1])],
    )
    info["export"] = how
    return info


def load_served(model_dir: Path, manifest: Manifest, device: str = "cpu") -> torch.jit.ScriptModule:
    """The exported TorchScript of a registered model (files already verified by the registry)."""
    info = manifest.details.get("triton")
    if not isinstance(info, dict):
        raise InvalidArgument(
            "MODEL_NOT_EXPORTED",
            f"model {manifest.name!r} was imported before the Triton export existed: import it again with --replace",
            domain=DOMAIN,
            metadata={"name": manifest.name},
        )
    module: torch.jit.ScriptModule = torch.jit.load(str(model_dir / str(info["model_file"])), map_location=device)
    return module.eval()


def write_repository_entry(state_dir: str | Path, name: str, repository: str | Path) -> Path:
    """Copy the registered model's verified ``triton/`` folder to
    ``<repository>/<triton_model_name>/`` (a stock Triton's model repository); returns it."""
    import shutil

    from atlasflow.models.registry import ModelRegistry

    registry = ModelRegistry(state_dir)
    manifest = registry.verify(name)
    if not isinstance(manifest.details.get("triton"), dict):
        load_served(registry.path(name), manifest)  # raises MODEL_NOT_EXPORTED
    target = Path(repository) / triton_model_name(manifest)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(registry.path(name) / TRITON_DIR, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
