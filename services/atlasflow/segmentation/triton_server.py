"""Serve ensemble pipelines from a real Triton Inference Server (PyTriton, CPU or GPU).

    python -m atlasflow.segmentation.triton_server --ensemble abdomen-trio-v1 \\
        --grpc-port 8001 --http-port 8000 --metrics-port 8002 [--device cpu] \\
        [--model NAME --state-dir DIR]   (imported models' networks: `model_serving`)
        [--member NAME --state-dir DIR]  (imported models as ensemble members: `imported`)

One Triton model per ensemble version, named `triton_model_name(version)`
(``abdomen-trio-v1`` -> ``abdomen_trio_v1``; with ``--member``:
``abdomen_trio_v1__with_<sha12>``, `atlasflow.segmentation.imported.served_model_name`),
``batching=False``:

inputs   ``volume`` int16 [-1, -1, -1] (X, Y, Z) HU; ``affine`` float64 [4, 4] voxel -> RAS mm;
         ``labelled_organs`` uint8 [9] flags, flag k = organ id k+1.
outputs  ``labels`` uint8 [-1, -1, -1]; ``heatmap`` uint8 [-1, -1, -1] (0..255 = 0..1);
         ``organ_stats`` float64 [9, 4] (`outputs.STATS_COLUMNS`); ``weights_trained`` uint8 [1].

With ``--versions-dir DIR`` (promoted ensemble versions, the training state's ``versions/``)
the control model ``atlasflow_activate`` (`Activations`) binds a verified version from DIR into
the running server on request: segmentation's ActivateEnsembleVersion (no restart).

Request parameters ``traceparent``/``tracestate`` (W3C) are extracted with
``opentelemetry.propagate`` and the pipeline runs in a span ``segmentation.pipeline`` of that
context (SDK/exporter configuration is the caller's business: OTEL_* or the lead's setup).

Domain errors are returned as a Triton error whose text starts with
``ATLASFLOW_ERROR <CODE> <REASON>:`` so that `TritonSegmenter` maps them back.

Environment: Triton's Python-backend stub links against the system libpython; the interpreter's
``LIBDIR`` is prepended to ``LD_LIBRARY_PATH`` before Triton starts (the server subprocess
inherits it), otherwise model loading fails with
``'_thread.RLock' object has no attribute '_recursion_count'``.

Access: every endpoint (gRPC, HTTP, metrics) binds 127.0.0.1 only, and there is no access
token: PyTriton would pass one to ``tritonserver`` on its command line
(``--grpc-restricted-protocol=...:triton-access-token=<token>``), readable by any local user
in ``/proc/<pid>/cmdline``, so it protected nothing against them (docs/security.md, "Triton").
The restricted protocols are therefore off (``TritonSecurityConfig(restricted_endpoints=[])``)
and the co-located segmentation service registers shared memory without a header.
``ATLASFLOW_TRITON_ACCESS_TOKEN`` is refused at start (`access_token_refused`). In a cluster
the stock Triton runs with mutual TLS instead (charts/atlasflow).

Message size: Triton's gRPC endpoint accepts messages up to 2 GiB - 1 (its built-in
``MAX_GRPC_MESSAGE_SIZE``; PyTriton 0.7 exposes no setting), enough for a 512x512x600 int16 CT
(~315 MB); the client raises its own limits (`TritonSegmenter(max_message_bytes=...)`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import queue
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from atlasflow.common.errors import AtlasflowError, Unavailable
from atlasflow.segmentation.pipeline import EnsemblePipeline

LOG = logging.getLogger("atlasflow.segmentation.triton_server")
ERROR_PREFIX = "ATLASFLOW_ERROR"
READY_LINE = "TRITON READY"
#: the control model of `Activations` (a version name in, the bound model's name out)
ACTIVATE_MODEL = "atlasflow_activate"  # = activation.ACTIVATE_MODEL


#: environment variable of the removed access token (a value fails the start)
ACCESS_TOKEN_ENV = "ATLASFLOW_TRITON_ACCESS_TOKEN"


def access_token_refused(environ: dict[str, str] | None = None) -> str:
    """The error message when the removed ``ATLASFLOW_TRITON_ACCESS_TOKEN`` is set, else ""."""
    env = os.environ if environ is None else environ
    if env.get(ACCESS_TOKEN_ENV):
        return (
            f"{ACCESS_TOKEN_ENV} is no longer used (the token sat on tritonserver's command line): "
            "unset it; the local Triton binds 127.0.0.1 only (docs/security.md)"
        )
    return ""


def ensure_libpython_on_ld_path(environ: dict[str, str] | None = None) -> str:
    """Prepend this interpreter's ``LIBDIR`` (system libpython) to ``LD_LIBRARY_PATH``; returns it."""
    env = os.environ if environ is None else environ
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in parts:
        parts.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = ":".join(parts)
    return env["LD_LIBRARY_PATH"]


def make_infer_func(
    pipeline: EnsemblePipeline, tracer_provider: Any | None = None
) -> Callable[[list[Any]], list[dict[str, npt.NDArray[Any]]]]:
    """PyTriton infer callable (list of `pytriton.proxy.types.Request` -> list of output dicts).

    ``tracer_provider``: optional OpenTelemetry TracerProvider (default: the global one).
    """
    from opentelemetry import propagate, trace
    from pytriton.exceptions import PyTritonBadParameterError

    tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
    model_name = pipeline.model_name

    def infer(requests: list[Any]) -> list[dict[str, npt.NDArray[Any]]]:
        responses = []
        for request in requests:
            params = {k: str(v) for k, v in (request.parameters or {}).items() if k in ("traceparent", "tracestate")}
            ctx = propagate.extract(params) if params else None
            volume = request.data["volume"]
            with tracer.start_as_current_span(
                "segmentation.pipeline",
                context=ctx,
                attributes={
                    "atlasflow.model_name": model_name,
                    "atlasflow.ensemble_version": pipeline.version,
                    "atlasflow.input_shape": list(volume.shape),
                },
            ) as span:
                try:
                    out = pipeline(volume, request.data["affine"], request.data["labelled_organs"])
                except AtlasflowError as exc:
                    span.set_attribute("atlasflow.error_reason", exc.reason)
                    raise PyTritonBadParameterError(f"{ERROR_PREFIX} {exc.code} {exc.reason}: {exc.message}") from None
                span.set_attribute("atlasflow.weights_trained", out.weights_trained)
                for stage, seconds in out.timings_s.items():
                    span.set_attribute(f"atlasflow.timing.{stage}_s", round(float(seconds), 4))
            LOG.info(
                "pipeline %s shape=%s %s",
                model_name,
                "x".join(str(n) for n in volume.shape),
                " ".join(f"{stage}={seconds:.3f}s" for stage, seconds in out.timings_s.items()),
            )
            responses.append(
                {
                    "labels": out.labels,
                    "heatmap": out.heatmap,
                    "organ_stats": out.organ_stats.astype(np.float64),
                    "weights_trained": np.array([1 if out.weights_trained else 0], dtype=np.uint8),
                }
            )
        return responses

    return infer


def bind_pipeline(triton: Any, pipeline: EnsemblePipeline) -> str:
    """Bind one pipeline to a `pytriton.triton.Triton`; returns the Triton model name
    (`EnsemblePipeline.model_name`: the ensemble's, with its imported members' digest)."""
    from pytriton.model_config import ModelConfig, Tensor

    name = pipeline.model_name
    triton.bind(
        model_name=name,
        infer_func=make_infer_func(pipeline),
        inputs=[
            Tensor(name="volume", dtype=np.int16, shape=(-1, -1, -1)),
            Tensor(name="affine", dtype=np.float64, shape=(4, 4)),
            Tensor(name="labelled_organs", dtype=np.uint8, shape=(9,)),
        ],
        outputs=[
            Tensor(name="labels", dtype=np.uint8, shape=(-1, -1, -1)),
            Tensor(name="heatmap", dtype=np.uint8, shape=(-1, -1, -1)),
            Tensor(name="organ_stats", dtype=np.float64, shape=(9, 4)),
            Tensor(name="weights_trained", dtype=np.uint8, shape=(1,)),
        ],
        config=ModelConfig(batching=False),
        strict=True,
    )
    return name


class Activations:
    """The control model ``ACTIVATE_MODEL`` (bound when ``serve`` has a versions directory):
    a request carries a version name (``version`` bytes [1]); the version is verified against
    its model card (`atlasflow.segmentation.activation.verify_version`), its pipeline built
    and bound as a new Triton model into the running server (PyTriton loads a model bound after
    start through Triton's repository API), and the answer is its model name (``model_name``
    bytes [1]). The binding runs on the serving thread (`process`), the infer callable waits
    for it. Models already bound stay bound: jobs created for them keep working."""

    def __init__(self, versions_dir: str, device: str, imported: dict[str, Any] | None = None) -> None:
        self.versions_dir = versions_dir
        self.device = device
        #: the imported members' `EnsemblePipeline` keyword arguments (every version gets them)
        self.imported = dict(imported or {})
        self.bound: dict[str, str] = {}
        self._queue: queue.Queue[tuple[str, concurrent.futures.Future[str]]] = queue.Queue()

    def infer(self, requests: list[Any]) -> list[dict[str, npt.NDArray[Any]]]:
        from pytriton.exceptions import PyTritonBadParameterError

        out = []
        for request in requests:
            raw = np.asarray(request.data["version"]).reshape(-1)
            name = raw[0].decode() if raw.size and isinstance(raw[0], bytes) else str(raw[0] if raw.size else "")
            done: concurrent.futures.Future[str] = concurrent.futures.Future()
            self._queue.put((name, done))
            try:
                model = done.result(timeout=600)
            except AtlasflowError as exc:
                raise PyTritonBadParameterError(f"{ERROR_PREFIX} {exc.code} {exc.reason}: {exc.message}") from None
            out.append({"model_name": np.array([model.encode()], dtype=np.bytes_)})
        return out

    def process(self, triton: Any) -> None:
        """Serve the queued activations (the serving thread, between its liveness checks)."""
        from atlasflow.segmentation.activation import verify_version

        while True:
            try:
                name, done = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                if name not in self.bound:
                    config = verify_version(self.versions_dir, name)
                    pipeline = EnsemblePipeline(str(config.source), device=self.device, **self.imported)
                    self.bound[name] = bind_pipeline(triton, pipeline)
                    LOG.info("activated ensemble version %s as model %s", name, self.bound[name])
                done.set_result(self.bound[name])
            except AtlasflowError as exc:
                done.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - the caller gets a load failure, the server lives on
                LOG.error("activation of %s failed: %s", name, exc)
                done.set_exception(
                    Unavailable(
                        "TRITON_LOAD_FAILED", "the version could not be loaded", domain="atlasflow.segmentation"
                    )
                )


def bind_activations(triton: Any, activations: Activations) -> str:
    from pytriton.model_config import ModelConfig, Tensor

    triton.bind(
        model_name=ACTIVATE_MODEL,
        infer_func=activations.infer,
        inputs=[Tensor(name="version", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="model_name", dtype=bytes, shape=(1,))],
        config=ModelConfig(batching=False),
        strict=False,
    )
    return ACTIVATE_MODEL


def serve(
    ensembles: Sequence[str],
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    device: str = "cpu",
    stop_event: threading.Event | None = None,
    versions_dir: str = "",
    models: Sequence[str] = (),
    state_dir: str = "",
    members: Sequence[str] = (),
) -> None:
    """Load the pipelines, start Triton, print READY_LINE, block until SIGTERM/SIGINT or
    ``stop_event``, then stop Triton cleanly. ``versions_dir``: where promoted ensemble
    versions live (the training state's ``versions/``): binds the control model
    ``ACTIVATE_MODEL`` (`Activations`). ``models``: registered imported models of
    ``state_dir`` whose networks are bound too (`atlasflow.segmentation.model_serving`).
    ``members``: registered models of ``state_dir`` added to every ensemble as members
    (`atlasflow.segmentation.imported`): their networks are bound, and the pipelines call them
    on this server (loopback gRPC) through the models' own pre/post-processing."""
    from atlasflow.segmentation.model_serving import bind_imported_model, require_pytriton

    require_pytriton()
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    refused = access_token_refused()
    if refused:
        raise RuntimeError(refused)
    ensure_libpython_on_ld_path()
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if (members or models) and not state_dir:
        raise RuntimeError("--member / --model need --state-dir (the model registry's state dir)")
    t0 = time.perf_counter()
    imported: dict[str, Any] = (
        {
            "imported": list(members),
            "models_state_dir": state_dir,
            "imported_triton_url": f"127.0.0.1:{grpc_port}",
        }
        if members
        else {}
    )
    pipelines = [EnsemblePipeline(e, device=device, **imported) for e in ensembles]
    t_models = time.perf_counter() - t0
    # Loopback only: the local Triton serves the co-located segmentation service and nobody else
    # (PyTriton's default is every interface). In a cluster the stock Triton image is used and a
    # NetworkPolicy admits only segmentation (charts/atlasflow).
    config = TritonConfig(
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        metrics_address="127.0.0.1",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        exit_on_error=True,
        strict_readiness=True,
    )
    # No access token (it would be on tritonserver's argv): nothing restricted, loopback only.
    triton = Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[]))
    try:
        names = [bind_pipeline(triton, p) for p in pipelines]
        networks = list(dict.fromkeys([*models, *members]))  # each imported network bound once
        names += [bind_imported_model(triton, state_dir, m, device) for m in networks]
        activations = Activations(versions_dir, device, imported) if versions_dir else None
        if activations is not None:
            activations.bound.update({p.version: n for p, n in zip(pipelines, names)})
            names.append(bind_activations(triton, activations))
        triton.run()
        print(
            f"{READY_LINE} models={','.join(names)} grpc_port={grpc_port} "
            f"load_s={t_models:.2f} startup_s={time.perf_counter() - t0:.2f}",
            flush=True,
        )
        while not stop.wait(0.2):
            if activations is not None:
                activations.process(triton)
            if not triton.is_alive():
                LOG.error("Triton or its model proxy died")
                break
    finally:
        triton.stop()
        print("TRITON STOPPED", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble", action="append", default=[], help="ensemble version or JSON path (repeatable)")
    parser.add_argument("--model", action="append", default=[], help="a registered imported model (repeatable)")
    parser.add_argument(
        "--member", action="append", default=[], help="a registered imported model added to every ensemble (repeatable)"
    )
    parser.add_argument("--state-dir", default="", help="the model registry's state dir (with --model / --member)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--versions-dir", default="", help="promoted ensemble versions (activation without restart)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Process entry point: install the shared TracerProvider (OTLP export when OTEL_* is set).
    from atlasflow.common.telemetry import setup_tracing

    setup_tracing("atlasflow-triton")
    serve(
        args.ensemble,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        device=args.device,
        versions_dir=args.versions_dir,
        models=args.model,
        state_dir=args.state_dir,
        members=args.member,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
