"""Activation of a promoted ensemble version without a restart (no grpc).

The training service promotes a version into its state's ``versions/<name>/`` (ensemble.json,
member weights, model_card.json with each member's SHA-256, `atlasflow.training.versions`) and
then calls segmentation's ``ActivateEnsembleVersion`` hand-off (why an RPC and not a watched
pointer: docs/training.md "Roll-out without restart"). This module is what the servicer does
with it:

1. `verify_version`: the name is a plain directory name under the versions directory, the
   ensemble file and the model card parse, and every member's weights file matches the card's
   digest (``UNKNOWN_VERSION``, ``VERSION_CORRUPT``, ``VERSION_DIGEST_MISMATCH``) -- before
   anything is loaded.
2. A `Loader` makes the version servable on Triton: embedded mode (PyTriton,
   `PyTritonLoader`) asks the running Triton process's control model ``atlasflow_activate`` to
   verify and bind the version (`atlasflow.segmentation.triton_server`); cluster mode (stock
   Triton, `ReadyCheckLoader`) only checks that the model the training service loaded through
   the repository API is ready.
3. `EnsembleRegistry.activate`: one atomic swap of the registry's state (served versions,
   default, segmenter, members, strategy per version). Jobs are keyed by their ensemble
   version and the worker looks their segmenter up per job, so a job queued or running before
   the swap finishes on the version it was created with; new jobs get the new default.

After a restart, `CurrentVersionActivator` activates the promoted version (``CURRENT``) again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from atlasflow.common.errors import AtlasflowError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from atlasflow.method.strategy import RankingStrategy
from atlasflow.segmentation.ensemble import EnsembleConfig, load_ensemble, triton_model_name

DOMAIN = "atlasflow.segmentation"
MAX_NAME = 200
log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_version(versions_dir: str | Path, name: str) -> EnsembleConfig:
    """The version's ensemble after checking its weights against its model card (module
    docstring, step 1); raises the specific error otherwise."""
    if not versions_dir:
        raise FailedPrecondition("VERSIONS_NOT_CONFIGURED", "this service has no versions directory", domain=DOMAIN)
    if not name or len(name) > MAX_NAME or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise InvalidArgument(
            "INVALID_VERSION_NAME",
            "ensemble_version must be a version name, not a path",
            domain=DOMAIN,
            metadata={"ensemble_version": name[:100]},
        )
    folder = Path(versions_dir) / name
    if not folder.is_dir():
        raise NotFound(
            "UNKNOWN_VERSION", "no such ensemble version", domain=DOMAIN, metadata={"ensemble_version": name}
        )

    def corrupt(what: str) -> FailedPrecondition:
        return FailedPrecondition(
            "VERSION_CORRUPT",
            f"the ensemble version is incomplete or unreadable: {what}",
            domain=DOMAIN,
            metadata={"ensemble_version": name, "file": what},
        )

    try:
        card = json.loads((folder / "model_card.json").read_text())
        digests = dict(card["weights"])
    except (OSError, ValueError, KeyError, TypeError):
        raise corrupt("model_card.json") from None
    try:
        config = load_ensemble(folder / "ensemble.json")
    except Exception:  # noqa: BLE001 - any unreadable ensemble file is the version's corruption
        raise corrupt("ensemble.json") from None
    if config.version != name:
        raise corrupt("ensemble.json")
    for member in config.members:
        if member.checkpoint is None or not Path(member.checkpoint).is_file():
            raise corrupt(f"{member.name} weights")
        expected = digests.get(member.name)
        if expected is None:
            raise corrupt("model_card.json")
        if _sha256(Path(member.checkpoint)) != expected:
            raise FailedPrecondition(
                "VERSION_DIGEST_MISMATCH",
                "a member's weights do not match the model card's digest",
                domain=DOMAIN,
                metadata={"ensemble_version": name, "member": member.name},
            )
    return config


class Loader(Protocol):
    """Makes a verified version servable on Triton; returns the Triton model name."""

    def load(self, config: EnsembleConfig) -> str: ...


@dataclass
class PyTritonLoader:
    """Embedded mode: ``activate`` sends the version name to the running PyTriton process's
    control model and returns the model name it bound (`activate_via`)."""

    activate: Callable[[str], str]

    def load(self, config: EnsembleConfig) -> str:
        return self.activate(config.version)


@dataclass
class ReadyCheckLoader:
    """Cluster mode: the model was loaded through Triton's repository API by the training
    service (`atlasflow.training.rollout.TritonRepositoryRollout`); this checks it is ready
    (``is_ready(model name)``)."""

    is_ready: Callable[[str], bool]

    def load(self, config: EnsembleConfig) -> str:
        name = triton_model_name(config.version)
        if not self.is_ready(name):
            raise Unavailable(
                "TRITON_LOAD_FAILED",
                "Triton does not serve the version's model (load it through the repository API first)",
                domain=DOMAIN,
                metadata={"model": name},
            )
        return name


@dataclass(frozen=True)
class RegistryState:
    """What the service serves: ``versions`` (default first) and per version its segmenter,
    member names and ranking strategy. Replaced as a whole (never mutated)."""

    versions: tuple[str, ...]
    segmenters: Mapping[str, Any] = field(default_factory=dict)
    members: Mapping[str, list[str]] = field(default_factory=dict)
    strategies: Mapping[str, RankingStrategy] = field(default_factory=dict)

    @property
    def default(self) -> str:
        return self.versions[0]


class EnsembleRegistry:
    """The served ensemble versions, swapped atomically by `activate` (module docstring)."""

    def __init__(self, state: RegistryState) -> None:
        self._state = state
        self._lock = threading.Lock()  # serialises activations (loading is slow)

    @property
    def state(self) -> RegistryState:
        return self._state

    def activate(
        self,
        versions_dir: str | Path,
        name: str,
        loader: Loader,
        make_segmenter: Callable[[str], Any],
    ) -> tuple[RegistryState, RegistryState, str]:
        """Verify, load and make ``name`` the default; returns (before, after, model name).
        Activating the default again loads nothing."""
        with self._lock:
            before = self._state
            if before.default == name and name in before.segmenters:
                return before, before, triton_model_name(name)
            config = verify_version(versions_dir, name)
            model = loader.load(config)
            segmenter = before.segmenters.get(name) or make_segmenter(model)
            after = replace(
                before,
                versions=(name, *[v for v in before.versions if v != name]),
                segmenters={**before.segmenters, name: segmenter},
                members={**before.members, name: [m.name for m in config.members]},
                strategies={**before.strategies, name: config.strategy},
            )
            self._state = after  # one reference assignment: readers see before or after
            return before, after, model


ACTIVATE_MODEL = "atlasflow_activate"  # = atlasflow.segmentation.triton_server.ACTIVATE_MODEL


def activate_via(make_client: Callable[[str], Any], *, timeout_s: float = 600.0) -> Callable[[str], str]:
    """The embedded mode's activation call: infer on the PyTriton process's control model
    (`ACTIVATE_MODEL`) with the version name, through a `TritonSegmenter` made by
    ``make_client(ACTIVATE_MODEL)`` (the service's Triton transport); returns the bound
    model's name. Domain errors of the server (e.g. ``VERSION_DIGEST_MISMATCH``) come back as
    themselves; a Triton without the control model (started without ``--versions-dir``) is
    ``TRITON_MODEL_NOT_READY``."""

    def activate(name: str) -> str:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from opentelemetry import propagate
        from tritonclient.utils import InferenceServerException

        client = make_client(ACTIVATE_MODEL)
        try:
            inp = grpcclient.InferInput("version", [1], "BYTES")
            inp.set_data_from_numpy(np.array([name.encode()], dtype=np.object_))
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            result = client._client.infer(
                ACTIVATE_MODEL, [inp], client_timeout=timeout_s, headers=dict(carrier), parameters=dict(carrier) or None
            )
        except InferenceServerException as exc:
            raise client._map_error(exc) from None
        finally:
            client.close()
        out = result.as_numpy("model_name")
        if out is None or out.size != 1:
            raise Unavailable("TRITON_LOAD_FAILED", "Triton did not name the loaded model", domain=DOMAIN)
        value = out.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    return activate


class CurrentVersionActivator:
    """At start: serve the promoted version (``<versions_dir>/CURRENT``, written by training's
    promotion) again after a restart of segmentation, without waiting for the next round.
    `run` (a `ThreadLoop` target) tries the activation every ``retry_s`` while Triton or its
    control model is not there yet (UNAVAILABLE, TRITON_MODEL_NOT_READY), gives up on the
    version's own errors (unknown, corrupt: logged), then idles until `request_stop`."""

    def __init__(
        self,
        registry: EnsembleRegistry,
        versions_dir: str,
        loader: Loader,
        make_segmenter: Callable[[str], Any],
        *,
        retry_s: float = 5.0,
    ) -> None:
        self.registry, self.versions_dir, self.loader, self.make_segmenter = (
            registry,
            versions_dir,
            loader,
            make_segmenter,
        )
        self.retry_s = retry_s
        self.stop = threading.Event()
        self.done = threading.Event()

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> None:
        if not self.done.is_set():
            self._activate()
            self.done.set()
        self.stop.wait()

    def _activate(self) -> None:
        pointer = Path(self.versions_dir) / "CURRENT" if self.versions_dir else None
        if pointer is None or not pointer.is_file():
            return
        name = pointer.read_text().strip()
        warned = False
        while not self.stop.is_set():
            try:
                self.registry.activate(self.versions_dir, name, self.loader, self.make_segmenter)
                log.info("promoted ensemble version served again", extra={"fields": {"ensemble_version": name}})
                return
            except AtlasflowError as exc:
                if exc.code == "UNAVAILABLE" or exc.reason == "TRITON_MODEL_NOT_READY":
                    if not warned:
                        log.warning(
                            "promoted version not servable yet, retrying",
                            extra={"fields": {"ensemble_version": name, "reason": exc.reason}},
                        )
                        warned = True
                    self.stop.wait(self.retry_s)
                    continue
                log.error(
                    "promoted version refused", extra={"fields": {"ensemble_version": name, "reason": exc.reason}}
                )
                return
