"""Triton server pieces without Triton: LD_LIBRARY_PATH, infer callable, trace-context extraction."""

from __future__ import annotations

import sysconfig

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.proxy.types import Request

from atlasflow.segmentation.pipeline import EnsemblePipeline
from atlasflow.segmentation.triton_client import TritonSegmenter
from atlasflow.segmentation.triton_server import ensure_libpython_on_ld_path, make_infer_func


def test_ld_library_path_gets_libpython_dir_first_once() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    env = {"LD_LIBRARY_PATH": "/opt/x"}
    assert ensure_libpython_on_ld_path(env).split(":") == [libdir, "/opt/x"]
    assert ensure_libpython_on_ld_path(env).split(":") == [libdir, "/opt/x"]
    assert ensure_libpython_on_ld_path({}) == libdir


@pytest.fixture(scope="module")
def infer_and_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return make_infer_func(EnsemblePipeline("abdomen-trio-v1"), tracer_provider=provider), exporter


def _request(params: dict | None, affine: np.ndarray | None = None) -> Request:
    vol = np.full((30, 26, 20), -1000, dtype=np.int16)
    vol[5:25, 5:20, 3:17] = 40
    aff = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    return Request(
        data={"volume": vol, "affine": aff, "labelled_organs": np.zeros(9, np.uint8)},
        parameters=params,
    )


def test_infer_runs_pipeline_in_span_of_incoming_trace(infer_and_spans) -> None:
    infer, exporter = infer_and_spans
    exporter.clear()
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    (resp,) = infer([_request({"traceparent": f"00-{trace_id}-{parent_id}-01", "other": 3})])
    assert resp["labels"].shape == (30, 26, 20) and resp["labels"].dtype == np.uint8
    assert resp["heatmap"].dtype == np.uint8 and resp["organ_stats"].shape == (9, 4)
    assert resp["weights_trained"].tolist() == [1]
    (span,) = exporter.get_finished_spans()
    assert span.name == "segmentation.pipeline"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id
    assert span.attributes["atlasflow.model_name"] == "abdomen_trio_v1"


def test_infer_without_trace_context_starts_a_root_span(infer_and_spans) -> None:
    infer, exporter = infer_and_spans
    exporter.clear()
    infer([_request(None)])
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


def test_domain_error_becomes_parseable_triton_error(infer_and_spans) -> None:
    infer, _ = infer_and_spans
    with pytest.raises(PyTritonBadParameterError) as err:
        infer([_request(None, affine=np.zeros((4, 4)))])
    assert str(err.value).startswith("ATLASFLOW_ERROR INVALID_ARGUMENT INVALID_AFFINE:")


def test_client_parses_server_error_text() -> None:
    from tritonclient.utils import InferenceServerException

    client = TritonSegmenter("127.0.0.1:1", "m")
    text = "Traceback (most recent call last):\n ... ATLASFLOW_ERROR INVALID_ARGUMENT INVALID_VOLUME: volume must be 3-D\n\nAt: x"
    err = client._map_error(InferenceServerException(text, status="StatusCode.INTERNAL"))
    assert type(err).__name__ == "InvalidArgument" and err.reason == "INVALID_VOLUME"
    assert "Traceback" not in err.message
    other = client._map_error(InferenceServerException("boom", status="StatusCode.INTERNAL"))
    assert other.reason == "TRITON_INFERENCE_FAILED" and other.code == "INTERNAL"
    client.close()
