"""The chart's Triton pod serves the model repository that `atlasflow triton-repo` writes.

- The model-repository initContainer's command is parsed by the real CLI (`atlasflow.cli.main`
  -> `atlasflow.segmentation.triton_repo.main`), not compared as a string.
- The repository volume is the same in both containers and Triton's arguments point at it.
- The exact initContainer command runs here (`<venv>/bin/atlasflow triton-repo ...`), and the
  exact Triton arguments of the chart (tls.enabled: mutual TLS with certificate files) start the
  stock `tritonserver` binary bundled in the nvidia-pytriton wheel on that output: the chart's
  exec probes succeed against its loopback HTTP, a client with a certificate of the release's
  CA is served over gRPC, one without is refused in the handshake, and an empty repository
  fails the start.
- No container of any workload carries a secret on its command line (issue 13): no secret-like
  ``name=value`` and no ``$(VAR)`` of a Secret-backed variable in command or args.
- One NetworkPolicy per component admits exactly the calls the rendered configuration makes
  (derived from the *_TARGET / TRITON_URL settings); the optional ServiceMonitor selects every
  metrics port. kubernetes-validate has no schema for ServiceMonitor (a CRD): it is checked
  structurally here and skipped by the schema test in test_chart.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_chart import (
    AUTH_ARGS,
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    by_kind,
    deployment,
    helm,
    literal_env,
    main_container,
    mount_path,
    render,
    volume,
)

from atlasflow.segmentation.ensemble import load_ensemble, triton_model_name

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
COMPONENTS = ("ingest", "segmentation", "ranking", "labels", "triton")
#: cert-manager certificates for every component (tls.enabled): Triton gets mutual TLS
TLS_SETS = (
    "--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true",
    "--set", "tls.certManager.issuerRef.name=atlasflow-ca",
)  # fmt: skip
#: a secret-looking assignment in an argument (a path after "=" is a file name, not a secret)
SECRETISH = re.compile(r"(?i)(token|password|passwd|secret|credential|api[-_]?key)[^=\s]*=(?!/)")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


# ----------------------------------------------------------------------------- helpers


def init_container(dep: dict[str, Any]) -> dict[str, Any]:
    (init,) = [c for c in dep["spec"]["template"]["spec"].get("initContainers", []) if c["name"] == "model-repository"]
    return init


def arg_value(args: list[str], flag: str) -> list[str]:
    """Values of every ``--flag=value`` in ``args``."""
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}=")]


def parse_init_command(command: list[str], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run ``command`` (minus the program name) through the real `atlasflow` entry point with
    `write_repository` replaced by a recorder; returns one call per ensemble."""
    from importlib.metadata import entry_points

    import atlasflow.segmentation.triton_repo as triton_repo
    from atlasflow.cli.main import main as cli_main

    # command[0] is the console script whose entry point is atlasflow.cli.main:main
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == command[0]]
    assert ep.value == "atlasflow.cli.main:main"
    calls: list[dict[str, Any]] = []

    def record(out_dir: Any, ensemble: Any = "abdomen-trio-v1", **kw: Any) -> Path:
        calls.append({"out_dir": Path(out_dir), "ensemble": ensemble, **kw})
        return Path(out_dir) / triton_model_name(str(ensemble))

    monkeypatch.setattr(triton_repo, "write_repository", record)
    assert cli_main(list(command[1:])) == 0
    return calls


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args ($$ escapes, unknown names stay)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        arg,
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def cpu_docs() -> list[dict[str, Any]]:
    """CPU Triton, two ensembles served, two instances each."""
    return render(
        "--set",
        "triton.gpu=0",
        "--set",
        "triton.modelRepository.instances=2",
        "--set",
        "triton.modelRepository.ensembles={abdomen-trio-v1,abdomen-trio-v2.1}",
    )


# ----------------------------------------------------------------------------- initContainer


def test_init_command_is_accepted_by_the_cli(
    docs: list[dict[str, Any]], cpu_docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = deployment(docs, "triton")
    init = init_container(dep)
    path = mount_path(init, "models")
    (call,) = parse_init_command(init["command"], monkeypatch)
    assert call["out_dir"] == Path(path) == Path(VALUES["triton"]["modelRepository"]["path"])
    # the ensemble the segmentation service asks for
    assert (
        call["ensemble"]
        == literal_env(main_container(deployment(docs, "segmentation")))["ATLASFLOW_SEGMENTATION_ENSEMBLE"]
    )
    assert call["kind"] == "gpu" and call["instances"] == 1 and call["gpus"] == []

    calls = parse_init_command(init_container(deployment(cpu_docs, "triton"))["command"], monkeypatch)
    assert [c["ensemble"] for c in calls] == ["abdomen-trio-v1", "abdomen-trio-v2.1"]
    assert {c["kind"] for c in calls} == {"cpu"} and {c["instances"] for c in calls} == {2}

    # the parse can fail: the brief's `--out DIR` spelling is not what the CLI accepts
    with pytest.raises(SystemExit):
        parse_init_command(["atlasflow", "triton-repo", "--out", path], monkeypatch)


def test_repository_volume_shared_and_triton_args_point_at_it(
    docs: list[dict[str, Any]], cpu_docs: list[dict[str, Any]]
) -> None:
    for rendered in (docs, cpu_docs):
        dep = deployment(rendered, "triton")
        init, triton = init_container(dep), main_container(dep)
        path = mount_path(init, "models")
        assert mount_path(triton, "models") == path
        assert arg_value(triton["args"], "model-repository") == [path]
        assert path in init["command"]
        mounts = {m["name"]: m for m in triton["volumeMounts"]}
        assert mounts["models"].get("readOnly") is True  # Triton never writes its repository
        assert not {m["name"]: m for m in init["volumeMounts"]}["models"].get("readOnly", False)
        assert "emptyDir" in volume(dep, "models")  # default: filled at every pod start
        # explicit model control loads exactly the ensembles the initContainer wrote
        ensembles = [init["command"][i + 1] for i, a in enumerate(init["command"]) if a == "--ensemble"]
        assert arg_value(triton["args"], "model-control-mode") == ["explicit"]
        assert arg_value(triton["args"], "load-model") == [triton_model_name(e) for e in ensembles]
        seg = literal_env(main_container(deployment(rendered, "segmentation")))["ATLASFLOW_SEGMENTATION_ENSEMBLE"]
        assert seg in ensembles


def test_gpu_resources_and_instance_kind_follow_values(
    docs: list[dict[str, Any]], cpu_docs: list[dict[str, Any]]
) -> None:
    gpu = deployment(docs, "triton")
    assert main_container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == VALUES["triton"]["gpu"] == 1
    two = deployment(render("--set", "triton.gpu=2"), "triton")
    assert main_container(two)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert init_container(two)["command"][-4:-2] == ["--kind", "gpu"]
    cpu = deployment(cpu_docs, "triton")
    assert "nvidia.com/gpu" not in main_container(cpu)["resources"]["limits"]
    assert init_container(cpu)["command"][-4:-2] == ["--kind", "cpu"]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def test_no_secret_on_any_command_line(docs: list[dict[str, Any]]) -> None:
    """Issue 13: every container of every workload, with TLS off (default) and on: no argument
    looks like ``token=...``/``password=...``, and a ``$(VAR)`` in command or args names only a
    literal or downward-API variable, never one from a Secret (secretKeyRef / envFrom)."""
    checked = 0
    for rendered in (docs, render(*TLS_SETS)):
        for doc in (d for d in rendered if d["kind"] in WORKLOADS):
            spec = _pod_spec(doc)
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                plain = {e["name"] for e in c.get("env", []) if "value" in e or "fieldRef" in e.get("valueFrom", {})}
                for arg in [*c.get("command", []), *c.get("args", [])]:
                    refs = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg))
                    assert refs <= plain, (doc["metadata"]["name"], c["name"], arg)
                    assert not SECRETISH.search(arg), (doc["metadata"]["name"], c["name"], arg)
                    checked += 1
    assert checked > 20
    # the rule can fail: the removed token's argument
    assert SECRETISH.search("--grpc-restricted-protocol=model-repository:triton-access-token=$(T)")
    triton = main_container(deployment(docs, "triton"))
    assert not [e for e in triton.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert not [a for a in triton["args"] if "restricted" in a]


def test_triton_mutual_tls_from_certificate_files_and_its_clients() -> None:
    plain = render()
    seg_env = literal_env(main_container(deployment(plain, "segmentation")))
    assert seg_env["ATLASFLOW_SEGMENTATION_TRITON_ALLOW_PLAINTEXT"] == "true"  # the release is plaintext
    assert not arg_value(main_container(deployment(plain, "triton"))["args"], "grpc-use-ssl")

    docs = render(*TLS_SETS)
    dep = deployment(docs, "triton")
    triton = main_container(dep)
    args = triton["args"]
    assert arg_value(args, "grpc-use-ssl") == arg_value(args, "grpc-use-ssl-mutual") == ["true"]
    tls_dir = mount_path(triton, "tls")
    assert arg_value(args, "grpc-server-cert") == [f"{tls_dir}/tls.crt"]
    assert arg_value(args, "grpc-server-key") == [f"{tls_dir}/tls.key"]
    assert arg_value(args, "grpc-root-cert") == [f"{tls_dir}/ca.crt"]
    # HTTP on loopback only (exec probes), no HTTP port on the pod or the Service
    assert arg_value(args, "http-address") == ["127.0.0.1"]
    assert "http" not in [p["name"] for p in triton["ports"]]
    service = by_kind(docs, "Service")[dep["metadata"]["name"]]
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["exec"]["command"][:2] == ["python3", "-c"]
    # Triton's certificate: cert-manager, for its Service names
    secret = volume(dep, "tls")["secret"]["secretName"]
    cert = by_kind(docs, "Certificate")[dep["metadata"]["name"]]
    assert cert["spec"]["secretName"] == secret
    svc = dep["metadata"]["name"]
    assert svc in cert["spec"]["dnsNames"] and "server auth" in cert["spec"]["usages"]
    # segmentation: TLS with its own certificate (client auth) to the name in Triton's certificate
    seg = main_container(deployment(docs, "segmentation"))
    env = literal_env(seg)
    seg_dir = mount_path(seg, "tls")
    assert env["ATLASFLOW_SEGMENTATION_TRITON_URL"] == f"dns:///{svc}-headless.{NAMESPACE}.svc:8001"
    assert env["ATLASFLOW_SEGMENTATION_TRITON_TLS_SERVER_NAME"] == svc
    assert env["ATLASFLOW_SEGMENTATION_TRITON_TLS_CA_FILE"] == f"{seg_dir}/ca.crt"
    assert env["ATLASFLOW_SEGMENTATION_TRITON_TLS_CERT_FILE"] == f"{seg_dir}/tls.crt"
    assert env["ATLASFLOW_SEGMENTATION_TRITON_TLS_KEY_FILE"] == f"{seg_dir}/tls.key"
    assert "ATLASFLOW_SEGMENTATION_TRITON_ALLOW_PLAINTEXT" not in env
    from atlasflow.segmentation.settings import PREFIX, SegmentationSettings

    tls = SegmentationSettings.from_env(PREFIX, env).triton_tls()
    assert tls.enabled and tls.cert_file == f"{seg_dir}/tls.crt"
    # a Secret of one's own for Triton
    own = render(*TLS_SETS, "--set", "tls.secrets.triton=triton-cert")
    assert volume(deployment(own, "triton"), "tls")["secret"]["secretName"] == "triton-cert"


def test_persistence_modes() -> None:
    # pre-populated claim: no initContainer, the claim mounted read-only
    docs = render(
        "--set",
        "triton.modelRepository.populate=false",
        "--set",
        "triton.modelRepository.persistence.enabled=true",
        "--set",
        "triton.modelRepository.persistence.existingClaim=models-rox",
    )
    dep = deployment(docs, "triton")
    assert not dep["spec"]["template"]["spec"].get("initContainers")
    assert volume(dep, "models")["persistentVolumeClaim"]["claimName"] == "models-rox"
    assert mount_path(main_container(dep), "models") == "/models"
    # a PVC written at every start: one writer
    ok = render(
        "--set",
        "triton.modelRepository.persistence.enabled=true",
        "--set",
        "triton.modelRepository.persistence.accessModes={ReadWriteOnce}",
        "--set",
        "triton.strategy.type=Recreate",
        "--set",
        "triton.strategy.rollingUpdate=null",
    )
    dep = deployment(ok, "triton")
    claim = volume(dep, "models")["persistentVolumeClaim"]["claimName"]
    assert by_kind(ok, "PersistentVolumeClaim")[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mount_path(init_container(dep), "models") == mount_path(main_container(dep), "models")
    for bad, message in (
        (
            (
                "--set",
                "triton.modelRepository.persistence.enabled=true",
                "--set",
                "triton.modelRepository.persistence.accessModes={ReadWriteOnce}",
            ),
            "Recreate",
        ),
        (
            (
                "--set",
                "triton.modelRepository.persistence.enabled=true",
                "--set",
                "triton.replicas=1",
                "--set",
                "triton.strategy.type=Recreate",
                "--set",
                "triton.strategy.rollingUpdate=null",
            ),
            "ReadOnlyMany",
        ),
        (("--set", "triton.modelRepository.populate=false"), "pre-populated"),
        (("--set", "triton.modelRepository.ensembles={abdomen-trio-v2}"), "segmentation.ensemble"),
    ):
        proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *bad)
        assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr)


def test_init_command_runs_here_and_tritonserver_serves_it_with_the_chart_args(
    cpu_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The initContainer's exact command through this environment's `atlasflow` script, then the
    Triton container's exact args (ports, the repository and certificate mount paths mapped to
    this machine, metrics on loopback here) on the stock tritonserver binary of the
    nvidia-pytriton wheel, with certificates of a local CA in the Secret's layout."""
    from atlasflow.common.ports import free_ports
    from atlasflow.common.tls import ClientTLS, LocalCA
    from atlasflow.segmentation.triton_client import triton_grpc_client
    from atlasflow.testing.triton import bundled_server_command

    docs = render("--set", "triton.gpu=0", *TLS_SETS)  # one ensemble: the segmentation service's
    dep = deployment(docs, "triton")
    init, triton = init_container(dep), main_container(dep)
    path = mount_path(init, "models")
    models = tmp_path / "models"
    script = Path(sys.prefix) / "bin" / init["command"][0]
    assert script.is_file(), f"{script} missing: the atlasflow console script of this environment"
    assert init["command"].count(path) == 1
    cmd = [str(script)] + [str(models) if a == path else a for a in init["command"][1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr

    # the layout Triton expects: <model>/config.pbtxt + <model>/1/model.py, nothing else
    names = [
        triton_model_name(v)
        for v in [init["command"][i + 1] for i, a in enumerate(init["command"]) if a == "--ensemble"]
    ]
    assert sorted(p.name for p in models.iterdir()) == sorted(names) == sorted(arg_value(triton["args"], "load-model"))
    for name in names:
        config = (models / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and 'backend: "python"' in config and "kind: KIND_CPU" in config
        assert "import triton_python_backend_utils" in (models / name / "1" / "model.py").read_text()
        (rel,) = re.findall(r'string_value: "([^"]+)"', config)
        cfg = load_ensemble(models / name / "1" / rel)
        assert triton_model_name(cfg.version) == name
        for member in cfg.members:
            if member.checkpoint is not None:
                assert member.checkpoint.is_file() and models / name in member.checkpoint.parents
        manifest = json.loads((models / name / "1" / "MANIFEST.json").read_text())
        for f, meta in manifest["files"].items():
            assert hashlib.sha256((models / name / f).read_bytes()).hexdigest() == meta["sha256"], f

    # tritonserver with the chart's args
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
    base, env = bundled_server_command(
        models, tmp_path / "work", grpc_port=ports["grpc"], http_port=ports["http"], metrics_port=ports["metrics"]
    )
    # the tls Secret's files (tls.crt, tls.key, ca.crt) from a local CA; a client of each kind
    ca = LocalCA.create_or_load(tmp_path / "ca")
    server_cert, seg_cert = ca.issue("triton"), ca.issue("segmentation", server=False)
    secret_dir = tmp_path / "tls"
    secret_dir.mkdir()
    for name, src in (("tls.crt", server_cert.cert_file), ("tls.key", server_cert.key_file), ("ca.crt", ca.ca_file)):
        (secret_dir / name).write_bytes(Path(src).read_bytes())
    tls_dir = mount_path(triton, "tls")
    good = ClientTLS(ca_file=str(ca.ca_file), cert_file=str(seg_cert.cert_file), key_file=str(seg_cert.key_file))
    named = {p["name"]: p["containerPort"] for p in triton["ports"]}
    http_port = VALUES["triton"]["ports"]["http"]
    mapped = {
        f"--model-repository={path}": "--model-repository={repo}",
        f"--http-port={http_port}": f"--http-port={ports['http']}",
        "--metrics-address=0.0.0.0": "--metrics-address=127.0.0.1",  # this machine: loopback
        **{f"--{n}-port={named[n]}": f"--{n}-port={ports[n]}" for n in ("grpc", "metrics")},
    }
    assert set(mapped) <= set(triton["args"]), "the chart's Triton args changed shape"
    chart_args = [kubelet_expand(mapped.get(a, a), {}).replace(tls_dir + "/", f"{secret_dir}/") for a in triton["args"]]
    assert not [a for a in chart_args if "$(" in a]
    assert f"--grpc-root-cert={secret_dir}/ca.crt" in chart_args
    local = [
        a
        for a in base[1:]
        if a.startswith(("--backend-directory=", "--cache-directory=", "--grpc-address=", "--http-address="))
    ]

    def start(repo: Path) -> subprocess.Popen[bytes]:
        argv = [
            base[0],
            *local,
            *(a.format(repo=repo) if a.startswith("--model-repository=") else a for a in chart_args),
        ]
        log = (tmp_path / f"triton-{repo.name}.log").open("wb")
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    assert triton["command"] == ["tritonserver"] and Path(base[0]).name == "tritonserver"

    def probe(kind: str) -> int:
        """The chart's exec probe, its loopback port mapped, run by this interpreter."""
        command = triton[kind]["exec"]["command"]
        assert command[0] == "python3" and f"127.0.0.1:{http_port}/" in command[2]
        code = command[2].replace(f"127.0.0.1:{http_port}/", f"127.0.0.1:{ports['http']}/")
        return subprocess.run([sys.executable, *command[1:2], code], capture_output=True, timeout=30).returncode

    server = start(models)
    try:
        t0 = time.perf_counter()
        while probe("readinessProbe") != 0:
            assert server.poll() is None, (tmp_path / "triton-models.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < 180, "tritonserver not ready in 180 s"
            time.sleep(0.3)
        print(f"\ntritonserver ready with the chart's args in {time.perf_counter() - t0:.1f} s")
        assert probe("livenessProbe") == 0 and probe("startupProbe") == 0
        url = f"127.0.0.1:{ports['grpc']}"
        client = triton_grpc_client(url, good)
        try:  # a certificate of the release's CA: served, the repository API included
            assert all(client.is_model_ready(n, client_timeout=10.0) for n in names)
            index = {m.name: m.state for m in client.get_model_repository_index(client_timeout=10.0).models}
            assert index == dict.fromkeys(names, "READY")
        finally:
            client.close()
        from tritonclient.utils import InferenceServerException

        for tls in (ClientTLS(ca_file=str(ca.ca_file)), None):  # no client certificate; plaintext
            other = triton_grpc_client(url, tls)
            try:
                with pytest.raises(InferenceServerException):
                    other.is_server_live(client_timeout=10.0)
            finally:
                other.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0

    # no repository written (initContainer skipped or broken): the start fails, no Ready pod
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start(empty)
    try:
        rc = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert rc != 0
    assert "not found" in (tmp_path / "triton-empty.log").read_text()


# ----------------------------------------------------------------------------- imported members

#: two imported members from the registry on a PVC (segmentation.importedModels)
MEMBER_SETS = (
    "--set", "segmentation.importedModels={tiny,bundle}",
    "--set", "segmentation.modelsRegistry.existingClaim=models-registry",
)  # fmt: skip


def test_imported_members_are_wired_into_the_writer_triton_and_segmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    import atlasflow.segmentation.triton_repo as triton_repo

    docs = render(*MEMBER_SETS)
    dep, seg = deployment(docs, "triton"), main_container(deployment(docs, "segmentation"))
    for d in (dep, deployment(docs, "segmentation")):
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    init, triton = init_container(dep), main_container(dep)
    registry = VALUES["segmentation"]["modelsRegistry"]["path"]
    lists: list[tuple[Any, ...]] = []
    monkeypatch.setattr(triton_repo, "write_load_list", lambda *a: lists.append(a))
    (call,) = parse_init_command(init["command"], monkeypatch)  # the real CLI parses it
    assert call["members"] == ["tiny", "bundle"] and call["models_state_dir"] == registry
    load_list = f"{mount_path(init, 'models')}/.atlasflow-load-models"
    assert [(Path(a[0]), list(a[1]), list(a[2]), a[3]) for a in lists] == [
        (Path(load_list), [triton_model_name(VALUES["segmentation"]["ensemble"])], ["tiny", "bundle"], registry)
    ]
    # the registry: one PVC, read-only in the writer and in segmentation, not in Triton itself
    for c, d in ((init, dep), (seg, deployment(docs, "segmentation"))):
        (m,) = [m for m in c["volumeMounts"] if m["name"] == "models-registry"]
        assert m["mountPath"] == registry and m["readOnly"] is True
        assert volume(d, "models-registry")["persistentVolumeClaim"] == {
            "claimName": "models-registry",
            "readOnly": True,
        }
    assert "models-registry" not in {m["name"] for m in triton["volumeMounts"]}
    env = literal_env(seg)
    assert env["ATLASFLOW_SEGMENTATION_IMPORTED_MODELS"] == "tiny,bundle"
    assert env["ATLASFLOW_SEGMENTATION_MODELS_STATE_DIR"] == registry
    # Triton: the names carry digests, so the writer's list is loaded (a shell reads it)
    assert triton["command"][:2] == ["/bin/sh", "-c"] and triton["command"][3] == load_list
    assert arg_value(triton["args"], "load-model") == [] and arg_value(triton["args"], "model-control-mode") == [
        "explicit"
    ]
    # without members nothing of it
    plain = render()
    assert main_container(deployment(plain, "triton"))["command"] == ["tritonserver"]
    assert "ATLASFLOW_SEGMENTATION_IMPORTED_MODELS" not in literal_env(
        main_container(deployment(plain, "segmentation"))
    )
    with_subpath = render(*MEMBER_SETS, "--set", "segmentation.modelsRegistry.subPath=state")
    (m,) = [
        m for m in init_container(deployment(with_subpath, "triton"))["volumeMounts"] if m["name"] == "models-registry"
    ]
    assert m["subPath"] == "state"
    for bad, message in (
        (("--set", "segmentation.importedModels={tiny}"), "modelsRegistry.existingClaim"),
        ((*MEMBER_SETS, "--set", "segmentation.importedModels={tiny,tiny}"), "twice"),
        ((*MEMBER_SETS, "--set", "segmentation.importedModels={Tiny}"), "importedModels"),
    ):
        proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *AUTH_ARGS, *bad)
        assert proc.returncode != 0 and message in proc.stderr, (bad, proc.stderr)


def test_init_command_with_a_member_writes_what_triton_loads_and_segmentation_names(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The initContainer's exact command on a registry holding the session's tiny nnU-Net model
    (``tiny``), then the Triton container's exact command line through /bin/sh with
    ``tritonserver`` a recorder on PATH: the --load-model list is exactly the written models,
    the ensemble under the name the segmentation service computes from its env."""
    from tests.models import nnunet_fixture as fx

    from atlasflow.models.nnunet import import_nnunet
    from atlasflow.segmentation.imported import parse_names, resolve, served_model_name

    state = tmp_path / "registry"
    manifest = import_nnunet(fx.shared_model_folder(tmp_path_factory), "tiny", state)
    docs = render(
        "--set", "triton.gpu=0",
        "--set", "segmentation.importedModels={tiny}",
        "--set", "segmentation.modelsRegistry.existingClaim=models-registry",
    )  # fmt: skip
    dep = deployment(docs, "triton")
    init, triton = init_container(dep), main_container(dep)
    path, registry = mount_path(init, "models"), mount_path(init, "models-registry")
    models = tmp_path / "models"
    (models / "lost+found").mkdir(parents=True)  # a PVC's root: never loaded
    here = {path: str(models), registry: str(state)}
    script = Path(sys.prefix) / "bin" / init["command"][0]

    def mapped(a: str) -> str:
        for k, v in here.items():
            a = a.replace(k, v) if a == k or a.startswith(k + "/") or a.endswith("=" + k) else a
        return a

    proc = subprocess.run(
        [str(script), *map(mapped, init["command"][1:])], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    seg_env = literal_env(main_container(deployment(docs, "segmentation")))
    members = resolve(state, parse_names(seg_env["ATLASFLOW_SEGMENTATION_IMPORTED_MODELS"]))
    ensemble = served_model_name(triton_model_name(seg_env["ATLASFLOW_SEGMENTATION_ENSEMBLE"]), members)
    entry = f"tiny_{manifest.digest[:12]}"
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == sorted([ensemble, entry, "lost+found"])
    assert 'backend: "pytorch"' in (models / entry / "config.pbtxt").read_text()
    assert f'name: "{ensemble}"' in (models / ensemble / "config.pbtxt").read_text()

    # the Triton container's command line, tritonserver recording its argv
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "tritonserver"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    recorder.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_OUT": str(tmp_path / "argv")}
    command = [mapped(a) for a in triton["command"]]
    run = subprocess.run([*command, *map(mapped, triton["args"])], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert arg_value(argv, "load-model") == [ensemble, entry]
    assert argv[: len(triton["args"])] == [mapped(a) for a in triton["args"]]
    # no list (a pre-populated volume without one): the container fails, Triton never starts
    (models / ".atlasflow-load-models").unlink()
    (tmp_path / "argv").unlink()
    run = subprocess.run([*command, *triton["args"]], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no model list" in run.stderr and not (tmp_path / "argv").exists()


# ----------------------------------------------------------------------------- NetworkPolicy


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(policies: list[dict[str, Any]], src: dict[str, Any], dst_labels: dict[str, str], port: str) -> bool:
    """NetworkPolicy semantics (Ingress, same-namespace pods + namespaceSelector peers): is a
    connection from ``src`` ({labels, namespace, namespace_labels}) to the pod with
    ``dst_labels`` on the named container ``port`` allowed?"""
    selected = [p for p in policies if _selects(p["spec"]["podSelector"], dst_labels)]
    if not selected:
        return True
    for policy in selected:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            if not rule.get("from"):
                return True
            for peer in rule["from"]:
                if "ipBlock" in peer:
                    continue
                ns_ok = (
                    _selects(peer["namespaceSelector"], src["namespace_labels"])
                    if "namespaceSelector" in peer
                    else src["namespace"] == NAMESPACE
                )
                pod_ok = _selects(peer["podSelector"], src["labels"]) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def calls(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(caller, callee, port name) of every host:port setting in the rendered env."""
    services = by_kind(docs, "Service")
    out = set()
    for caller in COMPONENTS:
        for value in literal_env(main_container(deployment(docs, caller))).values():
            # host:port, or gRPC's dns:///<service>.<namespace>.svc:port (Triton's headless Service)
            m = re.fullmatch(rf"(?:dns:///)?([a-z0-9-]+)(?:\.{NAMESPACE}\.svc)?:(\d+)", value)
            if m and m.group(1) in services:
                svc = services[m.group(1)]
                (port,) = [p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == int(m.group(2))]
                out.add((caller, svc["spec"]["selector"]["app.kubernetes.io/component"], port))
    return out


def test_network_policies_admit_exactly_the_calls_the_release_makes() -> None:
    ui = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ui"}}}
    pacs = {"ipBlock": {"cidr": "10.20.0.0/16"}}
    docs = render("--set-json", f"networkPolicy.extraClients=[{json.dumps(ui)}]")
    policies = list(by_kind(docs, "NetworkPolicy").values())
    for doc in policies:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    edges = calls(docs)
    assert {
        ("ingest", "segmentation", "grpc"),
        ("segmentation", "ranking", "grpc"),
        ("segmentation", "labels", "grpc"),
        ("segmentation", "triton", "grpc"),
    } <= edges
    pods = {c: deployment(docs, c)["spec"]["template"]["metadata"]["labels"] for c in COMPONENTS}
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in policies) == sorted(COMPONENTS)
    in_release = {
        c: {"labels": pods[c], "namespace": NAMESPACE, "namespace_labels": {"kubernetes.io/metadata.name": NAMESPACE}}
        for c in COMPONENTS
    }
    outsider = {
        "labels": {"app": "viewer"},
        "namespace": "ui",
        "namespace_labels": {"kubernetes.io/metadata.name": "ui"},
    }
    stranger = {
        "labels": {"app": "x"},
        "namespace": "other",
        "namespace_labels": {"kubernetes.io/metadata.name": "other"},
    }
    for dst in COMPONENTS:
        for port in [p["name"] for p in main_container(deployment(docs, dst))["ports"]]:
            for src in COMPONENTS:
                if port in ("metrics", "dicom"):
                    continue
                assert admits(policies, in_release[src], pods[dst], port) == ((src, dst, port) in edges), (
                    src,
                    dst,
                    port,
                )
            # client-facing gRPC: the extraClients peers, never Triton; DICOM: anyone by default;
            # metrics: pods of any namespace (metricsFrom default)
            expected_outsider = (port == "grpc" and dst != "triton") or port in ("dicom", "metrics")
            assert admits(policies, outsider, pods[dst], port) == expected_outsider, (dst, port)
            assert admits(policies, stranger, pods[dst], port) == (port in ("dicom", "metrics")), (dst, port)
    # Triton's HTTP port: no pod at all (the kubelet's probes come from the node)
    assert not any(admits(policies, s, pods["triton"], "http") for s in (*in_release.values(), outsider, stranger))

    # DICOM limited to the PACS, metrics to the monitoring namespace; off entirely
    docs = render(
        "--set-json",
        f"networkPolicy.dicomFrom=[{json.dumps(pacs)}]",
        "--set-json",
        'networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
    )
    policies = list(by_kind(docs, "NetworkPolicy").values())
    assert not admits(policies, stranger, pods["ingest"], "dicom")
    assert not admits(policies, stranger, pods["triton"], "metrics")
    prom = {"labels": {}, "namespace": "monitoring", "namespace_labels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert all(admits(policies, prom, pods[c], "metrics") for c in COMPONENTS)
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without peers admits everyone"
    assert not by_kind(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_triton_admits_segmentation_and_training_only_and_reaches_only_dns_and_its_collector(
    docs: list[dict[str, Any]],
) -> None:
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = {c: deployment(docs, c)["spec"]["template"]["metadata"]["labels"] for c in COMPONENTS}
    training = {**pods["segmentation"], "app.kubernetes.io/component": "training"}
    for labels, admitted in ((pods["segmentation"], True), (training, True), (pods["ingest"], False)):
        src = {"labels": labels, "namespace": NAMESPACE, "namespace_labels": {}}
        assert admits(policies, src, pods["triton"], "grpc") is admitted, labels
    (policy,) = [p for p in policies if p["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = [(q["protocol"], q["port"]) for rule in policy["spec"]["egress"] for q in rule["ports"]]
    assert sorted(ports) == [("TCP", 53), ("UDP", 53)]
    assert all("to" not in rule for rule in policy["spec"]["egress"])
    traced = render("--set", "triton.tracing.enabled=true")
    (policy,) = [
        p
        for p in by_kind(traced, "NetworkPolicy").values()
        if p["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"
    ]
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    ports = [(q["protocol"], q["port"]) for rule in policy["spec"]["egress"] for q in rule["ports"]]
    assert ("TCP", 4318) in ports and len(ports) == 3  # the OTLP/HTTP collector of values.yaml
    # the other components' policies stay ingress-only (their egress is not restricted)
    assert all(
        p["spec"]["policyTypes"] == ["Ingress"] for p in by_kind(traced, "NetworkPolicy").values() if p is not policy
    )


# ----------------------------------------------------------------------------- ServiceMonitor


def test_service_monitor_optional_and_selects_every_metrics_port(docs: list[dict[str, Any]]) -> None:
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    on = render(
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "metrics.path=/prom",
    )
    (sm,) = [d for d in on if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    # a custom resource: no schema in kubernetes-validate (the reason test_chart skips CRD_KINDS)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(sm, KUBE_VERSION, strict=True)
    assert sm["metadata"]["labels"]["release"] == "prom"
    spec = sm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    def selected(labels: dict[str, str]) -> bool:
        sel = spec["selector"]
        ok = sel["matchLabels"].items() <= labels.items()
        for expr in sel.get("matchExpressions", []):
            assert expr["operator"] == "In"
            ok = ok and labels.get(expr["key"]) in expr["values"]
        return ok

    services = by_kind(on, "Service")
    scraped = {}
    for svc in services.values():
        if selected(svc["metadata"]["labels"]) and "metrics" in [p["name"] for p in svc["spec"]["ports"]]:
            component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
            paths = []
            for ep in spec["endpoints"]:
                assert ep["port"] == "metrics" and ep["interval"] and ep["scrapeTimeout"]
                keep = True
                for r in ep.get("relabelings", []):
                    assert r["sourceLabels"] == ["__meta_kubernetes_service_label_app_kubernetes_io_component"]
                    match = re.fullmatch(r["regex"], component) is not None
                    keep = keep and (match if r["action"] == "keep" else not match)
                if keep:
                    paths.append(ep["path"])
            scraped[component] = paths
    # every component's metrics port exactly once, on the path it serves
    assert scraped == {
        "ingest": ["/prom"],
        "segmentation": ["/prom"],
        "ranking": ["/prom"],
        "labels": ["/prom"],
        "triton": ["/metrics"],
    }


# ----------------------------------------------------------------------------- several replicas


@pytest.mark.parametrize("kube_version", ["1.35.0", "1.36.0", "1.37.0"])
def test_several_triton_replicas_behind_a_headless_service_the_clients_spread_over(kube_version: str) -> None:
    """Issue 17: Triton's headless Service (one address per ready pod, gRPC port only, the
    Deployment's selector) is what segmentation and training dial, as gRPC's dns:/// URI, for
    any replica count (an autoscaler may add pods); with TLS the clients check Triton's
    certificate against its Service name, which cert-manager's certificate carries along with the
    headless names. The product code parses the rendered values (round-robin target, roll-out
    fan-out name). Whether the pods are reached: tests/segmentation/test_seg_triton_spread.py."""
    from atlasflow.segmentation.settings import PREFIX, SegmentationSettings
    from atlasflow.segmentation.triton_client import spreads, target_name

    docs = render(*TLS_SETS, "--set", "triton.replicas=3")
    triton = deployment(docs, "triton")
    name = triton["metadata"]["name"]
    services = by_kind(docs, "Service")
    headless = services[f"{name}-headless"]
    kubernetes_validate.validate(headless, kube_version, strict=True)
    spec = headless["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
    assert spec["selector"] == services[name]["spec"]["selector"]
    assert set(spec["selector"].items()) <= set(triton["spec"]["template"]["metadata"]["labels"].items())
    assert [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] == [("grpc", 8001, "grpc")]
    assert services[name]["spec"]["type"] == "ClusterIP" and "clusterIP" not in services[name]["spec"]
    url = f"dns:///{name}-headless.{NAMESPACE}.svc:8001"
    env = literal_env(main_container(deployment(docs, "segmentation")))
    assert env["ATLASFLOW_SEGMENTATION_TRITON_URL"] == url
    settings = SegmentationSettings.from_env(PREFIX, env)
    assert spreads(settings.triton_url) and settings.triton_tls().server_name == name
    cert = by_kind(docs, "Certificate")[name]
    assert {name, target_name(url)} <= set(cert["spec"]["dnsNames"])
    # one replica: the same target (nothing to change when Triton scales); an own URL wins
    one = render()
    assert literal_env(main_container(deployment(one, "segmentation")))["ATLASFLOW_SEGMENTATION_TRITON_URL"] == url
    own = render("--set", "segmentation.tritonUrl=triton.gpu.svc:8001", "--set", "triton.enabled=false")
    assert not [s for s in by_kind(own, "Service") if "triton" in s]
