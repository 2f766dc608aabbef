"""The chart's monitoring objects (issue 17, observability): the Grafana dashboard ConfigMap
(sidecar label) and the PrometheusRule alerts. Rendered with helm, the ConfigMap validated
against the Kubernetes schema (strict), the rules checked by `promtool check rules`, and every
metric name in the dashboard's and the rules' PromQL checked against the names the services'
registries really export (plus Prometheus' own `up`). Every alert's runbook_url points to a
section of docs/runbooks.md. No cluster, Prometheus or Grafana here: nothing is applied.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry
from test_chart import CHART, KUBE_VERSION, NAMESPACE, RELEASE, by_kind, render

from atlasflow.common.metrics import Metrics
from atlasflow.gateway.api import REVIEW_SECONDS
from atlasflow.labels.servicer import review_seconds_histogram

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "docs" / "runbooks.md"
DASHBOARD = CHART / "dashboards" / "atlasflow.json"
ON = ("--set", "metrics.dashboards.enabled=true", "--set", "metrics.prometheusRule.enabled=true")
#: series Prometheus makes itself (not exported by a service)
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def exported_names() -> set[str]:
    """Sample names a scrape of the services can show: every family of a service's `Metrics`
    registry (its scrape-time gauges described even without readings), the labels service's
    review histogram and the gateway's."""
    registry = Metrics("any").registry
    review_seconds_histogram(registry)
    families = list(registry.collect())
    gateway = CollectorRegistry()
    gateway.register(REVIEW_SECONDS)
    families += list(gateway.collect())
    names = {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}
    assert "atlasflow_queue_depth" in names and "atlasflow_stage_duration_seconds_bucket" in names
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers before a selector's ``{`` or a range's
    ``[`` and any bare ``atlasflow_`` identifier (label values in quotes are left out)."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    selected = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", bare))
    ours = set(re.findall(r"\b(atlasflow_[a-zA-Z0-9_:]*)", bare))
    return (selected | ours) - _PROMQL_WORDS


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render(*ON)


@pytest.fixture(scope="module")
def rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
    rules = by_kind(docs, "PrometheusRule")
    assert list(rules) == [f"{RELEASE}-atlasflow"]
    return next(iter(rules.values()))


@pytest.fixture(scope="module")
def alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_off_by_default() -> None:
    docs = render()
    assert not by_kind(docs, "PrometheusRule")
    assert not [d for d in by_kind(docs, "ConfigMap").values() if "grafana_dashboard" in d["metadata"]["labels"]]


def test_dashboard_configmap_is_labelled_for_the_sidecar_and_valid(docs: list[dict[str, Any]]) -> None:
    cms = [d for d in by_kind(docs, "ConfigMap").values() if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(cms) == 1
    cm = cms[0]
    assert cm["metadata"]["namespace"] == NAMESPACE
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    shipped = json.loads(cm["data"]["atlasflow.json"])
    assert shipped == json.loads(DASHBOARD.read_text())
    assert shipped["uid"] == "atlasflow-overview" and shipped["panels"]


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = used - exported_names() - PROMETHEUS_OWN
    assert not unknown, f"the dashboard queries metrics no service exports: {sorted(unknown)}"
    # the panels the SREs need are there
    for name in (
        "atlasflow_queue_depth",
        "atlasflow_lease_oldest_age_seconds",
        "atlasflow_leases_expired",
        "atlasflow_outbox_lag_seconds",
        "atlasflow_stage_duration_seconds_bucket",
        "atlasflow_disk_free_bytes",
        "atlasflow_triton_up",
        "atlasflow_rpc_requests_total",
        "atlasflow_rpc_duration_seconds_bucket",
    ):
        assert name in used, name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_rules_use_only_exported_metrics(alerts: list[dict[str, Any]]) -> None:
    exported = exported_names()
    for a in alerts:
        unknown = metric_names(a["expr"]) - exported - PROMETHEUS_OWN
        assert not unknown, f"{a['alert']} queries metrics no service exports: {sorted(unknown)}"
        assert f'namespace="{NAMESPACE}"' in a["expr"], a["alert"]


def test_metric_name_check_can_fail() -> None:
    assert metric_names('max by (queue) (atlasflow_queue_dept{namespace="x",queue=~"a|b"})') == {"atlasflow_queue_dept"}
    assert "atlasflow_queue_dept" not in exported_names()


def test_required_alerts_with_runbooks(alerts: list[dict[str, Any]]) -> None:
    names = {a["alert"] for a in alerts}
    assert {
        "AtlasflowOutboxStuck",
        "AtlasflowLeaseExpiryStorm",
        "AtlasflowTritonUnavailable",
        "AtlasflowDiskFloorNear",
        "AtlasflowQueueStalled",
        "AtlasflowServiceDown",
    } <= names
    down = [a for a in alerts if a["alert"] == "AtlasflowServiceDown"]
    assert sorted(a["labels"]["component"] for a in down) == ["ingest", "labels", "ranking", "segmentation"]
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical")
        url = a["annotations"]["runbook_url"]
        assert url.startswith("https://") and "/docs/runbooks.md#" in url
        assert url.split("#", 1)[1] in anchors, f"{a['alert']}: no section {url} in docs/runbooks.md"


def test_disk_alert_uses_the_floor_factor(alerts: list[dict[str, Any]]) -> None:
    (disk,) = [a for a in alerts if a["alert"] == "AtlasflowDiskFloorNear"]
    assert "1.5 * (atlasflow_disk_floor_bytes" in disk["expr"]
    (docs,) = [render(*ON, "--set", "metrics.prometheusRule.thresholds.diskFloorFactor=2")]
    (rule,) = by_kind(docs, "PrometheusRule").values()
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "AtlasflowDiskFloorNear"]
    assert "2 * (atlasflow_disk_floor_bytes" in exprs[0]


def test_promtool_checks_the_rules(rule: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: scripts/bootstrap.sh --test installs Debian's prometheus package")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    # and it can fail: a broken expression is refused
    bad = json.loads(json.dumps(rule["spec"]["groups"]))
    bad[0]["rules"][0]["expr"] = "max by (service (atlasflow_outbox_lag_seconds"
    path.write_text(yaml.safe_dump({"groups": bad}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_servicemonitor_keeps_the_services_label() -> None:
    (sm,) = by_kind(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor").values()
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
