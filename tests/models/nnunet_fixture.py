"""A tiny nnU-Net v2 trained-model folder, made in the test set-up with nnU-Net's own code.

Training data: TotalSegmentator's ``example_ct_sm.nii.gz`` (122x101x30, 3 mm, RAS) with its
labels ``example_seg.nii.gz`` mapped to 1 liver, 2 spleen, 3 kidneys. Plans (3d_fullres): a
3-stage PlainConvUNet (8/16/32 features), patch 8x48x48 (z, y, x), target spacing
10 x 3.2 x 3.2 mm (anisotropic: nnU-Net resamples z separately, nearest), CTNormalization from the
foreground intensities of the training labels (as nnU-Net's fingerprint does), the default
resampling functions and kwargs, SimpleITKIO. The case is preprocessed by nnU-Net's
``DefaultPreprocessor``, the network built by nnU-Net's ``get_network_from_plans``, and each
fold trained for a few Adam steps on random patches (different seeds per fold): the point is
equality with the predictor, not accuracy. Checkpoints are saved in nnU-Net's format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "tests" / "reference_files"
CT_SM = DATA / "example_ct_sm.nii.gz"
SEG_SM = DATA / "example_seg.nii.gz"
DICOM = DATA / "example_ct_dicom"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
TOTALSEG_TO_OURS = {5: 1, 1: 2, 2: 3, 3: 3}
PATCH = [8, 48, 48]
SPACING = [10.0, 3.2, 3.2]


def plans_dict(fg_props: dict[str, float]) -> dict:
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [8, 16, 32],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return {
        "dataset_name": "Dataset901_AtlasTiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 3.0, 3.0],
        "original_median_shape_after_transp": [30, 101, 122],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": PATCH,
                "median_image_size_in_voxels": [9, 95, 114],
                "spacing": SPACING,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": arch,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": fg_props},
    }


def make_model_folder(root: Path, folds: tuple[int, ...] = (0, 1), steps: int = 16) -> Path:
    """Write ``root/nnUNetTrainer__nnUNetPlans__3d_fullres`` (dataset.json, plans.json,
    fold_k/checkpoint_final.pth); returns it."""
    import nibabel as nib
    import torch
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    ct = np.asanyarray(nib.load(str(CT_SM)).dataobj).astype(np.float32)
    seg_ts = np.asanyarray(nib.load(str(SEG_SM)).dataobj)
    seg = np.zeros(seg_ts.shape, dtype=np.int16)
    for ts, ours in TOTALSEG_TO_OURS.items():
        seg[seg_ts == ts] = ours
    fg = ct[seg > 0].astype(np.float64)
    fg_props = {
        "max": float(fg.max()),
        "mean": float(fg.mean()),
        "median": float(np.median(fg)),
        "min": float(fg.min()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
        "std": float(fg.std()),
    }
    plans = plans_dict(fg_props)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    # nnU-Net's own preprocessing of the training case (SimpleITK order: z, y, x)
    data, target, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        ct.transpose(2, 1, 0)[None], seg.transpose(2, 1, 0)[None], {"spacing": [3.0, 3.0, 3.0]}, pm, cm, dataset
    )
    x_all = torch.from_numpy(np.ascontiguousarray(data)).float()
    y_all = torch.from_numpy(np.ascontiguousarray(np.clip(target[0], 0, None))).long()
    shape = x_all.shape[1:]
    for fold in folds:
        torch.manual_seed(100 + fold)
        rng = np.random.default_rng(100 + fold)
        net = get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            1,
            len(LABELS),
            deep_supervision=False,
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(steps):
            xs, ys = [], []
            for _b in range(2):
                organ = np.argwhere(y_all.numpy() == 1 + (len(xs) + _) % 3)  # patches around each organ
                centre = organ[int(rng.integers(len(organ)))] if len(organ) else np.array(shape) // 2
                lo = [int(np.clip(c - p // 2, 0, max(n - p, 0))) for c, n, p in zip(centre, shape, PATCH)]
                sl = tuple(slice(a, a + p) for a, p in zip(lo, PATCH))
                xp = x_all[(slice(None), *sl)]
                yp = y_all[sl]
                pad = [v for n, p in reversed(list(zip(xp.shape[1:], PATCH))) for v in (0, p - n)]
                xs.append(torch.nn.functional.pad(xp, pad))
                ys.append(torch.nn.functional.pad(yp, pad))
            weight = torch.tensor([0.2, 1.0, 3.0, 3.0])  # the small organs must show up in the output
            loss = torch.nn.functional.cross_entropy(net(torch.stack(xs)), torch.stack(ys), weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": net.state_dict(),
                "optimizer_state": opt.state_dict(),
                "grad_scaler_state": None,
                "logging": {"ema_fg_dice": [np.float64(0.1)], "train_losses": [float(loss.detach())]},
                "_best_ema": None,
                "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1, 2),
            },
            folder / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return folder


def shared_model_folder(tmp_path_factory: Any) -> Path:
    """`make_model_folder` once per test session (pytest's ``tmp_path_factory``): every test
    module that needs the tiny nnU-Net model gets the same folder, trained once (~40 s)."""
    root = tmp_path_factory.getbasetemp() / "nnunet-shared"
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    done = root / "DONE"
    if not done.exists():
        make_model_folder(root)
        done.write_text("ok\n")
    return folder


def dicom_ct(out_dir: Path) -> Path:
    """The 20-slice DICOM series as NIfTI by dcm2niix (512x512x20, 0.977x0.977x2 mm, LAS)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("dcm2niix")
    subprocess.run(
        [str(exe), "-b", "n", "-z", "y", "-f", "dicom_ct", "-o", str(out_dir), str(DICOM)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out_dir / "dicom_ct.nii.gz"
