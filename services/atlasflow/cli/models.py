"""`atlasflow model list|import` and `atlasflow segment`: registered third-party models.

    atlasflow model import nnunet <trained_model_folder> --name NAME [--folds 0,1]
        [--checkpoint checkpoint_final.pth] --state-dir DIR
    atlasflow model list --state-dir DIR
    atlasflow segment ct.nii.gz --model NAME --out OUTDIR --state-dir DIR [--triton-url HOST:PORT]

The registry lives in ``<state-dir>/models/<name>/`` (`atlasflow.models.registry`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from atlasflow.cli.exitcodes import CliError, ExitCode
from atlasflow.cli.stack import state_dir_option
from atlasflow.common.errors import AlreadyExists, AtlasflowError, NotFound

_EXIT = {NotFound: ExitCode.NOT_FOUND, AlreadyExists: ExitCode.CONFLICT}


@contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except AtlasflowError as exc:
        code = next((c for t, c in _EXIT.items() if isinstance(exc, t)), ExitCode.INVALID)
        if exc.code == "DATA_LOSS":
            code = ExitCode.FAILURE
        raise CliError(f"{exc.reason}: {exc.message}", code) from None


@click.group(
    "model",
    epilog="\b\nExamples:\n  atlasflow model import nnunet Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres --name liver\n  atlasflow model list\n",
)
def model() -> None:
    """Registered models (nnU-Net v2 folders) that `atlasflow segment` runs."""


@model.group("import")
def import_() -> None:
    """Import a trained model into the registry."""


@import_.command(
    "nnunet",
    epilog="""\b
Examples:
  atlasflow model import nnunet nnUNet_results/Dataset017/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --name abdomen --folds 0,1 --state-dir .atlasflow
""",
)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="registry name ([a-z0-9][a-z0-9._-]*)")
@click.option("--folds", default="", help="comma-separated folds (default: every fold_*/ with the checkpoint)")
@click.option("--checkpoint", default="checkpoint_final.pth", show_default=True)
@click.option("--replace", is_flag=True, help="replace a model registered under the same name")
@state_dir_option()
def nnunet(folder: Path, name: str, folds: str, checkpoint: str, replace: bool, state_dir: Path) -> int:
    """Import an nnU-Net v2 trained-model folder (dataset.json, plans.json, fold_k/checkpoint)."""
    from atlasflow.models.nnunet import import_nnunet

    fold_list = [f.strip() for f in folds.split(",") if f.strip()] or None
    with _domain_errors():
        manifest = import_nnunet(folder, name, state_dir, folds=fold_list, checkpoint=checkpoint, replace=replace)
    click.echo(
        f"registered {manifest.name} ({manifest.format}, folds {','.join(manifest.details['folds'])}) digest {manifest.digest}"
    )
    return 0


@import_.command(
    "monai-bundle",
    epilog="""\b
Example:
  atlasflow model import monai-bundle spleen_ct_segmentation --name spleen --state-dir .atlasflow
""",
)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="registry name ([a-z0-9][a-z0-9._-]*)")
@click.option("--replace", is_flag=True, help="replace a model registered under the same name")
@state_dir_option()
def monai_bundle(bundle: Path, name: str, replace: bool, state_dir: Path) -> int:
    """Import a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)."""
    from atlasflow.models.monai_bundle import import_monai_bundle

    with _domain_errors():
        manifest = import_monai_bundle(bundle, name, state_dir, replace=replace)
    click.echo(
        f"registered {manifest.name} ({manifest.format}, network {manifest.details['network']}) digest {manifest.digest}"
    )
    return 0


@model.command(
    "triton-export",
    epilog="\b\nExample:\n  atlasflow model triton-export abdomen --repository /models --state-dir .atlasflow\n",
)
@click.argument("name")
@click.option("--repository", required=True, type=click.Path(file_okay=False, path_type=Path))
@state_dir_option()
def triton_export(name: str, repository: Path, state_dir: Path) -> int:
    """Copy a model's Triton export (config.pbtxt, 1/model.pt; PyTorch backend) into a stock
    Triton's model repository as REPOSITORY/<name>_<digest12>/."""
    from atlasflow.models.export import write_repository_entry

    with _domain_errors():
        target = write_repository_entry(state_dir, name, repository)
    click.echo(f"wrote {target}")
    return 0


@model.command("list", epilog="\b\nExample:\n  atlasflow model list --state-dir .atlasflow --json\n")
@state_dir_option()
@click.option("--json", "as_json", is_flag=True, help="the manifests as JSON")
def list_(state_dir: Path, as_json: bool) -> int:
    """Name, format, labels and digest of every registered model."""
    from atlasflow.models.registry import ModelRegistry

    with _domain_errors():
        manifests = list(ModelRegistry(state_dir))
    if as_json:
        click.echo(json.dumps([m.to_json() for m in manifests], indent=2))
        return 0
    if not manifests:
        click.echo(f"no models registered under {state_dir / 'models'}", err=True)
        return 0
    click.echo(f"{'NAME':20s} {'FORMAT':13s} {'DIGEST':16s} LABELS")
    for m in manifests:
        labels = ", ".join(f"{i}={n}" for i, n in sorted(m.labels.items()) if i)
        click.echo(f"{m.name:20s} {m.format:13s} {m.digest[:16]:16s} {labels}")
    return 0


@click.command(
    "segment",
    epilog="""\b
Example:
  atlasflow segment ct.nii.gz --model abdomen --out seg/ --state-dir .atlasflow
  (writes seg/labels.nii.gz on ct.nii.gz's voxel grid, and seg/segment.json)
""",
)
@click.argument("ct", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", required=True, help="a registered model (atlasflow model list)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="where the network runs (local Triton or in process)")
@click.option(
    "--triton-url",
    default=None,
    help="gRPC host:port of a Triton serving the model (default: a local PyTriton started for this command)",
)
@click.option("--in-process", is_flag=True, help="run the network in this process instead of on Triton")
@state_dir_option()
def segment(
    ct: Path, model_name: str, out: Path, device: str, triton_url: str | None, in_process: bool, state_dir: Path
) -> int:
    """Segment one NIfTI CT with a registered model; OUT/labels.nii.gz has the model's label ids.

    The network runs on Triton (pre-processing and tiling here)."""
    from atlasflow.models.segment import segment_file

    with _domain_errors():
        summary = segment_file(
            ct, model_name, out, state_dir, device=device, triton_url=triton_url, in_process=in_process
        )
    click.echo(json.dumps(summary, indent=2))
    return 0


COMMANDS: tuple[Callable[..., Any], ...] = (model, segment)
