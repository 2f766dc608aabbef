"""A tiny MONAI bundle in the standard layout, made in the test set-up with MONAI's own code.

``configs/metadata.json`` (label map in ``network_data_format.outputs.pred.channel_def``),
``configs/inference.json`` (the layout of MONAI's model-zoo segmentation bundles: LoadImaged,
EnsureChannelFirstd, Orientationd RAS, Spacingd 2.5x2.5x3.5 mm bilinear, ScaleIntensityRanged
[-175, 250] -> [0, 1], EnsureTyped; SlidingWindowInferer 64x64x16, overlap 0.25, Gaussian;
Activationsd softmax, Invertd back to the input grid, AsDiscreted argmax, SaveImaged; a
SupervisedEvaluator with a CheckpointLoader handler) and ``models/model.pt`` (a state dict).

The network is a 3-level MONAI ``UNet`` (8/16/32 channels, batch norm) trained for a few Adam
steps on TotalSegmentator's ``example_ct_sm.nii.gz`` with its labels mapped to 1 liver,
2 spleen, 3 kidney_left, 4 kidney_right (seeded): the point is equality with ``monai.bundle
run``, not accuracy, but the trained output has real organ-shaped regions to compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "tests" / "reference_files"
CT_SM = DATA / "example_ct_sm.nii.gz"
SEG_SM = DATA / "example_seg.nii.gz"
CHANNELS = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_left", "4": "kidney_right"}
TOTALSEG_TO_OURS = {5: 1, 1: 2, 3: 3, 2: 4}
PIXDIM = [2.5, 2.5, 3.5]
ROI = [64, 64, 16]

NETWORK_DEF = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(CHANNELS),
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "batch",
}


def inference_config() -> dict:
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": NETWORK_DEF,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": PIXDIM, "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -175,
                    "a_max": 250,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": ROI,
            "sw_batch_size": 4,
            "overlap": 0.25,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "meta_key_postfix": "meta_dict",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "resample": False,
                    "output_dtype": "$np.uint8",
                    "separate_folder": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata() -> dict:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "monai_version": "1.6.1",
        "name": "atlasflow tiny abdomen bundle (test fixture)",
        "task": "abdominal organ segmentation",
        "description": "a tiny UNet trained for a few steps; equality fixture only",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": ROI,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(CHANNELS),
                    "spatial_shape": ROI,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": CHANNELS,
                }
            },
        },
    }


def shared_bundle(tmp_path_factory: Any) -> Path:
    """`make_bundle` once per test session (pytest's ``tmp_path_factory``): every test module
    that needs the tiny bundle gets the same folder (read only), trained once."""
    root = tmp_path_factory.getbasetemp() / "monai-bundle-shared"
    done = root / "DONE"
    if not done.exists():
        make_bundle(root)
        done.write_text("ok\n")
    return root / "tiny_abdomen"


def make_bundle(root: Path, steps: int = 30, seed: int = 0) -> Path:
    """Write ``root/tiny_abdomen`` (configs/metadata.json, configs/inference.json,
    models/model.pt); returns it."""
    import torch
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    bundle = root / "tiny_abdomen"
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference_config(), indent=2))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata(), indent=2))

    import nibabel as nib

    seg_ts = np.asanyarray(nib.load(str(SEG_SM)).dataobj)
    seg = np.zeros(seg_ts.shape, dtype=np.float32)
    for ts, ours in TOTALSEG_TO_OURS.items():
        seg[seg_ts == ts] = ours
    label_path = root / "train_label.nii.gz"
    ct_img = nib.load(str(CT_SM))
    nib.save(nib.Nifti1Image(seg, ct_img.affine, ct_img.header), str(label_path))
    prep = Compose(
        [
            LoadImaged(keys=["image", "label"]),
            EnsureChannelFirstd(keys=["image", "label"]),
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            Spacingd(keys=["image", "label"], pixdim=PIXDIM, mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    d = prep({"image": str(CT_SM), "label": str(label_path)})
    x = d["image"].as_tensor()[None].float()
    y = d["label"].as_tensor()[0].long()[None]
    torch.manual_seed(seed)
    kw = {k: v for k, v in NETWORK_DEF.items() if k != "_target_"}
    net = UNet(**kw)  # type: ignore[arg-type]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    weight = torch.tensor([0.2, 1.0, 2.0, 3.0, 3.0])
    net.train()
    shape = x.shape[2:]
    for _ in range(steps):  # random ROI-sized crops (zero-padded where the volume is smaller)
        lo = [int(rng.integers(0, max(n - r, 0) + 1)) for n, r in zip(shape, ROI)]
        sl = (slice(None), slice(None), *(slice(a, a + r) for a, r in zip(lo, ROI)))
        xc, yc = x[sl], y[(slice(None), *sl[2:])]
        pad = [v for n, r in reversed(list(zip(xc.shape[2:], ROI))) for v in (0, r - n)]
        xc, yc = torch.nn.functional.pad(xc, pad), torch.nn.functional.pad(yc, pad)
        loss = torch.nn.functional.cross_entropy(net(xc), yc, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle
