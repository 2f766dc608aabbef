"""Segmentation service path vs the same pipeline in-process (CPU).

    .venv/bin/python benchmarks/bench_seg_service.py [--ensemble abdomen-trio-v1] [--runs 3]
        [--triton pytriton|stock] [--shm auto|on|off] [--ct PATH.nii.gz] [--dry-run]

Service path: this process (the client) puts the CT into the blob store, calls
``SegmentSeries`` on the segmentation service (a child process, `atlasflow serve
segmentation`), and follows the job with ``WaitSegmentationJob`` (long-poll; a client polling
GetSegmentationJob every 5 ms cost the service path ~20 % on 2 cores) until SUCCEEDED; the
service loads
the NIfTI, calls Triton (a child process: PyTriton `triton_server` by default, or the stock
``tritonserver`` on an `atlasflow triton-repo` repository), writes the label map and heatmap
blobs and commits the job with its hand-offs. Timed: SegmentSeries sent -> SUCCEEDED seen,
nothing subtracted. Each run uses a new series version (a new job; idempotency would
otherwise return the finished one).

In-process: `EnsemblePipeline(ensemble)(volume, affine)` in this process, same weights, same
volume (the demo CT by default). Runs alternate (service, in-process, ...) so load changes on
a shared machine hit both; prints the median of ``--runs`` each and the ratio (goal <= 1.10).
The first call of each path is a warm-up and is not timed.

Environment, the same for both sides: the benchmark re-executes itself once with
`atlasflow.cli.local.MALLOC_ENV` (the glibc settings `atlasflow up` gives every process) and
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads of one side must not spin on the cores the
other side computes on) unless they are already set; the children inherit it. ``--raw-env``
skips this.

``--dry-run``: a tiny 2-member ensemble (written to a temp dir), a 40x34x26 synthetic volume,
one timed run: checks the harness end to end in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_CT = REPO / "tests" / "data" / "totalsegmentator" / "tests" / "reference_files" / "example_ct.nii.gz"

TINY = {
    "format": 1,
    "version": "bench-tiny-v1",
    "description": "benchmark dry run only: two 1-level U-Nets, seeded weights",
    "members": [
        {
            "name": f"unet_{i}",
            "architecture": "monai.UNet",
            "activation": "sigmoid",
            "seed": 40 + i,
            "checkpoint": None,
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 9,
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 0,
            },
            "preprocessing": {
                "target_spacing_mm": [6.0, 6.0, 6.0],
                "hu_window": [-175.0, 250.0],
                "patch_size": [32, 32, 32],
                "overlap": 0.25,
                "sw_batch_size": 2,
            },
        }
        for i in range(2)
    ],
}


def _wait_health(target: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise RuntimeError("segmentation service exited during start-up")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("segmentation service not healthy in time")
            time.sleep(0.1)


def _start_triton(kind: str, ensemble: str, work: Path, model_name: str) -> tuple[object, str]:
    from atlasflow.common.ports import free_ports
    from atlasflow.segmentation.triton_client import TritonSegmenter
    from atlasflow.segmentation.triton_repo import write_repository
    from atlasflow.testing.triton import BundledTriton

    if kind == "stock":
        write_repository(work / "models", ensemble, kind="cpu")
        srv = BundledTriton(work / "models", work, [model_name]).start()
        return srv, srv.grpc_url
    grpc_port, http_port, metrics_port = free_ports(3)
    log = (work / "pytriton.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlasflow.segmentation.triton_server",
            "--ensemble",
            ensemble,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 300
    with TritonSegmenter(url, model_name) as probe:
        while not probe.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("PyTriton server did not start; see " + str(work / "pytriton.log"))
            time.sleep(0.2)
    return proc, url


def _stop(obj: object) -> None:
    if isinstance(obj, subprocess.Popen):
        if obj.poll() is None:
            obj.send_signal(signal.SIGTERM)
            try:
                obj.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(obj.pid, signal.SIGKILL)
    else:
        obj.stop()


def run(args: argparse.Namespace) -> dict[str, object]:

    from atlasflow.common.blobstore import LocalBlobStore
    from atlasflow.common.clients import sync_channel
    from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
    from atlasflow.common.ports import free_ports
    from atlasflow.common.v1 import common_pb2
    from atlasflow.segmentation.ensemble import load_ensemble
    from atlasflow.segmentation.pipeline import EnsemblePipeline
    from atlasflow.segmentation.v1 import segmentation_pb2 as pb
    from atlasflow.segmentation.v1 import segmentation_pb2_grpc
    from atlasflow.testing import auth

    work = Path(tempfile.mkdtemp(prefix="bench_seg_"))
    ensemble = args.ensemble
    if args.dry_run:
        path = work / "bench-tiny-v1.json"
        path.write_text(json.dumps(TINY))
        ensemble = str(path)
        vol = np.full((40, 34, 26), -1000, np.int16)
        vol[8:32, 6:28, 4:22] = 60
        affine = np.diag([3.0, 3.0, 3.0, 1.0])
    else:
        import nibabel as nib

        img = nib.load(str(args.ct))
        vol = np.asanyarray(img.dataobj).astype(np.int16)
        affine = img.affine
    cfg = load_ensemble(ensemble)
    nifti = to_nifti_bytes(vol, affine)
    vol_rt, affine_rt = from_nifti_bytes(nifti)  # the service segments exactly what the blob holds
    blobs = LocalBlobStore(work / "blobs")
    blob = blobs.put(nifti)

    triton, url = _start_triton(args.triton, ensemble, work, cfg.model_name)
    seg_port, l_port, r_port = free_ports(3)
    env = dict(os.environ)
    env.update(
        {
            "ATLASFLOW_SEGMENTATION_GRPC_PORT": str(seg_port),
            "ATLASFLOW_SEGMENTATION_TRITON_URL": url,
            "ATLASFLOW_SEGMENTATION_ENSEMBLE": ensemble,
            "ATLASFLOW_SEGMENTATION_DATA_DIR": str(work / "data"),
            "ATLASFLOW_SEGMENTATION_BLOB_DIR": str(work / "blobs"),
            "ATLASFLOW_SEGMENTATION_TRITON_SHM": args.shm,
            "ATLASFLOW_SEGMENTATION_LABELS_TARGET": f"127.0.0.1:{l_port}",
            "ATLASFLOW_SEGMENTATION_RANKING_TARGET": f"127.0.0.1:{r_port}",
            "ATLASFLOW_SEGMENTATION_WORKER_POLL_S": "0.05",
            "ATLASFLOW_SEGMENTATION_LOG_LEVEL": "WARNING",
            # accepts the tokens of auth.install()'s issuer (see main)
            **auth.auth_env("ATLASFLOW_SEGMENTATION_"),
        }
    )
    service = subprocess.Popen(
        [sys.executable, "-c", "from atlasflow.segmentation.app import main; main()"],
        env=env,
        stdout=(work / "segmentation.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    service_times: list[float] = []
    local_times: list[float] = []
    triton_times: list[float] = []
    try:
        target = f"127.0.0.1:{seg_port}"
        _wait_health(target, service)
        pipeline = EnsemblePipeline(ensemble)
        with sync_channel(target) as ch:  # the token of ATLASFLOW_TOKEN_FILE (auth.install in main)
            stub = segmentation_pb2_grpc.SegmentationServiceStub(ch)

            def service_once(version: int) -> tuple[float, float]:
                t0 = time.perf_counter()
                job = stub.SegmentSeries(
                    pb.SegmentSeriesRequest(
                        case_id="bench",
                        series_id="bench-series",
                        series_version=version,
                        volume=common_pb2.BlobRef(digest=blob.digest, size_bytes=blob.size_bytes),
                    )
                ).job
                while job.state not in (common_pb2.OPERATION_STATE_SUCCEEDED, common_pb2.OPERATION_STATE_FAILED):
                    job = stub.WaitSegmentationJob(pb.WaitSegmentationJobRequest(job_id=job.job_id)).job
                elapsed = time.perf_counter() - t0
                if job.state != common_pb2.OPERATION_STATE_SUCCEEDED:
                    raise RuntimeError(f"job failed: {job.error_reason}")
                return elapsed, job.result.inference_seconds

            def local_once() -> float:
                t0 = time.perf_counter()
                pipeline(vol_rt, affine_rt)
                return time.perf_counter() - t0

            runs = 1 if args.dry_run else args.runs
            service_once(1)  # warm-up (first Triton call, lazy imports)
            local_once()
            for i in range(runs):
                s, t = service_once(i + 2)
                service_times.append(s)
                triton_times.append(t)
                local_times.append(local_once())
    finally:
        _stop(service)
        _stop(triton)
    svc, loc = statistics.median(service_times), statistics.median(local_times)
    return {
        "ensemble": cfg.version,
        "shape": list(vol.shape),
        "triton": args.triton,
        "shm": args.shm,
        "service_s": service_times,
        "in_process_s": local_times,
        "triton_call_s": triton_times,
        "service_median_s": svc,
        "in_process_median_s": loc,
        "ratio": svc / loc,
    }


def _tuned_env() -> dict[str, str] | None:
    """The environment to re-execute with, or None when it is already in place."""
    from atlasflow.cli.local import MALLOC_ENV

    wanted = {**MALLOC_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    if all(k in os.environ for k in wanted):
        return None
    return {**wanted, **os.environ}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble", default="abdomen-trio-v1")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--triton", choices=("pytriton", "stock"), default="pytriton")
    parser.add_argument("--shm", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--ct", type=Path, default=DEMO_CT)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    parser.add_argument(
        "--raw-env", action="store_true", help="do not apply MALLOC_ENV / OMP_WAIT_POLICY (see module doc)"
    )
    args = parser.parse_args(argv)
    if not args.raw_env and argv is None and (env := _tuned_env()) is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    from atlasflow.testing import auth

    auth.install()  # a token issuer for this run: the service accepts its tokens, the client sends one
    tuned = {k: os.environ[k] for k in sorted(os.environ) if k.startswith("MALLOC_") or k == "OMP_WAIT_POLICY"}
    print("environment (both sides): " + (" ".join(f"{k}={v}" for k, v in tuned.items()) or "as inherited"))
    r = run(args)
    print(f"ensemble {r['ensemble']}  volume {tuple(r['shape'])}  triton={r['triton']} shm={r['shm']}")
    print(
        f"service path (SegmentSeries -> SUCCEEDED): median {r['service_median_s']:.3f} s  runs {[round(x, 3) for x in r['service_s']]}"
    )
    print(f"  of which the worker's Triton call:        {[round(x, 3) for x in r['triton_call_s']]}")
    print(
        f"in-process EnsemblePipeline:              median {r['in_process_median_s']:.3f} s  runs {[round(x, 3) for x in r['in_process_s']]}"
    )
    print(f"ratio service / in-process: {r['ratio']:.3f}  (goal <= 1.10)")
    if args.json:
        print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
