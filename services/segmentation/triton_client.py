"""Client for the ensemble pipeline model served by `atlasflow.segmentation.triton_server`.

Uses ``tritonclient.grpc``. Each call runs in an OpenTelemetry CLIENT span ``triton.infer``
(attributes: model name, input shape and dtype; never patient data); the W3C trace context is
injected both as gRPC headers (``headers=``) and as Triton request parameters
(``traceparent``/``tracestate``), which the server turns into its ``segmentation.pipeline`` span.

Errors: Triton unreachable / timed out -> Unavailable(``TRITON_UNAVAILABLE``); model unknown or
not ready -> FailedPrecondition(``TRITON_MODEL_NOT_READY``); a domain error raised in the server
pipeline comes back as the same class and reason; any other server-side failure ->
AtlasflowError(``TRITON_INFERENCE_FAILED``, gRPC INTERNAL); a malformed response ->
DataLoss(``TRITON_BAD_RESPONSE``). Messages never carry the server's stack traces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from atlasflow.common import errors
from atlasflow.common.errors import AtlasflowError, DataLoss, FailedPrecondition, Unavailable
from atlasflow.common.organs import NUM_ORGANS
from atlasflow.segmentation.ensemble import DOMAIN
from atlasflow.segmentation.pipeline import STATS_COLUMNS, PipelineOutput, labelled_flags

_SERVER_ERROR = re.compile(r"ATLASFLOW_ERROR ([A-Z_]+) ([A-Z0-9_]+): ([^\n]*)")
_CODE_CLASSES: dict[str, type[AtlasflowError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, AtlasflowError) and cls is not AtlasflowError
}


def _url_target(url: str) -> str:
    """Accept ``host:port`` or ``grpc://host:port``."""
    return url.split("://", 1)[1] if "://" in url else url


class TritonSegmenter:
    """Segment CTs with the ensemble model hosted in Triton (gRPC)."""

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        timeout_s: float = 600,
        max_message_bytes: int = 1 << 30,
        tracer_provider: Any | None = None,
    ) -> None:
        """``url``: ``host:port`` of Triton's gRPC endpoint; ``timeout_s``: per-call deadline;
        ``tracer_provider``: optional OpenTelemetry TracerProvider (default: the global one)."""
        import tritonclient.grpc as grpcclient

        self.url = _url_target(url)
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self._tracer_provider = tracer_provider
        self._client = grpcclient.InferenceServerClient(
            self.url,
            channel_args=[
                ("grpc.max_send_message_length", int(max_message_bytes)),
                ("grpc.max_receive_message_length", int(max_message_bytes)),
            ],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonSegmenter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def ready(self) -> bool:
        """True when the server is live and the model is ready; False if unreachable."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_server_live(client_timeout=5.0)) and bool(
                self._client.is_model_ready(self.model_name, client_timeout=5.0)
            )
        except InferenceServerException:
            return False

    def _map_error(self, exc: Exception) -> AtlasflowError:
        status = str(getattr(exc, "status", lambda: "")() or "")
        text = str(getattr(exc, "message", lambda: "")() or exc)
        meta = {"model": self.model_name}
        match = _SERVER_ERROR.search(text)
        if match:
            cls = _CODE_CLASSES.get(match.group(1), AtlasflowError)
            return cls(match.group(2), match.group(3), domain=DOMAIN, metadata=meta)
        if any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")) or "Deadline" in text:
            return Unavailable("TRITON_UNAVAILABLE", "Triton inference server is unavailable", domain=DOMAIN, metadata=meta)
        if "NOT_FOUND" in status or "unknown model" in text or "not ready" in text.lower():
            return FailedPrecondition(
                "TRITON_MODEL_NOT_READY", "model is not loaded in Triton", domain=DOMAIN, metadata=meta
            )
        return AtlasflowError("TRITON_INFERENCE_FAILED", "Triton inference failed", domain=DOMAIN, metadata=meta)

    def segment(
        self,
        volume_hu: np.ndarray,
        affine: np.ndarray,
        labelled_organs: Sequence[int] = (),
    ) -> PipelineOutput:
        """Run the pipeline remotely.

        ``volume_hu``: ``(X, Y, Z)`` HU, sent as int16; ``affine``: 4x4 voxel -> RAS mm;
        ``labelled_organs``: organ ids 1..9 that the case's source labels.
        Returns outputs on the input grid (see `PipelineOutput`).
        """
        import tritonclient.grpc as grpcclient
        from opentelemetry import propagate, trace
        from tritonclient.utils import InferenceServerException

        vol = np.ascontiguousarray(np.asarray(volume_hu), dtype=np.int16)
        aff = np.ascontiguousarray(np.asarray(affine, dtype=np.float64))
        flags = labelled_flags(labelled_organs)
        inputs = [
            grpcclient.InferInput("volume", list(vol.shape), "INT16"),
            grpcclient.InferInput("affine", [4, 4], "FP64"),
            grpcclient.InferInput("labelled_organs", [NUM_ORGANS], "UINT8"),
        ]
        inputs[0].set_data_from_numpy(vol)
        inputs[1].set_data_from_numpy(aff)
        inputs[2].set_data_from_numpy(flags)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("labels", "heatmap", "organ_stats", "weights_trained")]
        tracer = trace.get_tracer(__name__, tracer_provider=self._tracer_provider)
        with tracer.start_as_current_span(
            "triton.infer",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "triton",
                "atlasflow.model_name": self.model_name,
                "atlasflow.input_shape": list(vol.shape),
                "atlasflow.input_dtype": "int16",
            },
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            try:
                result = self._client.infer(
                    self.model_name,
                    inputs,
                    outputs=outputs,
                    client_timeout=self.timeout_s,
                    headers=dict(carrier),
                    parameters=dict(carrier) or None,
                )
            except InferenceServerException as exc:
                mapped = self._map_error(exc)
                span.set_attribute("atlasflow.error_reason", mapped.reason)
                span.set_status(trace.Status(trace.StatusCode.ERROR, mapped.reason))
                raise mapped from None
            try:
                labels = result.as_numpy("labels")
                heatmap = result.as_numpy("heatmap")
                stats = result.as_numpy("organ_stats")
                trained = result.as_numpy("weights_trained")
            except Exception:  # noqa: BLE001 - undecodable response
                labels = heatmap = stats = trained = None
            if (
                labels is None
                or heatmap is None
                or stats is None
                or trained is None
                or labels.shape != vol.shape
                or heatmap.shape != vol.shape
                or labels.dtype != np.uint8
                or heatmap.dtype != np.uint8
                or stats.shape != (NUM_ORGANS, len(STATS_COLUMNS))
                or trained.size != 1
            ):
                span.set_status(trace.Status(trace.StatusCode.ERROR, "TRITON_BAD_RESPONSE"))
                raise DataLoss(
                    "TRITON_BAD_RESPONSE",
                    "Triton returned outputs of unexpected shape or type",
                    domain=DOMAIN,
                    metadata={"model": self.model_name},
                )
        return PipelineOutput(
            labels=labels,
            heatmap=heatmap,
            organ_stats=stats.astype(np.float64),
            weights_trained=bool(trained.reshape(-1)[0]),
        )
