"""Fine-tuning of ensemble members on a training manifest (MONAI networks, CPU or GPU).

Each member starts from its current weights (`atlasflow.segmentation.models.load_member`, the
trio in segmentation/weights or the parent version's files) and is trained on the manifest's
``train`` cases with `atlasflow.training.loss.MaskedDiceCELoss` (undecided organs masked out).

Data: each case's CT goes through the segmentation pipeline's own preprocessing
(`atlasflow.segmentation.pipeline.preprocess`: HU window -> [0, 1], RAS model grid at the
member's spacing); the organ masks are resampled onto the same grid with the same `resample`
(trilinear, > 0.5). Per step, MONAI transforms draw a random crop of ``crop_size`` (default:
the member's patch size): ``SpatialPadd`` (constant 0 = windowed air, as sliding-window
inference pads) then ``RandCropByPosNegLabeld`` around a decided organ with probability
``pos_fraction``. No flips (a left-right flip swaps the kidneys).

Determinism: the randomness of step ``s`` is seeded from ``(seed, member, s)`` alone (case
choice, crop, ``torch.manual_seed``), the learning rate is a function of ``s``, and on CPU
training runs with one torch thread under ``torch.use_deterministic_algorithms(True)``. A run
resumed from a checkpoint therefore repeats the uninterrupted run's steps exactly: the
checkpoint holds the weights and the AdamW state in fp32, and the final weights are
bit-identical (tests/training/test_training_finetune.py kills a trainer with SIGKILL and
checks this). On GPU, bf16 autocast (``autocast="bf16"``) and cuDNN kernels may make runs
differ in the last bits; that has not been measured here.

Checkpoints every ``checkpoint_every`` steps (and at the end) are written atomically to
``<run_dir>/<member>/checkpoint.pt``; the loss curve is ``<run_dir>/<member>/log.jsonl`` (one
JSON object per step: member, step, loss, lr, seconds); on resume, lines after the checkpoint's
step are dropped before training goes on. Each member is one OpenTelemetry span
(``training.finetune``), each checkpoint a span event.

Run as a process: ``python -m atlasflow.training.finetune --manifest M --blobs DIR --run-dir R``
(what the worker and the kill test do).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opentelemetry import trace

from atlasflow.common.blobstore import BlobStore, LocalBlobStore
from atlasflow.common.errors import AtlasflowError, InvalidArgument
from atlasflow.segmentation.ensemble import EnsembleConfig, MemberConfig, load_ensemble
from atlasflow.segmentation.grid import resample
from atlasflow.segmentation.models import load_member
from atlasflow.segmentation.pipeline import preprocess
from atlasflow.training.dataset import DOMAIN, Manifest, atomic_write, load_case, load_manifest
from atlasflow.training.loss import MaskedDiceCELoss

_tracer = trace.get_tracer("atlasflow.training")


@dataclass(frozen=True)
class Hyperparameters:
    """A run's settings (stored in the manifest). steps: optimiser steps per member;
    batch_size: crops per step; lr: peak AdamW learning rate (linear warm-up over
    ``warmup_steps``, then cosine decay to 10 %); crop_size: voxels (X, Y, Z), empty = the
    member's patch size; checkpoint_every: steps between checkpoints; autocast: "none" or
    "bf16" (GPU); members: names to train, empty = all."""

    steps: int = 20
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    crop_size: tuple[int, ...] = ()
    pos_fraction: float = 0.85
    checkpoint_every: int = 5
    autocast: str = "none"
    members: tuple[str, ...] = ()
    pseudo_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_size"] = list(self.crop_size)
        d["members"] = list(self.members)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hyperparameters:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise InvalidArgument(
                "INVALID_HYPERPARAMETERS",
                "unknown hyperparameter",
                domain=DOMAIN,
                metadata={"name": sorted(unknown)[0]},
            )
        hp = dict(d)
        hp["crop_size"] = tuple(int(v) for v in hp.get("crop_size", ()))
        hp["members"] = tuple(str(v) for v in hp.get("members", ()))
        out = cls(**hp)
        if out.steps < 1 or out.batch_size < 1 or out.checkpoint_every < 1 or out.autocast not in ("none", "bf16"):
            raise InvalidArgument("INVALID_HYPERPARAMETERS", "steps, batch_size, checkpoint_every >= 1", domain=DOMAIN)
        if out.crop_size and len(out.crop_size) != 3:
            raise InvalidArgument("INVALID_HYPERPARAMETERS", "crop_size must be 3 integers", domain=DOMAIN)
        return out

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step ``step``."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


@dataclass
class MemberData:
    """A member's training cases on its model grid: images (1, X, Y, Z) float32, organs
    (9, X, Y, Z) uint8, weights (9,) float32, in manifest order."""

    images: list[torch.Tensor] = field(default_factory=list)
    organs: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


def prepare_member_data(manifest: Manifest, blobs: BlobStore, member: MemberConfig) -> MemberData:
    """Load and preprocess the manifest's train cases for one member (pipeline preprocessing)."""
    data = MemberData()
    for case in manifest.train:
        arrays = load_case(blobs, case)
        image, g_aff = preprocess(torch.from_numpy(arrays.hu), arrays.affine, member.preprocessing)
        g_shape = tuple(int(v) for v in image.shape[1:])
        organs = resample(torch.from_numpy(arrays.organs).float(), arrays.affine, g_aff, g_shape)  # type: ignore[arg-type]  # (X, Y, Z) tuple
        data.images.append(image.contiguous())
        data.organs.append((organs > 0.5).to(torch.uint8))
        data.weights.append(torch.from_numpy(arrays.weights))
    return data


def _crop_transform(crop: Sequence[int], pos_fraction: float) -> Any:
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    return Compose(
        [
            SpatialPadd(keys=("image", "organs", "fg"), spatial_size=tuple(crop), mode="constant"),
            RandCropByPosNegLabeld(
                keys=("image", "organs"),
                label_key="fg",
                spatial_size=tuple(crop),
                pos=pos_fraction,
                neg=1.0 - pos_fraction,
                num_samples=1,
                allow_smaller=True,
            ),
        ]
    )


def _step_seed(seed: int, member: str, step: int, sample: int = 0) -> int:
    h = hashlib.sha256(f"{seed}:{member}:{step}:{sample}".encode()).digest()
    return int.from_bytes(h[:4], "big")


def sample_batch(
    data: MemberData, hp: Hyperparameters, crop: Sequence[int], seed: int, member: str, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: images (B, 1, *crop), organs (B, 9, *crop) float, weights (B, 9);
    a function of (seed, member, step) only."""
    transform = _crop_transform(crop, hp.pos_fraction)
    images, organs, weights = [], [], []
    for b in range(hp.batch_size):
        s = _step_seed(seed, member, step, b)
        rng = np.random.default_rng(s)
        i = int(rng.integers(len(data.images)))
        w = data.weights[i]
        fg = (data.organs[i].float() * (w > 0).float().view(-1, 1, 1, 1)).amax(0, keepdim=True)
        transform.set_random_state(seed=s)
        out = transform({"image": data.images[i], "organs": data.organs[i].float(), "fg": fg})[0]
        images.append(torch.as_tensor(out["image"]).as_subclass(torch.Tensor))
        organs.append(torch.as_tensor(out["organs"]).as_subclass(torch.Tensor))
        weights.append(w)
    return torch.stack(images), torch.stack(organs), torch.stack(weights)


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """One torch thread on CPU and deterministic algorithms; restores the previous settings."""
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


@dataclass(frozen=True)
class MemberResult:
    """A trained member: weights file (fp32 state_dict), its digest, steps, last loss, seconds."""

    member: str
    weights: Path
    digest: str
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int


class TrainingCancelled(AtlasflowError):
    """The run stopped on request after writing a checkpoint (gRPC CANCELLED)."""

    code = "CANCELLED"

    def __init__(self, member: str, step: int) -> None:
        super().__init__(
            "TRAINING_CANCELLED",
            "training was cancelled",
            domain=DOMAIN,
            metadata={"member": member, "step": str(step)},
        )


def finetune_member(
    member: MemberConfig,
    manifest: Manifest,
    manifest_digest: str,
    blobs: BlobStore,
    run_dir: Path,
    *,
    device: str = "cpu",
    on_progress: Callable[[str, int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data: MemberData | None = None,
) -> MemberResult:
    """Fine-tune one member on ``manifest`` (resuming ``run_dir/<member>/checkpoint.pt`` when it
    belongs to the same run); returns the final weights. Raises `TrainingCancelled` after
    checkpointing when ``should_stop()`` turns true."""
    hp = Hyperparameters.from_dict(manifest.hyperparameters)
    dev = torch.device(device)
    folder = run_dir / member.name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path, final_path = folder / "checkpoint.pt", folder / "log.jsonl", folder / "weights.pt"
    parent = sha256_file(member.checkpoint) if member.checkpoint else f"seed:{member.seed}"
    run_key = hashlib.sha256(f"{manifest_digest}|{member.name}|{parent}".encode()).hexdigest()
    crop = tuple(hp.crop_size) or tuple(member.preprocessing.patch_size)
    with _tracer.start_as_current_span("training.finetune") as span, deterministic(dev):
        span.set_attribute("atlasflow.member", member.name)
        span.set_attribute("atlasflow.manifest_digest", manifest_digest)
        span.set_attribute("atlasflow.steps", hp.steps)
        t0 = time.perf_counter()
        net = load_member(member, dev)
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        start = 0
        if ckpt_path.is_file():
            state = torch.load(str(ckpt_path), map_location=dev, weights_only=True)
            if state.get("run_key") == run_key:
                net.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                start = int(state["step"])
                span.add_event("resumed", {"step": start})
        _truncate_log(log_path, start)
        if data is None:
            data = prepare_member_data(manifest, blobs, member)
        if not data.images:
            raise InvalidArgument("NO_TRAINING_CASES", "the manifest has no train cases", domain=DOMAIN)
        loss_fn = MaskedDiceCELoss(member.activation)
        span.set_attribute("atlasflow.resumed_from", start)
        loss_value = float("nan")
        with log_path.open("a") as log:
            for step in range(start, hp.steps):
                if should_stop is not None and should_stop():
                    _checkpoint(ckpt_path, net, opt, step, run_key)
                    raise TrainingCancelled(member.name, step)
                ts = time.perf_counter()
                lr = hp.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                images, organs, weights = sample_batch(data, hp, crop, manifest.seed, member.name, step)
                torch.manual_seed(_step_seed(manifest.seed, member.name, step, -1))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=hp.autocast == "bf16"):
                    logits = net(images.to(dev))
                loss = loss_fn(logits.float(), organs.to(dev), weights.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
                log.write(
                    json.dumps(
                        {
                            "member": member.name,
                            "step": step + 1,
                            "loss": loss_value,
                            "lr": lr,
                            "seconds": round(time.perf_counter() - ts, 4),
                        }
                    )
                    + "\n"
                )
                log.flush()
                if on_progress is not None:
                    on_progress(member.name, step + 1, hp.steps, loss_value)
                if (step + 1) % hp.checkpoint_every == 0 or step + 1 == hp.steps:
                    _checkpoint(ckpt_path, net, opt, step + 1, run_key)
                    span.add_event("checkpoint", {"step": step + 1, "loss": loss_value})
        state_dict = {
            k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            for k, v in net.state_dict().items()
        }
        _save(state_dict, final_path)
        seconds = time.perf_counter() - t0
        span.set_attribute("atlasflow.final_loss", loss_value)
        return MemberResult(member.name, final_path, sha256_file(final_path), hp.steps, loss_value, seconds, start)


def _checkpoint(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, step: int, run_key: str) -> None:
    _save({"step": step, "run_key": run_key, "model": net.state_dict(), "optimizer": opt.state_dict()}, path)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss-curve lines of steps <= ``step`` (those after a checkpoint are redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by the kill
    atomic_write(path, "".join(line + "\n" for line in keep).encode())


def members_to_train(ensemble: EnsembleConfig, hp: Hyperparameters) -> list[MemberConfig]:
    chosen = [m for m in ensemble.members if not hp.members or m.name in hp.members]
    if not chosen:
        raise InvalidArgument("INVALID_HYPERPARAMETERS", "no ensemble member matches 'members'", domain=DOMAIN)
    return chosen


def trainer_arguments(prog: str, blobs_help: str, description: str) -> argparse.ArgumentParser:
    """The command line of a trainer process (this module's `main`, `atlasflow.training.job`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--manifest", required=True, help="manifest file (<sha256 hex>.json)")
    parser.add_argument("--blobs", required=True, help=blobs_help)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--ensemble", required=True, help="parent ensemble version or JSON path")
    parser.add_argument("--device", default="cpu")
    return parser


def this_ranks_share(args: argparse.Namespace) -> tuple[Manifest, str, list[MemberConfig], str]:
    """(manifest, its digest, the members this process trains, its device) of a trainer.

    Under torchrun (the Kubernetes Job: --nproc_per_node = the node's GPUs) each rank trains its
    share of the members (rank r: members r, r + world, ...) on cuda:<LOCAL_RANK>;
    member-parallel, no gradient exchange (each member is its own model)."""
    manifest, digest = load_manifest(args.manifest)
    hp = Hyperparameters.from_dict(manifest.hyperparameters)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return manifest, digest, members_to_train(load_ensemble(args.ensemble), hp)[rank::world], device


def main(argv: Sequence[str] | None = None) -> int:
    args = trainer_arguments(
        "python -m atlasflow.training.finetune", "blob store directory", __doc__.split("\n")[0]
    ).parse_args(argv)
    manifest, digest, members, device = this_ranks_share(args)
    blobs = LocalBlobStore(args.blobs)
    for member in members:
        result = finetune_member(member, manifest, digest, blobs, Path(args.run_dir), device=device)
        print(
            json.dumps({"member": result.member, "digest": result.digest, "final_loss": result.final_loss}), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
