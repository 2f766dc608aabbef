"""atlasflow's nnU-Net v2 inference vs nnUNetPredictor (its own code, defaults) in the same run.

    .venv/bin/python benchmarks/bench_models.py [--device cpu|cuda] [--repeats 2]

Builds the tiny two-fold nnU-Net model of tests/models/nnunet_fixture.py, registers it, and
times per CT (TotalSegmentator example_ct_sm, and its DICOM series via dcm2niix): the model
load + inference of each side, best of ``--repeats``, and prints the ratio
(atlasflow / nnUNetPredictor; < 1 = atlasflow faster) and the label agreement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import nnunet_fixture as fx  # noqa: E402

from atlasflow.models.nnunet import import_nnunet  # noqa: E402
from atlasflow.models.segment import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    folder = fx.make_model_folder(root)
    cts = [fx.CT_SM, fx.dicom_ct(root / "cts")]
    import_nnunet(folder, "tiny", root / "state")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for ct in cts:
        img = nib.load(str(ct))
        vol, spacing = np.asanyarray(img.dataobj), [float(z) for z in img.header.get_zooms()[:3]]
        t_ref, t_ours = [], []
        for r in range(args.repeats):
            out = root / "ref" / f"{ct.name}-{r}"
            out.mkdir(parents=True)
            t0 = time.perf_counter()
            p = nnUNetPredictor(device=torch.device(args.device), allow_tqdm=False, verbose=False)
            p.initialize_from_trained_model_folder(str(folder), use_folds=(0, 1))
            p.predict_from_files_sequential([[str(ct)]], [str(out / "ref")], save_probabilities=False)
            t_ref.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model = load_model(root / "state", "tiny", device=args.device)
            labels = model(vol, spacing)
            t_ours.append(time.perf_counter() - t0)
        ref = np.asanyarray(nib.load(str(out / "ref.nii.gz")).dataobj)
        print(
            f"{ct.name} {img.shape}: nnUNetPredictor {min(t_ref):.2f} s, atlasflow {min(t_ours):.2f} s, "
            f"ratio {min(t_ours) / min(t_ref):.2f}, agreement {(ref == labels).mean():.6f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
