"""Imported models (nnU-Net v2, MONAI bundles) on Triton: the served network and its client.

The network of a registered model (`atlasflow.models.registry`) runs on Triton; everything
around it (pre-processing, sliding-window tiling, Gaussian blending, resampling back,
post-processing) runs in the caller (`atlasflow.models.nnunet_infer`,
`atlasflow.models.monai_bundle`), which sends window batches through `TritonNetwork`.

Served model: ``triton/1/model.pt`` + ``triton/config.pbtxt`` written at import
(`atlasflow.models.export`), under the name `atlasflow.models.export.triton_model_name`
(``<name>_<digest[:12]>``). ``INPUT__0`` FP32 ``[N, C, *window]`` (nnU-Net: + ``INPUT__1``
INT64 ``[1]``, the fold) -> ``OUTPUT__0`` FP32 ``[N, K, *window]``.

- Locally: PyTriton (the ``local-triton`` extra) binds the TorchScript file with
  `bind_imported_model` (CPU or CUDA) in ``python -m atlasflow.segmentation.triton_server
  --model NAME --state-dir DIR``: the segmentation stack's Triton, or one started for one
  command (`local_triton`, what ``atlasflow segment`` does without ``--triton-url``).
- In a cluster: the stock Triton image serves the model's ``triton/`` folder with the PyTorch
  (libtorch) backend; the client is the same.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import AtlasflowError, DataLoss, FailedPrecondition, Unavailable
from atlasflow.models.export import FOLD_INPUT, INPUT, OUTPUT, load_served, triton_model_name
from atlasflow.models.registry import DOMAIN, ModelRegistry

LOG = logging.getLogger(__name__)
EXTRA = "local-triton"


def require_pytriton() -> None:
    """FailedPrecondition(``LOCAL_TRITON_NOT_INSTALLED``) when PyTriton (the extra) is missing."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise FailedPrecondition(
            "LOCAL_TRITON_NOT_INSTALLED",
            f"local Triton needs the '{EXTRA}' extra (pip install -c constraints.txt -e '.[{EXTRA}]'); "
            "or pass --triton-url of a running Triton that serves the model",
            domain=DOMAIN,
        ) from None


def bind_imported_model(triton: Any, state_dir: str | Path, name: str, device: str = "cpu") -> str:
    """Bind the registered model ``name``'s exported network to a `pytriton.triton.Triton`;
    returns the Triton model name. Files are verified against the manifest first."""
    import torch
    from pytriton.model_config import ModelConfig, Tensor

    registry = ModelRegistry(state_dir)
    manifest = registry.verify(name)
    module = load_served(registry.path(name), manifest, device)
    info = manifest.details["triton"]
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    inputs = [(str(n), dtypes[str(t)], tuple(int(v) for v in d)) for n, t, d in info["inputs"]]
    outputs = [(str(n), dtypes[str(t)], tuple(int(v) for v in d)) for n, t, d in info["outputs"]]
    dev = torch.device(device)

    def infer(requests: list[Any]) -> list[dict[str, npt.NDArray[Any]]]:
        out = []
        for request in requests:
            args = [
                torch.from_numpy(np.ascontiguousarray(request.data[n], dtype=dt)).to(dev if dt == np.float32 else "cpu")
                for n, dt, _ in inputs
            ]
            with torch.inference_mode():
                y = module(*args)
            out.append({OUTPUT: y.float().cpu().numpy()})
        return out

    model_name = triton_model_name(manifest)
    triton.bind(
        model_name=model_name,
        infer_func=infer,
        inputs=[Tensor(name=n, dtype=dt, shape=d) for n, dt, d in inputs],
        outputs=[Tensor(name=n, dtype=dt, shape=d) for n, dt, d in outputs],
        config=ModelConfig(batching=False),
        strict=True,
    )
    return model_name


@contextmanager
def local_triton(
    state_dir: str | Path, names: Sequence[str], device: str = "cpu", *, timeout_s: float = 600
) -> Iterator[str]:
    """A PyTriton server on loopback serving the registered models ``names`` for the duration
    of the block; yields its gRPC ``host:port``.

    The server is the stack's own ``python -m atlasflow.segmentation.triton_server --model
    NAME --state-dir DIR`` as a child process (its log in a temporary file, not on the
    caller's stdout): the network's torch runs in that process, never in the caller's (a
    PyTriton bound in the calling process ran the TorchScript module in a proxy thread that
    hung after nnUNetPredictor had run in the same process)."""
    require_pytriton()
    from atlasflow.common.ports import free_ports
    from atlasflow.segmentation.triton_server import READY_LINE

    grpc_port, http_port, metrics_port = free_ports(3)
    argv = [
        sys.executable,
        "-m",
        "atlasflow.segmentation.triton_server",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        f"--device={device}",
        f"--state-dir={Path(state_dir).resolve()}",
        *[f"--model={n}" for n in names],
    ]
    with tempfile.TemporaryDirectory(prefix="atlasflow-triton-") as tmp:
        log_path = Path(tmp) / "triton.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout_s
            while READY_LINE not in log_path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise Unavailable(
                        "LOCAL_TRITON_FAILED",
                        f"the local Triton did not start (exit {proc.poll()}): {tail}",
                        domain=DOMAIN,
                    )
                time.sleep(0.2)
            yield f"127.0.0.1:{grpc_port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class TritonNetwork:
    """The served network of one registered model, called like a torch module on window batches."""

    def __init__(self, url: str, model_name: str, *, timeout_s: float = 600, max_message_bytes: int = 1 << 30) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url.split("://", 1)[1] if "://" in url else url
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self.calls = 0
        self._client = grpcclient.InferenceServerClient(
            self.url,
            channel_args=[
                ("grpc.max_send_message_length", int(max_message_bytes)),
                ("grpc.max_receive_message_length", int(max_message_bytes)),
            ],
        )

    def close(self) -> None:
        self._client.close()

    def __call__(self, x: Any, fold: int | None = None) -> Any:
        """``x`` torch ``(N, C, *window)`` -> torch ``(N, K, *window)`` float32 (on ``x``'s
        device); ``fold``: the fold index of an nnU-Net model's served network."""
        import torch
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        inp = grpcclient.InferInput(INPUT, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        inputs = [inp]
        if fold is not None:
            f = grpcclient.InferInput(FOLD_INPUT, [1], "INT64")
            f.set_data_from_numpy(np.array([fold], dtype=np.int64))
            inputs.append(f)
        meta = {"model": self.model_name}
        try:
            result = self._client.infer(
                self.model_name,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(OUTPUT)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            status, text = str(exc.status() or ""), str(exc.message() or "")
            if "UNAVAILABLE" in status or "DEADLINE" in status:
                raise Unavailable("TRITON_UNAVAILABLE", "Triton is unavailable", domain=DOMAIN, metadata=meta) from None
            if "NOT_FOUND" in status or "unknown model" in text or "not ready" in text.lower():
                raise FailedPrecondition(
                    "TRITON_MODEL_NOT_READY",
                    f"Triton does not serve {self.model_name} (bind the model: --model NAME)",
                    domain=DOMAIN,
                    metadata=meta,
                ) from None
            raise AtlasflowError(
                "TRITON_INFERENCE_FAILED", "Triton inference failed", domain=DOMAIN, metadata=meta
            ) from None
        out = result.as_numpy(OUTPUT)
        if out is None or out.ndim != arr.ndim or out.shape[0] != arr.shape[0]:
            raise DataLoss("TRITON_BAD_RESPONSE", "Triton returned an unexpected output", domain=DOMAIN, metadata=meta)
        self.calls += 1
        return torch.from_numpy(np.array(out, copy=True)).to(x.device)


class BlsNetwork:
    """The served network of one registered model called from inside a stock Triton's Python
    backend (the ensemble model of `atlasflow.segmentation.triton_repo`): a Business Logic
    Scripting request (``pb_utils.InferenceRequest(...).exec()``) to the model's PyTorch-backend
    entry in the same server, with the tensors of `TritonNetwork`. ``pb_utils`` is Triton's
    ``triton_python_backend_utils``."""

    def __init__(self, pb_utils: Any, model_name: str) -> None:
        self.pb_utils = pb_utils
        self.model_name = model_name
        self.calls = 0

    def __call__(self, x: Any, fold: int | None = None) -> Any:
        import torch

        pb = self.pb_utils
        meta = {"model": self.model_name}
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        inputs = [pb.Tensor(INPUT, arr)]
        if fold is not None:
            inputs.append(pb.Tensor(FOLD_INPUT, np.array([fold], dtype=np.int64)))
        response = pb.InferenceRequest(
            model_name=self.model_name, requested_output_names=[OUTPUT], inputs=inputs
        ).exec()
        if response.has_error():
            raise AtlasflowError(
                "TRITON_INFERENCE_FAILED",
                f"{self.model_name}: {response.error().message()}",
                domain=DOMAIN,
                metadata=meta,
            )
        tensor = pb.get_output_tensor_by_name(response, OUTPUT)
        out = None if tensor is None else tensor.as_numpy()
        if out is None or out.ndim != arr.ndim or out.shape[0] != arr.shape[0]:
            raise DataLoss("TRITON_BAD_RESPONSE", "Triton returned an unexpected output", domain=DOMAIN, metadata=meta)
        self.calls += 1
        return torch.from_numpy(np.array(out, copy=True)).to(x.device)
