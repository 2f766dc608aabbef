"""The Kubernetes Job runner: the Job spec validates against the Kubernetes 1.35 OpenAPI schema
(kubernetes-validate, strict) and says what a GPU fine-tune needs; the controller logic is
tested at the official client's boundary (a fake BatchV1Api/CoreV1Api returning the client's
own model objects and raising its ApiException). No API server runs here."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubernetes.client import V1Job, V1JobCondition, V1JobStatus, V1ObjectMeta, V1Pod, V1PodList
from kubernetes.client.exceptions import ApiException

from atlasflow.common.errors import FailedPrecondition, Unavailable
from atlasflow.training.jobs_k8s import JobCancelled, JobFailed, JobSettings, KubernetesJobRunner, build_job, job_name

KUBE_VERSION = "1.35.0"
DIGEST = "sha256:" + "ab" * 32
GPU_NODES = JobSettings(
    namespace="atlasflow",
    image="registry.example/atlasflow:0.1.0",
    state_pvc="atlasflow-training-state",
    blob_pvc="atlasflow-blobs",
    gpus=4,
    node_selector={"nvidia.com/gpu.present": "true"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    service_account="atlasflow-training-job",
)


@pytest.mark.parametrize(
    "settings", [GPU_NODES, JobSettings("ns", "img:1", "st", blob_url="s3://bucket/blobs", gpus=1)]
)
def test_job_spec_is_valid_kubernetes(settings: JobSettings) -> None:
    kubernetes_validate.validate(build_job(settings, DIGEST, "abdomen-trio-v1"), KUBE_VERSION, strict=True)


def test_job_spec_content() -> None:
    job = build_job(GPU_NODES, DIGEST, "abdomen-trio-v1")
    assert job["metadata"]["name"] == job_name(DIGEST) == "atlasflow-train-" + "ab" * 8
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (2, 3600)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["command"][:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4"]
    assert c["command"][4:6] == ["-m", "atlasflow.training.finetune"]
    args = dict(zip(c["command"][6::2], c["command"][7::2]))
    assert args["--manifest"] == f"/state/training/manifests/{'ab' * 32}.json"
    assert args["--blobs"] == "/blobs" and args["--device"] == "cuda"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/state", "/blobs", "/dev/shm", "/tmp"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    by_url = build_job(JobSettings("ns", "img:1", "st", blob_url="s3://b/p"), DIGEST, "v")
    c2 = by_url["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "ATLASFLOW_TRAINING_BLOB_URL", "value": "s3://b/p"} in c2["env"]
    assert "blobs" not in {v["name"] for v in by_url["spec"]["template"]["spec"]["volumes"]}


def test_blob_store_must_be_named_once() -> None:
    with pytest.raises(FailedPrecondition):
        JobSettings("ns", "img", "st")
    with pytest.raises(FailedPrecondition):
        JobSettings("ns", "img", "st", blob_pvc="a", blob_url="s3://b")


class FakeBatch:
    """BatchV1Api at its boundary: the client's model objects and ApiException."""

    def __init__(self, states: list[V1JobStatus | ApiException]) -> None:
        self.jobs: dict[str, dict] = {}
        self.states = states
        self.calls: list[tuple] = []

    def create_namespaced_job(self, namespace, body):
        self.calls.append(("create", namespace, body["metadata"]["name"]))
        if body["metadata"]["name"] in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[body["metadata"]["name"]] = body
        return V1Job(metadata=V1ObjectMeta(name=body["metadata"]["name"]))

    def read_namespaced_job_status(self, name, namespace):
        self.calls.append(("read", namespace, name))
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, ApiException):
            raise state
        return V1Job(metadata=V1ObjectMeta(name=name), status=state)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append(("delete", namespace, name, propagation_policy))
        if self.jobs.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")


class FakeCore:
    def list_namespaced_pod(self, namespace, label_selector=""):
        assert label_selector.startswith("job-name=")
        return V1PodList(items=[V1Pod(metadata=V1ObjectMeta(name="p-1")), V1Pod(metadata=V1ObjectMeta(name="p-2"))])

    def read_namespaced_pod_log(self, name, namespace, tail_lines=0):
        if name == "p-2":
            raise ApiException(status=400, reason="ContainerCreating")
        return '{"member": "unet", "final_loss": 0.3}\n'


RUNNING = V1JobStatus(active=1)
DONE = V1JobStatus(succeeded=1, conditions=[V1JobCondition(type="Complete", status="True")])
FAILED = V1JobStatus(failed=3, conditions=[V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded")])


def _runner(states) -> tuple[KubernetesJobRunner, FakeBatch]:
    batch = FakeBatch(states)
    return KubernetesJobRunner(GPU_NODES, batch, FakeCore(), poll_s=0), batch


def test_run_creates_watches_and_cleans_up() -> None:
    runner, batch = _runner([RUNNING, RUNNING, DONE])
    name = runner.run(DIGEST, "abdomen-trio-v1")
    assert [c[0] for c in batch.calls] == ["create", "read", "read", "read", "delete"]
    assert batch.calls[-1] == ("delete", "atlasflow", name, "Background") and not batch.jobs


def test_submit_is_idempotent() -> None:
    runner, batch = _runner([DONE])
    assert runner.submit(DIGEST, "v") == runner.submit(DIGEST, "v")
    assert len(batch.jobs) == 1


def test_failed_job_reports_its_reason() -> None:
    runner, _ = _runner([RUNNING, FAILED])
    name = runner.submit(DIGEST, "v")
    with pytest.raises(JobFailed) as exc:
        runner.wait(name)
    assert (exc.value.reason, exc.value.metadata["reason"]) == ("JOB_FAILED", "BackoffLimitExceeded")


def test_cancel_deletes_the_job_in_the_foreground() -> None:
    runner, batch = _runner([RUNNING])
    name = runner.submit(DIGEST, "v")
    stops = iter([False, False, True])
    with pytest.raises(JobCancelled):
        runner.wait(name, should_stop=lambda: next(stops))
    assert batch.calls[-1] == ("delete", "atlasflow", name, "Foreground") and not batch.jobs
    runner.delete(name)  # already gone: no error


def test_a_vanished_job_and_an_unreachable_api() -> None:
    runner, _ = _runner([ApiException(status=404, reason="NotFound")])
    with pytest.raises(JobFailed) as exc:
        runner.wait("x")
    assert exc.value.reason == "JOB_GONE"
    runner, _ = _runner([ApiException(status=503, reason="Unavailable")])
    with pytest.raises(Unavailable) as exc2:
        runner.wait("x")
    assert exc2.value.reason == "KUBERNETES_UNAVAILABLE"


def test_logs_of_every_pod() -> None:
    runner, _ = _runner([DONE])
    logs = runner.logs("atlasflow-train-x")
    assert logs["p-1"].startswith('{"member"') and logs["p-2"] == "(no log: 400)"


def test_timeout() -> None:
    runner, _ = _runner([RUNNING])
    with pytest.raises(JobFailed) as exc:
        runner.wait("x", timeout_s=0, sleep=lambda s: None)
    assert exc.value.reason == "JOB_TIMEOUT"
