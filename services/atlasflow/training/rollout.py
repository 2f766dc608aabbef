"""Roll-out of a promoted ensemble version into a running Triton, without a restart.

Cluster path (`TritonRepositoryRollout`): Triton runs with ``--model-control-mode=explicit``
on a model repository the training service can write (a shared volume). Every ensemble version
is its own Triton model, named `triton_model_name(version)` (what `TritonSegmenter` calls), with
one model version directory ``1/`` and ``version_policy: latest 1`` (the default). The roll-out:

1. writes the model directory with `atlasflow.segmentation.triton_repo.write_repository` into a
   staging folder of the repository (``.staging-<name>``, hidden from Triton) and renames it to
   ``<repo>/<model name>`` (one rename: Triton never sees a half-written model);
2. asks Triton to load it (``RepositoryModelLoad`` through tritonclient's ``load_model``) and
   waits until ``is_model_ready``;
3. optionally unloads the previous version's model (``unload_previous``) once the new one is
   ready, so in-flight requests on the old model finish first (Triton drains them).

Imported ensemble members (``members`` + ``models_state_dir``: segmentation's IMPORTED_MODELS
and MODELS_STATE_DIR, the same values): the version is written with them
(`write_repository` ``members=``), so its model is `imported.served_model_name`
(``<model>__with_<sha12>``), the name segmentation's activation waits for; each member's
PyTorch-backend entry (``<name>_<digest12>``, named by its registry digest, so never changed in
place) is moved into the repository when it is not there yet, and loaded before the ensemble
(its Python backend calls the member by BLS). A member re-imported with other weights gives
other entry and ensemble names; the registry is verified while writing (``MODEL_CHANGED``).

Steps 2 and 3 reach EVERY Triton replica: ``url`` is resolved to its addresses (the chart's
headless Service: one per ready Triton pod, `socket.getaddrinfo`) and each gets its own client
(TLS checked against the Service name); the loads run in parallel, and one replica that does
not load the model fails the roll-out (``TRITON_LOAD_FAILED`` with its ``address``).

Transport: ``tls`` (`atlasflow.common.tls.ClientTLS`) = gRPC over TLS with this service's
client certificate (the chart's Triton requires mutual TLS); plaintext only to a loopback
Triton unless ``allow_plaintext`` (`atlasflow.segmentation.triton_client.triton_grpc_client`).

The local path (`atlasflow up`, PyTriton) is not a repository-backed Triton the training
service can write to: there the segmentation service's ``ActivateEnsembleVersion`` makes the
running PyTriton process bind the new version (`atlasflow.training.reinfer.SegmentationRollout`,
`atlasflow.segmentation.activation`). `build_rollout` picks one per the ``rollout`` setting;
in cluster mode the repository load is followed by the same activation, so segmentation serves
the new version as its default either way.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from atlasflow.common.errors import InvalidArgument, Unavailable
from atlasflow.common.tls import PLAINTEXT, ClientTLS
from atlasflow.segmentation.ensemble import triton_model_name
from atlasflow.segmentation.imported import parse_names
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.training.dataset import DOMAIN
from atlasflow.training.executor import Rollout
from atlasflow.training.reinfer import Peers, SegmentationRollout
from atlasflow.training.versions import EnsembleVersion


class TritonRepositoryRollout:
    """See the module docstring. ``client``: a tritonclient ``InferenceServerClient`` (default:
    a gRPC one at ``url``, with ``tls``)."""

    def __init__(
        self,
        url: str,
        repository: str | os.PathLike[str],
        *,
        previous: str = "",
        unload_previous: bool = True,
        kind: str = "cpu",
        ready_timeout_s: float = 600.0,
        client: Any = None,
        tls: ClientTLS | None = None,
        allow_plaintext: bool = False,
        members: Sequence[str] = (),
        models_state_dir: str | Path = "",
    ) -> None:
        self.url = url
        self.members = tuple(members)
        self.models_state_dir = models_state_dir
        self.repository = Path(repository)
        self.previous = previous
        self.unload_previous = unload_previous
        self.kind = kind
        self.ready_timeout_s = ready_timeout_s
        self._client = client
        self.tls = tls
        self.allow_plaintext = allow_plaintext

    def client(self) -> Any:
        if self._client is None:
            from atlasflow.segmentation.triton_client import triton_grpc_client

            self._client = triton_grpc_client(self.url, self.tls, allow_plaintext=self.allow_plaintext, domain=DOMAIN)
        return self._client

    def write(self, version: EnsembleVersion) -> Path:
        """Write the version's model directory into the repository (staging + rename), with the
        imported members' entries (module docstring); returns the model directory."""
        staging = self.repository / f".staging-{triton_model_name(version.name)}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        written = write_repository(
            staging,
            version.ensemble_path,
            kind=self.kind,
            members=self.members,
            models_state_dir=self.models_state_dir,
        )
        for entry in sorted(p for p in staging.iterdir() if p != written and p.is_dir()):
            if not (self.repository / entry.name).exists():  # digest-named: present = identical
                os.replace(entry, self.repository / entry.name)
        final = self.repository / written.name
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        return final

    def member_entries(self) -> list[str]:
        """The Triton names of the imported members' PyTorch-backend entries (load order)."""
        if not self.members:
            return []
        from atlasflow.models.export import triton_model_name as entry_name
        from atlasflow.models.registry import ModelRegistry

        registry = ModelRegistry(self.models_state_dir)
        return [entry_name(registry.get(m)) for m in dict.fromkeys(self.members)]

    def clients(self) -> list[tuple[str, Any]]:
        """(address, client) of EVERY Triton replica behind ``url`` (a headless Service's name
        resolves to each ready pod: `atlasflow.segmentation.triton_client.address_clients`);
        the given ``client`` alone when one was passed."""
        if self._client is not None:
            return [(self.url, self._client)]
        from atlasflow.segmentation.triton_client import address_clients

        return address_clients(self.url, self.tls, allow_plaintext=self.allow_plaintext, domain=DOMAIN)

    def _load_on(self, address: str, client: Any, names: Sequence[str]) -> None:
        """Load ``names`` in order (members' entries, then the ensemble) on one replica."""
        name = names[-1]
        try:
            for name in names:
                if name != names[-1] and client.is_model_ready(name):
                    continue  # a member entry already served (the chart's Triton loads it at start)
                client.load_model(name)
                deadline = time.monotonic() + self.ready_timeout_s
                while not client.is_model_ready(name):
                    if time.monotonic() > deadline:
                        raise TimeoutError(name)
                    time.sleep(0.5)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own exception type
            raise Unavailable(
                "TRITON_LOAD_FAILED",
                f"Triton at {address} did not load the new ensemble version",
                domain=DOMAIN,
                metadata={"model": name, "address": address, "error": type(exc).__name__},
            ) from None

    def __call__(self, version: EnsembleVersion) -> str:
        """Write the model, load it on every replica (in parallel) and wait until it is ready
        on each; one replica that fails fails the roll-out (Unavailable ``TRITON_LOAD_FAILED``
        naming its address). Then unload the previous version's model on each."""
        from concurrent.futures import ThreadPoolExecutor

        name = self.write(version).name
        names = [*self.member_entries(), name]
        clients = self.clients()
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(16, len(clients)))) as pool:
                futures = [pool.submit(self._load_on, addr, client, names) for addr, client in clients]
                for future in futures:
                    future.result()  # the first failed address, in address order
            unloaded = ""
            if self.unload_previous and self.previous and self.previous != name:
                failed = 0
                for _, client in clients:
                    try:
                        client.unload_model(self.previous)
                    except Exception:  # noqa: BLE001 - the new model serves; the old one stays loaded
                        failed += 1
                unloaded = f", {self.previous} still loaded" if failed else f", unloaded {self.previous}"
        finally:
            if self._client is None:
                for _, client in clients:
                    client.close()
        self.previous = name
        where = f" on {len(clients)} Triton servers" if len(clients) > 1 else ""
        return f"triton: loaded {name}{where}{unloaded}"


def from_settings(settings: Any) -> TritonRepositoryRollout | None:
    """The cluster roll-out when ``triton_url`` and ``triton_model_repository`` are set."""
    if settings.triton_url and settings.triton_model_repository:
        tls = PLAINTEXT
        if settings.triton_tls_ca_file:
            tls = ClientTLS(
                ca_file=settings.triton_tls_ca_file,
                cert_file=settings.triton_tls_cert_file or settings.tls_client_cert_file or settings.tls_cert_file,
                key_file=settings.triton_tls_key_file or settings.tls_client_key_file or settings.tls_key_file,
                server_name=settings.triton_tls_server_name,
            )
        return TritonRepositoryRollout(
            settings.triton_url,
            settings.triton_model_repository,
            unload_previous=settings.triton_unload_previous,
            tls=tls,
            allow_plaintext=settings.triton_allow_plaintext,
            members=parse_names(settings.imported_models),
            models_state_dir=settings.models_state_dir,
        )
    return None


ROLLOUTS = ("pointer", "segmentation", "triton-repository")


def rollout_mode(settings: Any) -> str:
    """The settings' ``rollout`` ("" = triton-repository when Triton's URL and repository are
    set, else pointer); InvalidArgument ``INVALID_ROLLOUT`` for another value."""
    mode = str(settings.rollout or "")
    if not mode:
        return "triton-repository" if settings.triton_url and settings.triton_model_repository else "pointer"
    if mode not in ROLLOUTS:
        raise InvalidArgument(
            "INVALID_ROLLOUT", f"rollout must be one of {ROLLOUTS}", domain=DOMAIN, metadata={"rollout": mode[:50]}
        )
    return mode


def build_rollout(settings: Any, peers_factory: Callable[[], Peers] | None) -> Rollout:
    """One `Rollout` per mode (`rollout_mode`): "pointer" (versions/CURRENT only, `run_round`
    wrote it), "segmentation" (the embedded stack: segmentation's ActivateEnsembleVersion
    binds the version into its running PyTriton), "triton-repository" (cluster: the Triton
    repository load, then the same activation when segmentation is reachable, ``peers_factory``)."""
    mode = rollout_mode(settings)

    def activate(version: EnsembleVersion) -> str:
        assert peers_factory is not None
        peers = peers_factory()
        try:
            return SegmentationRollout(peers)(version)
        finally:
            close = getattr(peers, "close", None)
            if close is not None:
                close()

    if mode == "segmentation":
        if peers_factory is None:
            raise InvalidArgument(
                "INVALID_ROLLOUT",
                "rollout=segmentation needs SEGMENTATION_TARGET and RANKING_TARGET",
                domain=DOMAIN,
                metadata={"rollout": mode},
            )
        return activate
    if mode == "triton-repository":
        repo = from_settings(settings)
        if repo is None:
            raise InvalidArgument(
                "INVALID_ROLLOUT",
                "rollout=triton-repository needs TRITON_URL and TRITON_MODEL_REPOSITORY",
                domain=DOMAIN,
                metadata={"rollout": mode},
            )
        if peers_factory is None:
            return repo

        def load_then_activate(version: EnsembleVersion) -> str:
            return f"{repo(version)}; {activate(version)}"

        return load_then_activate

    def pointer(version: EnsembleVersion) -> str:
        return "pointer"

    return pointer
