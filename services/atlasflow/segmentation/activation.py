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

Several replicas: the activation is recorded in segmentation's database in the same step
(`EnsembleRegistry.activate` ``record``; table ``served_version``) and every replica follows the
record (`ServedVersionFollower`: polled, verified and loaded with the same checks; a replica
that cannot serve it claims no jobs). After a restart the record is served again; without one,
`CurrentVersionActivator` activates the promoted version (``CURRENT``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from atlasflow.common.errors import AtlasflowError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from atlasflow.method.strategy import RankingStrategy
from atlasflow.segmentation.ensemble import EnsembleConfig, load_ensemble, triton_model_name
from atlasflow.segmentation.imported import ImportedMember, served_model_name
from atlasflow.segmentation.jobs import ServedVersion

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
    return verify_version_card(versions_dir, name)[0]


def verify_version_card(versions_dir: str | Path, name: str, expect_card: str = "") -> tuple[EnsembleConfig, str]:
    """`verify_version`, and the SHA-256 of the version's ``model_card.json`` (``sha256:<hex>``);
    with ``expect_card``, a card with another digest is ``VERSION_CARD_MISMATCH``
    (FAILED_PRECONDITION): this replica's copy of the version is not the one activated."""
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
        card_bytes = (folder / "model_card.json").read_bytes()
        card = json.loads(card_bytes)
        digests = dict(card["weights"])
    except (OSError, ValueError, KeyError, TypeError):
        raise corrupt("model_card.json") from None
    card_digest = "sha256:" + hashlib.sha256(card_bytes).hexdigest()
    if expect_card and card_digest != expect_card:
        raise FailedPrecondition(
            "VERSION_CARD_MISMATCH",
            "this replica's copy of the ensemble version is not the one that was activated (model card digest)",
            domain=DOMAIN,
            metadata={"ensemble_version": name, "expected": expect_card[:80], "found": card_digest[:80]},
        )
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
    return config, card_digest


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
    (``is_ready(model name)``). With imported members (``imported``: the service's
    IMPORTED_MODELS) the model is ``<model>__with_<sha12>`` (`imported.served_model_name`), the
    name the repository writer gives a version written with ``--member``."""

    is_ready: Callable[[str], bool]
    imported: Sequence[ImportedMember] = ()

    def load(self, config: EnsembleConfig) -> str:
        name = served_model_name(config.model_name, self.imported)
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
    #: model card digest per activated version (`verify_version_card`)
    cards: Mapping[str, str] = field(default_factory=dict)

    @property
    def default(self) -> str:
        return self.versions[0]


class EnsembleRegistry:
    """The served ensemble versions, swapped atomically by `activate` (module docstring).
    ``imported``: the imported members every version is served with (IMPORTED_MODELS): an
    activated version's member list ends with their ``<name>@<digest12>`` like the configured
    ensembles'."""

    def __init__(self, state: RegistryState, imported: Sequence[ImportedMember] = ()) -> None:
        self._state = state
        self._imported = tuple(imported)
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
        *,
        expect_card: str = "",
        record: Callable[[str, str], object] | None = None,
    ) -> tuple[RegistryState, RegistryState, str]:
        """Verify, load and make ``name`` the default; returns (before, after, model name).
        Activating the default again loads nothing.

        ``expect_card``: the model card digest the version must have (a follower: the recorded
        one, `verify_version_card`). ``record(name, card digest)``: called after the version
        verified and loaded and before the swap (ActivateEnsembleVersion: the database record
        every replica follows); when it raises, nothing is swapped."""
        with self._lock:
            before = self._state
            card = before.cards.get(name, "")
            if before.default == name and name in before.segmenters and (not expect_card or card == expect_card):
                if record is not None and card:  # a configured ensemble (no card) is not recorded
                    record(name, card)
                return before, before, served_model_name(triton_model_name(name), self._imported)
            config, card = verify_version_card(versions_dir, name, expect_card)
            model = loader.load(config)
            segmenter = before.segmenters.get(name) or make_segmenter(model)
            if record is not None:
                record(name, card)
            after = replace(
                before,
                versions=(name, *[v for v in before.versions if v != name]),
                segmenters={**before.segmenters, name: segmenter},
                members={**before.members, name: self._members(config)},
                strategies={**before.strategies, name: config.strategy},
                cards={**before.cards, name: card},
            )
            self._state = after  # one reference assignment: readers see before or after
            return before, after, model

    def _members(self, config: EnsembleConfig) -> list[str]:
        return [m.name for m in config.members] + [m.label for m in self._imported]

    def bind(self, versions_dir: str | Path, name: str, loader: Loader, make_segmenter: Callable[[str], Any]) -> None:
        """Serve ``name`` too, for the jobs created for it, without changing the default (a
        replica that never activated it, or restarted since: `Worker` asks for it when such a
        job is claimed); the same checks as `activate`. Nothing when it is served already."""
        with self._lock:
            before = self._state
            if name in before.segmenters:
                return
            config, card = verify_version_card(versions_dir, name)
            model = loader.load(config)
            self._state = replace(
                before,
                versions=(*before.versions, name),
                segmenters={**before.segmenters, name: make_segmenter(model)},
                members={**before.members, name: self._members(config)},
                strategies={**before.strategies, name: config.strategy},
                cards={**before.cards, name: card},
            )


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
        self._warned = False

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> None:
        if not self.done.is_set():
            self._activate()
            self.done.set()
        self.stop.wait()

    def _activate(self) -> None:
        while not self.stop.is_set() and not self.try_once():
            self.stop.wait(self.retry_s)

    def try_once(self) -> bool:
        """One try; True when finished (served, refused, or nothing to serve), False when Triton
        is not there yet (try again later)."""
        pointer = Path(self.versions_dir) / "CURRENT" if self.versions_dir else None
        if pointer is None or not pointer.is_file():
            return True
        name = pointer.read_text().strip()
        try:
            self.registry.activate(self.versions_dir, name, self.loader, self.make_segmenter)
            log.info("promoted ensemble version served again", extra={"fields": {"ensemble_version": name}})
            return True
        except AtlasflowError as exc:
            if _transient(exc):
                if not self._warned:
                    log.warning(
                        "promoted version not servable yet, retrying",
                        extra={"fields": {"ensemble_version": name, "reason": exc.reason}},
                    )
                    self._warned = True
                return False
            log.error("promoted version refused", extra={"fields": {"ensemble_version": name, "reason": exc.reason}})
            return True


def _transient(exc: AtlasflowError) -> bool:
    """Triton or its model not there yet (worth retrying), as opposed to the version's own errors."""
    return exc.code == "UNAVAILABLE" or exc.reason == "TRITON_MODEL_NOT_READY"


class ServedVersionSource(Protocol):
    """Where the activated version is recorded (`atlasflow.segmentation.jobs.JobStore`)."""

    def served_version(self) -> ServedVersion | None: ...


class ServedVersionFollower:
    """Every replica serves the ensemble version recorded in the database (several replicas).

    ActivateEnsembleVersion reaches ONE replica (the Service picks it): that replica verifies,
    loads, records the version in segmentation's database (``served_version``, migration 0003:
    version, model card digest, when, by whom) and swaps its registry, in one step
    (`EnsembleRegistry.activate` with ``record``). Every replica (that one included) runs this
    follower (a `ThreadLoop` target): every ``poll_s`` it reads the record (one row, read only)
    and, when this replica does not serve it as its default yet, activates it with the same
    checks as the RPC (`verify_version_card`: name, files, each member's weights against the
    model card, and the card's digest against the recorded one; then the `Loader`: Triton
    binds it or has it ready). After a restart the record wins over a stale ``versions/CURRENT``;
    with no record (no activation yet) ``versions/CURRENT`` is activated as before
    (`CurrentVersionActivator`).

    **A replica that cannot serve the recorded version claims no jobs** (decision): the worker
    asks `may_claim` before every claim, which reads the record and answers False while this
    replica's default is not the recorded version with the recorded card (not followed yet,
    missing or corrupt weights, another copy of the version, Triton without the model). The
    reason is logged (once per version and reason, at ERROR for the version's own errors) and
    exported (``atlasflow_ensemble_version_in_step`` 0, `atlasflow.segmentation.gauges`), and
    the follower keeps trying every ``poll_s`` (a volume mounted late, Triton loading it).
    Claiming under the old version instead would give a hospital labels from a version that is
    no longer the activated one, with nothing but a log line to tell; the jobs wait in the
    shared queue for a replica that serves the version (an SRE sees the gauge, the queue depth
    and the log). New jobs get the recorded version as their default on every replica
    (`SegmentationServicer`), whichever replica the caller reached. Jobs keep the version they
    were created with.
    """

    def __init__(
        self,
        registry: EnsembleRegistry,
        store: ServedVersionSource,
        versions_dir: str,
        loader: Loader,
        make_segmenter: Callable[[str], Any],
        *,
        poll_s: float = 5.0,
        current: CurrentVersionActivator | None = None,
    ) -> None:
        self.registry, self.store, self.versions_dir, self.loader, self.make_segmenter = (
            registry,
            store,
            versions_dir,
            loader,
            make_segmenter,
        )
        self.poll_s = poll_s
        self.current = current or CurrentVersionActivator(registry, versions_dir, loader, make_segmenter)
        self._current_done = False
        self.stop = threading.Event()
        #: set after the first sync that left this replica in step (the record or CURRENT served)
        self.done = threading.Event()
        #: the last answer: this replica serves the recorded version (or none is recorded)
        self.in_step = True
        #: why it does not ("" when in step): (version, error reason)
        self.blocked: tuple[str, str] = ("", "")
        self._lock = threading.Lock()  # one sync at a time (the loop and the worker's gate)

    def request_stop(self) -> None:
        self.stop.set()

    def run(self) -> None:
        warned = False
        while not self.stop.is_set():
            try:
                if self.sync():
                    self.done.set()
                warned = False
            except Exception as exc:  # noqa: BLE001 - the database unreachable: keep what is served, retry
                if not warned:
                    log.warning(
                        "served ensemble version not readable, retrying",
                        extra={"fields": {"exc_type": type(exc).__name__}},
                    )
                    warned = True
            self.stop.wait(self.poll_s)

    @property
    def served_default(self) -> str:
        """The version this replica serves as its default."""
        return self.registry.state.default

    def _matches(self, record: ServedVersion) -> bool:
        state = self.registry.state
        return state.default == record.version and state.cards.get(record.version) == record.card_digest

    def may_claim(self) -> bool:
        """The worker's gate before a claim: reads the record; True when none is recorded or this
        replica serves it (it does not activate: `run` does)."""
        record = self.store.served_version()
        ok = record is None or self._matches(record)
        self.in_step = ok
        return ok

    def sync(self) -> bool:
        """Read the record and serve it (activating it when needed); True when in step."""
        with self._lock:
            record = self.store.served_version()
            if record is None:
                if not self._current_done:
                    self._current_done = self.current.try_once()
                self.in_step, self.blocked = True, ("", "")
                return self._current_done
            if self._matches(record):
                self.in_step, self.blocked = True, ("", "")
                return True
            try:
                self.registry.activate(
                    self.versions_dir, record.version, self.loader, self.make_segmenter, expect_card=record.card_digest
                )
            except AtlasflowError as exc:
                self.in_step = False
                if self.blocked != (record.version, exc.reason):
                    self.blocked = (record.version, exc.reason)
                    (log.warning if _transient(exc) else log.error)(
                        "cannot serve the activated ensemble version; this replica claims no jobs until it can",
                        extra={
                            "fields": {
                                "ensemble_version": record.version,
                                "reason": exc.reason,
                                "activated_by": record.activated_by,
                            }
                        },
                    )
                return False
            self.in_step, self.blocked = True, ("", "")
            log.info(
                "following the activated ensemble version",
                extra={"fields": {"ensemble_version": record.version, "activated_by": record.activated_by}},
            )
            return True
