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
  `bind_imported_model` (CPU or CUDA), either in a Triton the caller starts for one command
  (`local_triton`, what ``atlasflow segment`` does without ``--triton-url``) or in the
  segmentation stack's Triton (``python -m atlasflow.segmentation.triton_server --model NAME
  --state-dir DIR``).
- In a cluster: the stock Triton image serves the model's ``triton/`` folder with the PyTorch
  (libtorch) backend; the client is the same.
"""

from __future__ import annotations

import logging
import tempfile
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
def local_triton(state_dir: str | Path, names: Sequence[str], device: str = "cpu") -> Iterator[str]:
    """A PyTriton server on loopback serving the registered models ``names`` for the duration
    of the block; yields its gRPC ``host:port``."""
    require_pytriton()
    from pytriton.triton import Triton, TritonConfig

    from atlasflow.common.ports import free_ports
    from atlasflow.segmentation.triton_server import ensure_libpython_on_ld_path

    ensure_libpython_on_ld_path()
    grpc_port, http_port, metrics_port = free_ports(3)
    logs = tempfile.TemporaryDirectory(prefix="atlasflow-triton-")
    config = TritonConfig(
        log_file=Path(logs.name) / "tritonserver.log",  # not on the command's stdout
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        metrics_address="127.0.0.1",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        exit_on_error=True,
        strict_readiness=True,
    )
    triton = Triton(config=config)
    try:
        for name in names:
            bind_imported_model(triton, state_dir, name, device)
        triton.run()
        yield f"127.0.0.1:{grpc_port}"
    finally:
        triton.stop()
        logs.cleanup()


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
