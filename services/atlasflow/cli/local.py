"""Local deployment on the embedded defaults: every service and Triton as a child process.

State lives in one directory (default `.atlasflow/`): `data/<service>/` (SQLite), `blobs/`
(content-addressed blob store shared by the services), `logs/<process>.log` (JSON lines),
`run/processes.json` (pids) and `run/endpoints.json` (addresses), `auth/` (the stack's own token
issuer: `signing-key.pem` 0600, `jwks.json`, each service's own token `<service>.token`), `tls/` (the stack's
own CA, `atlasflow.common.tls.LocalCA`: every gRPC listener is TLS with client certificates
required (mTLS); `run/endpoints.json` names the CA and the command line's certificate under
"tls", and `LocalDeployment.channel` builds a ready channel from them). `up` returns when every
process reports healthy (grpc.health.v1 SERVING; Triton model READY); `down` sends SIGTERM in
reverse start order and waits, then SIGKILL after the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlasflow.common.auth import SERVICE_NAMES, LocalIssuer, TokenSource, service_subject
from atlasflow.common.clients import raw_channel, sync_channel
from atlasflow.common.ports import free_ports
from atlasflow.common.tls import ClientTLS, LocalCA
from atlasflow.common.users import USERS_FILE, create_demo_users

DEFAULT_PORTS = {
    "triton_http": 8000,
    "triton_grpc": 8001,
    "triton_metrics": 8002,
    "ingest": 50051,
    "segmentation": 50052,
    "ranking": 50053,
    "labels": 50054,
    "dicom": 11112,
    "ingest_metrics": 9101,
    "segmentation_metrics": 9102,
    "ranking_metrics": 9103,
    "labels_metrics": 9104,
    "training": 50055,
    "training_metrics": 9105,
    "gateway": 8443,
}
START_ORDER = ["triton", "labels", "ranking", "segmentation", "ingest", "training", "gateway"]
DEFAULT_ACCEPTED_AETS = ("STORESCU", "ATLASDEMO")
# Lifetime of the services' own token: re-minted at every `atlasflow up`.
SERVICE_TOKEN_TTL_S = 30 * 86400.0
# glibc malloc settings for the processes that run the models: without them every sliding-window
# step of an inference thread maps and unmaps its large buffers again (page faults and zeroing
# showed as ~100 % system CPU), and the ensemble took 10.0 s through Triton on the demo CT vs
# 6.0 s with them (same machine, same weights). One arena: PyTriton calls the pipeline on a
# handler thread, and a thread arena is an mmap'd heap that TOP_PAD/TRIM do not keep mapped;
# with MALLOC_ARENA_MAX=2 the Triton process still spent 1.3-1.5 s of system CPU per demo CT
# against 0.3 s in-process, with 1 it spends 0.2-0.4 s (same user CPU; measured per process
# from /proc during direct Triton calls). Explicit values in the environment win.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(512 * 1024 * 1024),
}


@dataclass
class LocalDeployment:
    state_dir: Path
    ports: dict[str, int]
    ensemble: str = "abdomen-trio-v1"
    quiet_period_s: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Calling AE titles the ingest SCP accepts (deny by default): dcmtk's storescu default
    # title (the README's storescu line) and the demo's sender.
    accepted_aets: tuple[str, ...] = DEFAULT_ACCEPTED_AETS
    # Exports are written only below this directory (default <state>/exports).
    export_root: Path | None = None

    @classmethod
    def create(
        cls,
        state_dir: Path,
        auto_ports: bool,
        *,
        ensemble: str = "abdomen-trio-v1",
        quiet_period_s: float = 5.0,
        extra_env: dict[str, str] | None = None,
        accepted_aets: tuple[str, ...] = DEFAULT_ACCEPTED_AETS,
        export_root: Path | None = None,
    ) -> LocalDeployment:
        ports = dict(DEFAULT_PORTS)
        if auto_ports:
            ports = dict(zip(DEFAULT_PORTS, free_ports(len(DEFAULT_PORTS)), strict=True))
        return cls(
            Path(state_dir).resolve(),
            ports,
            ensemble,
            quiet_period_s,
            dict(extra_env or {}),
            tuple(accepted_aets),
            Path(export_root).resolve() if export_root is not None else None,
        )

    @classmethod
    def load(cls, state_dir: Path) -> LocalDeployment:
        run = Path(state_dir) / "run"
        doc = json.loads((run / "endpoints.json").read_text())
        return cls(Path(state_dir).resolve(), doc["ports"], doc["ensemble"], doc["quiet_period_s"])

    # ------------------------------------------------------------------ identities
    @property
    def auth_dir(self) -> Path:
        return self.state_dir / "auth"

    def issuer(self) -> LocalIssuer:
        """The stack's token issuer (created on first use; its key never leaves ``auth/``)."""
        return LocalIssuer.create_or_load(self.auth_dir)

    def mint(self, role: str, subject: str, ttl_s: float = 3600.0) -> str:
        """A token this stack accepts (``atlasflow token``)."""
        return self.issuer().mint(subject, [role], ttl_s=ttl_s)

    def token_source(self, role: str, subject: str, ttl_s: float = 3600.0) -> TokenSource:
        return TokenSource(token=self.mint(role, subject, ttl_s))

    # ------------------------------------------------------------------ TLS
    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    def ca(self) -> LocalCA:
        """The stack's CA (created on first use; reused, and its certificates, while valid)."""
        return LocalCA.create_or_load(self.tls_dir)

    def client_tls(self) -> ClientTLS:
        """TLS of a client of this stack: the stack's CA and the command line's certificate
        (``tls/cli.pem``; mTLS: the services refuse a client without one)."""
        issued = self.ca().issue("cli", server=False)
        return ClientTLS(ca_file=str(self.ca().ca_file), cert_file=str(issued.cert_file), key_file=str(issued.key_file))

    def channel(self, service: str, token: TokenSource | None = None) -> grpc.Channel:
        """A ready channel to ``service`` (TLS with the command line's certificate, tracing,
        retries; ``token``: the caller's, default ``ATLASFLOW_TOKEN_FILE``)."""
        return sync_channel(self.target(service), token=token, tls=self.client_tls())

    def bare_channel(self, service: str) -> grpc.Channel:
        """A TLS channel to ``service`` with nothing else (no token: the caller sets each
        call's metadata)."""
        return raw_channel(self.target(service), self.client_tls())

    def _tls_env(self, name: str) -> dict[str, str]:
        """TLS settings of a service process: its certificate (server and client use), client
        certificates required (mTLS), the stack's CA for its own calls."""
        issued = self.ca().issue(name)
        ca = str(self.ca().ca_file)
        return {
            "TLS_CERT_FILE": str(issued.cert_file),
            "TLS_KEY_FILE": str(issued.key_file),
            "TLS_CLIENT_CA_FILE": ca,
            "TLS_CA_FILE": ca,
        }

    def service_token_file(self, name: str) -> Path:
        """``auth/<name>.token``: the token service ``name`` calls the others with."""
        return self.auth_dir / f"{name}.token"

    def _service_tokens(self) -> dict[str, Path]:
        """One token per service (role ``service``, subject ``svc:<name>``: which hand-offs it
        may call is `atlasflow.common.policy.HANDOFF_CALLERS`), minted at every start, 0600."""
        paths = {}
        for name in SERVICE_NAMES:
            path = self.service_token_file(name)
            token = self.mint("service", service_subject(name), ttl_s=SERVICE_TOKEN_TTL_S)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            paths[name] = path
        # the shared token of earlier versions must not outlive them
        (self.auth_dir / "service.token").unlink(missing_ok=True)
        return paths

    # ------------------------------------------------------------------ addresses
    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    @property
    def blob_dir(self) -> Path:
        return self.state_dir / "blobs"

    def endpoints(self) -> dict[str, str]:
        return {
            "ingest_grpc": self.target("ingest"),
            "ingest_dicom": self.target("dicom"),
            "segmentation_grpc": self.target("segmentation"),
            "ranking_grpc": self.target("ranking"),
            "labels_grpc": self.target("labels"),
            "training_grpc": self.target("training"),
            "triton_grpc": self.target("triton_grpc"),
            "triton_http": self.target("triton_http"),
            # the web gateway: review API (/api/v1), DICOMweb (/dicomweb), login (/login)
            "gateway_http": self.gateway_url(),
        }

    def gateway_url(self) -> str:
        """Base URL of the web gateway (https with the stack's CA; docs/gateway.md)."""
        return f"https://127.0.0.1:{self.ports.get('gateway', DEFAULT_PORTS['gateway'])}"

    # ------------------------------------------------------------------ processes
    def _env(self, name: str) -> dict[str, str]:
        env = {**MALLOC_ENV, **os.environ, **self.extra_env}
        env["OTEL_SERVICE_NAME"] = f"atlasflow-{name}"
        # Triton's Python-backend stub links against the system libpython (DESIGN.md).
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        p = self.ports
        common = {
            "DATA_DIR": str(self.state_dir / "data" / name),
            "BLOB_DIR": str(self.blob_dir),
            # every RPC needs a token of this stack's issuer; each service calls the others with
            # its own token, auth/<service>.token (files, never values on a command line)
            "AUTH_JWKS": str(self.auth_dir / LocalIssuer.JWKS_FILE),
            "AUTH_ISSUER": self.issuer().issuer,
            "TOKEN_FILE": str(self.service_token_file(name)),
            # every gRPC listener TLS + mTLS (Triton stays plaintext on loopback: docs/security.md)
            **(self._tls_env(name) if name != "triton" else {}),
        }
        specific: dict[str, dict[str, object]] = {
            "ingest": {
                "GRPC_PORT": p["ingest"],
                "DICOM_PORT": p["dicom"],
                "METRICS_PORT": p["ingest_metrics"],
                "QUIET_PERIOD_S": self.quiet_period_s,
                "ACCEPTED_CALLING_AETS": ",".join(self.accepted_aets),
                "SEGMENTATION_TARGET": self.target("segmentation"),
                # DeleteStudy's PurgeStudy hand-offs
                "LABELS_TARGET": self.target("labels"),
                "RANKING_TARGET": self.target("ranking"),
            },
            "segmentation": {
                "GRPC_PORT": p["segmentation"],
                "METRICS_PORT": p["segmentation_metrics"],
                "TRITON_URL": self.target("triton_grpc"),
                "ENSEMBLE": self.ensemble,
                "LABELS_TARGET": self.target("labels"),
                "RANKING_TARGET": self.target("ranking"),
                # promoted versions (training's state): ActivateEnsembleVersion loads them
                "VERSIONS_DIR": str(self.state_dir / "models" / "versions"),
            },
            "ranking": {"GRPC_PORT": p["ranking"], "METRICS_PORT": p["ranking_metrics"]},
            "labels": {
                "GRPC_PORT": p["labels"],
                "METRICS_PORT": p["labels_metrics"],
                "INGEST_TARGET": self.target("ingest"),
                "RANKING_TARGET": self.target("ranking"),
                # an export writes nowhere else (an admin's destination_uri included)
                "EXPORT_DIR": str(self.export_root or self.state_dir / "exports"),
            },
            "training": {
                "GRPC_PORT": p["training"],
                "METRICS_PORT": p["training_metrics"],
                # decisions are read from labels as svc:training; versions/CURRENT lives here
                "LABELS_TARGET": self.target("labels"),
                "STATE_DIR": str(self.state_dir / "models"),
                # a promoted version is activated in segmentation (its PyTriton binds it, no
                # restart) and the undecided cases are re-inferred in worklist order
                "ROLLOUT": "segmentation",
                "SEGMENTATION_TARGET": self.target("segmentation"),
                "RANKING_TARGET": self.target("ranking"),
            },
            "gateway": {
                "HTTP_PORT": self.ports.get("gateway", DEFAULT_PORTS["gateway"]),
                "INGEST_TARGET": self.target("ingest"),
                "SEGMENTATION_TARGET": self.target("segmentation"),
                "RANKING_TARGET": self.target("ranking"),
                "LABELS_TARGET": self.target("labels"),
                # login of the demo users: sessions are tokens of this stack's issuer
                "LOCAL_ISSUER_DIR": str(self.auth_dir),
                "USERS_FILE": str(self.auth_dir / USERS_FILE),
                # the gateway calls as the logged-in user, never with the services' token
                "TOKEN_FILE": "",
            },
        }
        if name in specific:
            prefix = f"ATLASFLOW_{name.upper()}_"
            for k, v in {**common, **specific[name]}.items():
                env[prefix + k] = str(v)
        return env

    def _command(self, name: str) -> list[str]:
        if name == "triton":
            return [
                sys.executable,
                "-m",
                "atlasflow.segmentation.triton_server",
                "--ensemble",
                self.ensemble,
                "--grpc-port",
                str(self.ports["triton_grpc"]),
                "--http-port",
                str(self.ports["triton_http"]),
                "--metrics-port",
                str(self.ports["triton_metrics"]),
                # promoted ensemble versions it may bind while running (ActivateEnsembleVersion)
                "--versions-dir",
                str(self.state_dir / "models" / "versions"),
                *self._imported_members(),
            ]
        return [sys.executable, "-m", "atlasflow.cli.main", "serve", name]

    def _imported_members(self) -> list[str]:
        """``--member NAME --state-dir DIR`` for Triton when segmentation's environment adds
        imported models to the ensemble (IMPORTED_MODELS / MODELS_STATE_DIR, docs/models.md)."""
        env = {**os.environ, **self.extra_env}
        # the service itself checks the names (atlasflow.segmentation.imported.parse_names)
        names = [n.strip() for n in env.get("ATLASFLOW_SEGMENTATION_IMPORTED_MODELS", "").split(",") if n.strip()]
        if not names:
            return []
        state = env.get("ATLASFLOW_SEGMENTATION_MODELS_STATE_DIR", "")
        return [*(f"--member={n}" for n in names), f"--state-dir={state}"]

    def start(self, names: list[str] | None = None) -> dict[str, int]:
        run = self.state_dir / "run"
        logs = self.state_dir / "logs"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # patient data, audit trail and keys below: the stack's user only
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls = self.client_tls()
        (run / "endpoints.json").write_text(
            json.dumps(
                {
                    "ports": self.ports,
                    "ensemble": self.ensemble,
                    "quiet_period_s": self.quiet_period_s,
                    "endpoints": self.endpoints(),
                    # what a client of this stack needs for TLS (`client_tls`)
                    "tls": {
                        "ca_file": tls.ca_file,
                        "cert_file": tls.cert_file,
                        "key_file": tls.key_file,
                    },
                },
                indent=2,
            )
        )
        self._service_tokens()
        create_demo_users(self.auth_dir)  # the gateway's demo logins (auth/demo-passwords.txt, 0600)
        (run / "triton.token").unlink(missing_ok=True)  # Triton has no access token any more
        pids = self.pids()
        for name in names or START_ORDER:
            if name in pids and _alive(pids[name]):
                continue
            log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            proc = subprocess.Popen(
                self._command(name),
                env=self._env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.state_dir,
                umask=0o077,  # databases, logs, spool, blobs: the stack's user only
            )
            pids[name] = proc.pid
            (run / "processes.json").write_text(json.dumps(pids, indent=2))
        return pids

    def pids(self) -> dict[str, int]:
        f = self.state_dir / "run" / "processes.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def wait_healthy(self, timeout_s: float = 300.0, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names or START_ORDER:
            while not self.healthy(name):
                pid = self.pids().get(name)
                if pid is None or not _alive(pid):
                    raise RuntimeError(
                        f"{name} exited during start-up; see {self.state_dir / 'logs' / (name + '.log')}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name} not healthy after {timeout_s:.0f} s; see {self.state_dir / 'logs' / (name + '.log')}"
                    )
                time.sleep(0.5)

    def healthy(self, name: str) -> bool:
        if name == "triton":
            return self._triton_ready()
        if name == "gateway":
            return self._gateway_ready()
        try:
            with self.bare_channel(name) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _gateway_ready(self) -> bool:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca().ca_file))
            with urllib.request.urlopen(self.gateway_url() + "/healthz", timeout=1.0, context=ctx) as resp:  # noqa: S310 - our own https URL
                return bool(resp.status == 200)
        except OSError:
            return False

    def _triton_ready(self) -> bool:
        """Triton is ready when it answers, reports at least one loaded model and every one of
        them is READY: the launcher needs no knowledge of how an ensemble version maps to a
        Triton model name. The models come from the statistics protocol (PyTriton loads its
        models through the load API, so the repository index stays empty); the local Triton
        restricts no protocol (loopback only, no access token: docs/security.md)."""
        import tritonclient.grpc as tgrpc

        try:
            client = tgrpc.InferenceServerClient(self.target("triton_grpc"))
            if not client.is_server_ready(client_timeout=1.0):
                return False
            stats = client.get_inference_statistics(as_json=True, client_timeout=1.0)
            names = [str(m["name"]) for m in stats.get("model_stats", [])]
            return bool(names) and all(bool(client.is_model_ready(n, client_timeout=1.0)) for n in names)
        except Exception:  # noqa: BLE001 - not up yet (connection refused, deadline, starting)
            return False

    def stop(self, grace_s: float = 20.0, names: list[str] | None = None) -> None:
        pids = self.pids()
        order = [n for n in reversed(START_ORDER) if n in pids and (names is None or n in names)]
        for name in order:
            _signal(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in order:
            while _alive(pids[name]) and time.monotonic() < deadline:
                time.sleep(0.1)
            # Also reaps what the process left in its group (e.g. tritonserver under PyTriton).
            _signal(pids[name], signal.SIGKILL, group=True)
            pids.pop(name)
        f = self.state_dir / "run" / "processes.json"
        if f.exists():
            f.write_text(json.dumps(pids, indent=2))

    def kill(self, name: str) -> None:
        """SIGKILL one process (crash tests)."""
        pids = self.pids()
        _signal(pids[name], signal.SIGKILL, group=True)
        while _alive(pids[name]):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie that is not our child still answers kill(0): check /proc
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
