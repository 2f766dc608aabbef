"""The chart's Triton pod serves the model repository that `atlasflow triton-repo` writes.

- The model-repository initContainer's command is parsed by the real CLI (`atlasflow.cli.main`
  -> `atlasflow.segmentation.triton_repo.main`), not compared as a string.
- The repository volume is the same in both containers and Triton's arguments point at it.
- The exact initContainer command runs here (`<venv>/bin/atlasflow triton-repo ...`), and the
  exact Triton arguments of the chart start the stock `tritonserver` binary bundled in the
  nvidia-pytriton wheel on that output: the probe paths answer 200, the restricted APIs refuse
  requests without the access token, and an empty repository fails the start.
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
import urllib.error
import urllib.request
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
TOKEN_VAR = "TRITON_ACCESS_TOKEN"


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


def http(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=b"{}" if method == "POST" else None, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


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


def test_restricted_apis_need_the_token_from_a_secret(docs: list[dict[str, Any]]) -> None:
    triton = main_container(deployment(docs, "triton"))
    env = {e["name"]: e for e in triton["env"]}
    ref = env[TOKEN_VAR]["valueFrom"]["secretKeyRef"]
    secret = by_kind(docs, "Secret")[ref["name"]]
    assert len(secret["data"][ref["key"]]) >= 40
    for flag in ("grpc-restricted-protocol", "http-restricted-api"):
        (value,) = arg_value(triton["args"], flag)
        apis, _, header = value.partition(":")
        assert {"model-repository", "shared-memory"} <= set(apis.split(","))
        assert "inference" not in apis and "health" not in apis  # segmentation and the probes
        assert header == f"triton-access-token=$({TOKEN_VAR})"
    # an existing Secret: referenced, none rendered
    other = render("--set", "triton.accessToken.existingSecret=mine", "--set", "triton.accessToken.secretKey=k")
    env = {e["name"]: e for e in main_container(deployment(other, "triton"))["env"]}
    assert env[TOKEN_VAR]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}
    assert not by_kind(other, "Secret")


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
    Triton container's exact args (ports and the mount path mapped to this machine, the token
    expanded as the kubelet does) on the stock tritonserver binary of the nvidia-pytriton wheel."""
    from atlasflow.common.ports import free_ports
    from atlasflow.testing.triton import bundled_server_command

    docs = render("--set", "triton.gpu=0")  # one ensemble: the segmentation service's
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
    token = "test-token-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    named = {p["name"]: p["containerPort"] for p in triton["ports"]}
    mapped = {
        f"--model-repository={path}": "--model-repository={repo}",
        **{f"--{n}-port={named[n]}": f"--{n}-port={ports[n]}" for n in ports},
    }
    assert set(mapped) <= set(triton["args"]), "the chart's Triton args changed shape"
    chart_args = [kubelet_expand(mapped.get(a, a), {TOKEN_VAR: token}) for a in triton["args"]]
    assert not [a for a in chart_args if "$(" in a]
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
    ready = triton["readinessProbe"]["httpGet"]["path"]
    live = triton["livenessProbe"]["httpGet"]["path"]
    assert triton["readinessProbe"]["httpGet"]["port"] == triton["livenessProbe"]["httpGet"]["port"] == "http"
    server = start(models)
    try:
        t0 = time.perf_counter()
        while True:
            assert server.poll() is None, (tmp_path / "triton-models.log").read_text()[-3000:]
            try:
                if http(ports["http"], ready)[0] == 200:
                    break
            except OSError:
                pass
            assert time.perf_counter() - t0 < 180, "tritonserver not ready in 180 s"
            time.sleep(0.3)
        print(f"\ntritonserver ready with the chart's args in {time.perf_counter() - t0:.1f} s")
        assert http(ports["http"], live)[0] == 200
        for name in names:
            assert http(ports["http"], f"/v2/models/{name}/ready")[0] == 200
        # explicit mode's repository API: refused without the token, served with it
        status, body = http(ports["http"], "/v2/repository/index", "POST")
        assert status == 403 and b"triton-access-token" in body, (status, body)
        status, body = http(ports["http"], f"/v2/repository/models/{names[0]}/unload", "POST")
        assert status == 403, (status, body)
        status, body = http(ports["http"], "/v2/repository/index", "POST", {"triton-access-token": token})
        assert status == 200 and {m["name"]: m["state"] for m in json.loads(body)} == dict.fromkeys(names, "READY")
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
            m = re.fullmatch(r"([a-z0-9-]+):(\d+)", value)
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
