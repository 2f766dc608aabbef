"""atlasflow's nnU-Net v2 inference vs nnUNetPredictor (its own code, defaults) in the same run.

    .venv/bin/python benchmarks/bench_models.py [--device cpu|cuda] [--repeats 2] [--tile-batch 4]

Builds the tiny two-fold nnU-Net model of tests/models/nnunet_fixture.py, registers it (with
its Triton export), and times per CT (TotalSegmentator example_ct_sm, and its DICOM series via
dcm2niix), best of ``--repeats``:

- ``nnUNetPredictor``: model load + prediction from the file (its own code);
- ``in-process``: atlasflow's model load + inference, network in this process;
- ``triton``: atlasflow's product path, the exported network on a local PyTriton (started
  once, its start-up printed separately) on ``--device``; client load + inference, tiles sent
  ``--tile-batch`` at a time.

Prints the times, the ratios to nnUNetPredictor (< 1 = atlasflow faster) and the label
agreement of each atlasflow path with the predictor.
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
    ap.add_argument("--tile-batch", type=int, default=4)
    args = ap.parse_args()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from atlasflow.models.export import triton_model_name
    from atlasflow.segmentation.model_serving import TritonNetwork, local_triton

    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    folder = fx.make_model_folder(root)
    cts = [fx.CT_SM, fx.dicom_ct(root / "cts")]
    t0 = time.perf_counter()
    manifest = import_nnunet(folder, "tiny", root / "state")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"import (checks + weights + TorchScript export): {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    with local_triton(root / "state", ["tiny"], args.device) as url:
        print(f"local PyTriton start-up (model bound): {time.perf_counter() - t0:.2f} s")
        for ct in cts:
            img = nib.load(str(ct))
            vol, spacing = np.asanyarray(img.dataobj), [float(z) for z in img.header.get_zooms()[:3]]
            t_ref, t_ours, t_triton = [], [], []
            calls = 0
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
                t0 = time.perf_counter()
                net = TritonNetwork(url, triton_model_name(manifest))
                served = load_model(root / "state", "tiny", network=net)
                served.tile_batch = args.tile_batch
                labels_triton = served(vol, spacing)
                t_triton.append(time.perf_counter() - t0)
                calls = net.calls
                net.close()
            ref = np.asanyarray(nib.load(str(out / "ref.nii.gz")).dataobj)
            print(
                f"{ct.name} {img.shape}: nnUNetPredictor {min(t_ref):.2f} s, atlasflow in-process {min(t_ours):.2f} s "
                f"(ratio {min(t_ours) / min(t_ref):.2f}, agreement {(ref == labels).mean():.6f}), "
                f"atlasflow triton {min(t_triton):.2f} s in {calls} calls "
                f"(ratio {min(t_triton) / min(t_ref):.2f}, agreement {(ref == labels_triton).mean():.6f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
