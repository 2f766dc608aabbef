"""Chart: the training service's Kubernetes access (templates/training/rbac.yaml): off by
default; with training.rbac.create a ServiceAccount, a namespaced Role limited to batch/v1 Jobs,
pods and pods/log, and the RoleBinding tying them, valid against the Kubernetes schema."""

from __future__ import annotations

import kubernetes_validate
from test_chart import KUBE_VERSION, NAMESPACE, by_kind, render


def test_off_by_default() -> None:
    docs = render()
    assert not [d for d in docs if d["metadata"]["name"].endswith("-training") or "-training-" in d["metadata"]["name"]]


def test_role_is_limited_to_jobs_and_pod_logs() -> None:
    docs = render("--set", "training.rbac.create=true")
    roles = {n: d for n, d in by_kind(docs, "Role").items() if "training" in n}
    bindings = {n: d for n, d in by_kind(docs, "RoleBinding").items() if "training" in n}
    accounts = {n: d for n, d in by_kind(docs, "ServiceAccount").items() if n.endswith("-training")}
    assert len(roles) == len(bindings) == len(accounts) == 1
    (role,) = roles.values()
    (binding,) = bindings.values()
    (account,) = accounts.values()
    assert role["metadata"]["namespace"] == NAMESPACE  # namespaced, never a ClusterRole
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {r for _, r, _ in granted} == {"jobs", "jobs/status", "pods", "pods/log"}
    assert ("batch", "jobs", "create") in granted and ("batch", "jobs", "delete") in granted
    assert ("", "pods/log", "get") in granted
    assert not {v for g, r, v in granted if r.startswith("pods")} & {"create", "delete", "update", "patch"}
    assert not [d for d in docs if d["kind"] == "ClusterRole" and "training" in d["metadata"]["name"]]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    for doc in (role, binding, account):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
