"""The served ensemble with and without an imported member, per CT, through Triton.

    .venv/bin/python benchmarks/bench_seg_imported.py [--device cpu|cuda] [--repeats 2] [--ensemble abdomen-trio-v1]

Builds the tiny two-fold nnU-Net model of tests/models/nnunet_fixture.py and registers it,
then starts the segmentation Triton server (PyTriton, `atlasflow.segmentation.triton_server`)
twice on ``--device``: the ensemble alone, then the ensemble with the model as an imported
member (``--member``). Per server: start-up, then ``--repeats`` calls on TotalSegmentator's
``example_ct_sm`` through `TritonSegmenter` (the service's client): the call's seconds and the
pipeline's own stage timings from the server's log (``infer_<member>`` and, with the member,
``infer_tiny``: its pre/post-processing in the pipeline, its network on the same Triton).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import nnunet_fixture as fx  # noqa: E402

from atlasflow.models.nnunet import import_nnunet  # noqa: E402
from atlasflow.segmentation.ensemble import load_ensemble  # noqa: E402
from atlasflow.segmentation.imported import resolve, served_model_name  # noqa: E402
from atlasflow.segmentation.triton_client import TritonSegmenter  # noqa: E402
from atlasflow.testing.triton import LocalTriton  # noqa: E402


def serve_and_time(
    ensemble: str, members: list[str], state: Path, device: str, repeats: int, vol: np.ndarray, aff: np.ndarray
) -> None:
    triton = LocalTriton(
        [
            f"--ensemble={ensemble}",
            f"--device={device}",
            *[f"--member={m}" for m in members],
            *([f"--state-dir={state}"] if members else []),
        ]
    ).start(timeout_s=600)
    name = served_model_name(load_ensemble(ensemble).model_name, resolve(state, members))
    print(f"\n{name}: Triton start-up {triton.startup_s:.2f} s")
    try:
        with TritonSegmenter(triton.url, name, shm="off", timeout_s=900) as client:
            for i in range(repeats):
                t = time.perf_counter()
                client.segment(vol, aff)
                print(f"  call {i + 1}: {time.perf_counter() - t:.2f} s")
    finally:
        triton.stop()
    lines = triton.lines
    for line in lines:
        if " pipeline " in line:
            print("  server:", line.split(" pipeline ", 1)[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ensemble", default="abdomen-trio-v1")
    args = ap.parse_args()
    img = nib.load(str(fx.CT_SM))
    vol = np.asanyarray(img.dataobj).astype(np.int16)
    aff = np.asarray(img.affine, dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="bench-seg-imported-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        folder = fx.make_model_folder(root / "nnunet")
        print(f"tiny nnU-Net model (2 folds) trained in {time.perf_counter() - t0:.2f} s")
        import_nnunet(folder, "tiny", root / "state")
        print(f"CT {fx.CT_SM.name} {'x'.join(str(n) for n in vol.shape)}, device {args.device}")
        serve_and_time(args.ensemble, [], root / "state", args.device, args.repeats, vol, aff)
        serve_and_time(args.ensemble, ["tiny"], root / "state", args.device, args.repeats, vol, aff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
