"""atlasflow's MONAI bundle path vs ``monai.bundle run`` (MONAI's own runner) in the same run.

    .venv/bin/python benchmarks/bench_models_monai.py [--device cpu|cuda] [--repeats 3]

Builds the tiny bundle of tests/models/monai_bundle_fixture.py, registers it, and times per CT
(TotalSegmentator example_ct_sm, and its DICOM series via dcm2niix), best of ``--repeats``:

- ``monai.bundle run``: ``monai.bundle.run`` in this process (config parse, network + weights
  via CheckpointLoader, LoadImaged from the file, inference, postprocessing, SaveImaged of the
  label file), one CT per run;
- atlasflow in-process: ``atlasflow.models.segment.segment_file(in_process=True)`` (model load
  with digest check, NIfTI read, inference, postprocessing, ``labels.nii.gz`` written);
- atlasflow triton: the same with the network on a local PyTriton (``--triton-url`` of one
  started once; its start-up printed separately): the product path of ``atlasflow segment``;

and prints the ratios (atlasflow / monai.bundle run; < 1 = atlasflow faster) and the label
agreement. The ``python -m monai.bundle run`` subprocess (interpreter start + imports) is
timed once per CT for reference.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import monai_bundle_fixture as fx  # noqa: E402
from tests.models import nnunet_fixture as nfx  # noqa: E402

from atlasflow.models.monai_bundle import import_monai_bundle  # noqa: E402
from atlasflow.models.segment import segment_file  # noqa: E402
from atlasflow.segmentation.model_serving import local_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from monai.bundle import run

    root = Path(tempfile.mkdtemp(prefix="bench-monai-"))
    bundle = fx.make_bundle(root)
    cts = [fx.CT_SM, nfx.dicom_ct(root / "cts")]
    import_monai_bundle(bundle, "tiny", root / "state")
    t0 = time.perf_counter()
    triton = local_triton(root / "state", ["tiny"], args.device)
    url = triton.__enter__()
    print(f"local PyTriton start-up (model bound): {time.perf_counter() - t0:.2f} s")
    cfg, meta = bundle / "configs" / "inference.json", bundle / "configs" / "metadata.json"
    device = f"$torch.device('{args.device}')"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for ct in cts:
        one = root / "one" / ct.name.split(".")[0]
        one.mkdir(parents=True)
        shutil.copyfile(ct, one / "ct.nii.gz")
        t_ref, t_ours, t_triton = [], [], []
        for r in range(args.repeats):
            out = root / "ref" / f"{one.name}-{r}"
            t0 = time.perf_counter()
            run(
                config_file=str(cfg),
                meta_file=str(meta),
                bundle_root=str(bundle),
                dataset_dir=str(one),
                output_dir=str(out),
                device=device,
            )
            t_ref.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            segment_file(
                ct, "tiny", root / "ours" / f"{one.name}-{r}", root / "state", device=args.device, in_process=True
            )
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            segment_file(ct, "tiny", root / "triton" / f"{one.name}-{r}", root / "state", triton_url=url)
            t_triton.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg), "--meta_file", str(meta)]
            + ["--bundle_root", str(bundle), "--dataset_dir", str(one), "--output_dir", str(root / "sub" / one.name)]
            + ["--device", device],
            check=True,
            capture_output=True,
        )
        t_sub = time.perf_counter() - t0
        ref = np.asanyarray(nib.load(str(out / "ct_trans.nii.gz")).dataobj)
        ours = np.asanyarray(nib.load(str(root / "ours" / f"{one.name}-0" / "labels.nii.gz")).dataobj)
        served = np.asanyarray(nib.load(str(root / "triton" / f"{one.name}-0" / "labels.nii.gz")).dataobj)
        shape = nib.load(str(ct)).shape
        print(
            f"{ct.name} {shape}: monai.bundle run {min(t_ref):.2f} s (subprocess {t_sub:.2f} s), "
            f"atlasflow in-process {min(t_ours):.2f} s (ratio {min(t_ours) / min(t_ref):.2f}, "
            f"agreement {(ref == ours).mean():.6f}), atlasflow triton {min(t_triton):.2f} s "
            f"(ratio {min(t_triton) / min(t_ref):.2f}, agreement {(ref == served).mean():.6f})"
        )
    triton.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
