"""Production hardening of the chart (deploy/README.md "Policy check"): images pinned by digest,
no API token in any pod but the training service's (runner kubernetes)."""

from __future__ import annotations

from typing import Any

from test_chart import CHART, KUBE_VERSION, RELEASE, all_containers, helm, literal_env, render

DIGEST = "sha256:" + "ab" * 32
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet")


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def test_images_pinned_by_digest() -> None:
    components = ("ingest", "segmentation", "ranking", "labels", "gateway", "triton", "training")
    sets = [
        "training.enabled=true",
        "gateway.enabled=true",
        "gateway.oidc.clientId=gw",
        "gateway.ingress.host=h.example",
    ]
    sets += ["labels.database.existingSecret=labels-db"]
    sets += [f"{c}.image.digest={DIGEST}" for c in components]
    sets += ["training.job.image.repository=atlasflow/trainer", f"training.job.image.digest={DIGEST}"]
    docs = render(*[a for s in sets for a in ("--set", s)])
    images = {c["image"] for d in _workloads(docs) for c in all_containers(d)}
    assert images and all(i.endswith("@" + DIGEST) and ":" not in i.split("/")[-1].split("@")[0] for i in images)
    assert "ghcr.io/atlasflow/ingest@" + DIGEST in images
    training = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-training"))
    env = literal_env(training["spec"]["template"]["spec"]["containers"][0])
    assert env["ATLASFLOW_TRAINING_JOB_IMAGE"] == "ghcr.io/atlasflow/trainer@" + DIGEST
    # without a digest: the version tag
    plain = {c["image"] for d in _workloads(render()) for c in all_containers(d)}
    assert all("@" not in i and ":" in i.split("/")[-1] for i in plain)


def test_a_malformed_digest_is_refused() -> None:
    for bad in ("ab" * 32, "sha256:xyz", "sha512:" + "ab" * 64):
        proc = helm(
            "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", f"ranking.image.digest={bad}"
        )
        assert proc.returncode != 0 and "/ranking/image/digest" in proc.stderr, proc.stderr


def test_no_pod_automounts_an_api_token() -> None:
    """Checkov CKV_K8S_38: every pod sets automountServiceAccountToken false; the training service
    (runner kubernetes) mounts its token explicitly in its one container."""
    docs = render("--set", "training.enabled=true")
    for d in _workloads(docs):
        spec = (
            d["spec"]["template"]["spec"]
            if d["kind"] != "CronJob"
            else d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        )
        assert spec["automountServiceAccountToken"] is False, d["metadata"]["name"]
        token_volumes = [v["name"] for v in spec.get("volumes", []) if "serviceAccountToken" in str(v)]
        assert token_volumes == (["kube-api-access"] if d["metadata"]["name"].endswith("-training") else [])
