"""The training service's ``RUNNER=kubernetes``: the fine-tune stage as a ``batch/v1`` Job.

No API server runs here. The Kubernetes API is a fake of the official client's BatchV1Api and
CoreV1Api objects (the client's own model classes and ApiException; a "cluster" dict shared by
the API objects of successive service instances, so a restarted service sees the Jobs the first
one created). The Job's pod, where it runs, is our real entry point: the fake runs the Job's
container command (`atlasflow.training.job`) with /state and /blobs mapped to this test's
directories. The executor, run store (SQLite), manifest and trainer are the real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1Job,
    V1JobCondition,
    V1JobList,
    V1JobStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodList,
    V1PodStatus,
)
from kubernetes.client.exceptions import ApiException

from atlasflow.cli.train import _summary
from atlasflow.common.errors import FailedPrecondition, Unavailable
from atlasflow.segmentation.ensemble import load_ensemble
from atlasflow.training import job as job_main
from atlasflow.training.dataset import build_manifest, collect_decisions, load_manifest, write_manifest
from atlasflow.training.executor import ExecutorConfig, RunExecutor
from atlasflow.training.finetune import TrainingCancelled
from atlasflow.training.jobs_k8s import RUN_LABEL, JobFailed, JobSettings, KubernetesJobRunner, build_job
from atlasflow.training.k8s_runner import KubernetesFinetune, failure_reason, from_settings, job_settings
from atlasflow.training.runs import CANCELLED, FAILED, RUNNING, RunStore
from atlasflow.training.servicer import run_to_proto
from atlasflow.training.settings import TrainingSettings

HP = {"steps": 2, "checkpoint_every": 1, "crop_size": [16, 16, 16], "members": ["unet", "dynunet"], "lr": 1e-3}
SETTINGS = JobSettings(namespace="atlasflow", image="img:1", state_pvc="state", blob_pvc="blobs", gpus=2)

RUNNING_S = V1JobStatus(active=1)
PENDING_S = V1JobStatus()
RETRYING_S = V1JobStatus(active=1, failed=1)
DONE_S = V1JobStatus(succeeded=1, conditions=[V1JobCondition(type="Complete", status="True")])
BACKOFF_S = V1JobStatus(
    failed=3, conditions=[V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded")]
)


class Cluster:
    """The API server's state: Jobs by name, each with a script of statuses (the last one
    repeats) and an optional "pod" run when the Job is created."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.script: list[V1JobStatus] = [RUNNING_S]
        self.pod = None  # callable(body) run at create time (the Job's container)
        self.calls: list[tuple] = []
        self.lock = threading.Lock()


class FakeBatch:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster

    def create_namespaced_job(self, namespace, body):
        name = body["metadata"]["name"]
        with self.c.lock:
            self.c.calls.append(("create", name))
            if name in self.c.jobs:
                raise ApiException(status=409, reason="AlreadyExists")
            self.c.jobs[name] = {"body": body, "script": list(self.c.script)}
        if self.c.pod is not None:
            self.c.pod(body)
        return V1Job(metadata=V1ObjectMeta(name=name))

    def read_namespaced_job_status(self, name, namespace):
        with self.c.lock:
            self.c.calls.append(("read", name))
            job = self.c.jobs.get(name)
            if job is None:
                raise ApiException(status=404, reason="NotFound")
            status = job["script"].pop(0) if len(job["script"]) > 1 else job["script"][0]
        if isinstance(status, ApiException):
            raise status
        labels = job["body"]["metadata"]["labels"]
        return V1Job(metadata=V1ObjectMeta(name=name, labels=labels), status=status)

    def list_namespaced_job(self, namespace, label_selector=""):
        key, value = label_selector.split("=", 1)
        with self.c.lock:
            items = [
                V1Job(metadata=V1ObjectMeta(name=n, labels=j["body"]["metadata"]["labels"]))
                for n, j in self.c.jobs.items()
                if j["body"]["metadata"]["labels"].get(key) == value
            ]
        return V1JobList(items=items)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        with self.c.lock:
            self.c.calls.append(("delete", name, propagation_policy))
            if self.c.jobs.pop(name, None) is None:
                raise ApiException(status=404, reason="NotFound")


class FakeCore:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster

    def list_namespaced_pod(self, namespace, label_selector=""):
        name = label_selector.removeprefix("job-name=")
        waiting = V1ContainerState(waiting=V1ContainerStateWaiting(reason="ImagePullBackOff"))
        status = V1PodStatus(
            phase="Pending",
            container_statuses=[
                V1ContainerStatus(
                    name="finetune", image="img:1", image_id="", ready=False, restart_count=0, state=waiting
                )
            ],
        )
        return V1PodList(items=[V1Pod(metadata=V1ObjectMeta(name=f"{name}-abcde"), status=status)])


def _stage(cluster: Cluster, state_dir: Path) -> KubernetesFinetune:
    runner = KubernetesJobRunner(SETTINGS, FakeBatch(cluster), FakeCore(cluster), poll_s=0)
    return KubernetesFinetune(runner, state_dir, poll_s=0, sleep=lambda s: time.sleep(0.01))


@pytest.fixture(scope="module")
def world(store, tmp_path_factory):
    """A state dir with a manifest of the conftest store's decisions (2 members, 2 steps)."""
    state = tmp_path_factory.mktemp("state")
    m = build_manifest(
        collect_decisions(store.repo),
        parent_version="abdomen-trio-v1",
        seed=3,
        hyperparameters=HP,
        holdout_cases={"case-d"},
    )
    path, digest = write_manifest(m, state / "training" / "manifests")
    return state, path, digest


def _pod(state: Path, blobs: Path, outputs: list[dict]):
    """The Job's container: its own command line (``torchrun --standalone --nnodes=1
    --nproc_per_node=2 -m atlasflow.training.job ...``) run as a process with this venv's
    torchrun, /state and /blobs mapped here, on CPU."""

    def run(body) -> None:
        (container,) = body["spec"]["template"]["spec"]["containers"]
        cmd = container["command"]
        assert cmd[0] == "torchrun" and cmd[4:6] == ["-m", "atlasflow.training.job"]
        args = [a.replace("/state", str(state), 1) if a.startswith("/state") else a for a in cmd[1:]]
        args = [str(blobs) if a == "/blobs" else a for a in args]
        args[args.index("--device") + 1] = "cpu"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *args], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        outputs.extend(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))

    return run


def test_run_job_spec_is_valid_kubernetes_and_names_the_run() -> None:
    body = build_job(SETTINGS, "sha256:" + "cd" * 32, "abdomen-trio-v1", run_id="tr-0123456789abcdef0123")
    kubernetes_validate.validate(body, "1.35.0", strict=True)
    assert body["metadata"]["name"] == "atlasflow-tr-0123456789abcdef0123-cdcdcdcd"
    assert body["metadata"]["labels"][RUN_LABEL] == "tr-0123456789abcdef0123"
    cmd = body["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[3:6] == ["--nproc_per_node=2", "-m", "atlasflow.training.job"] and cmd[-2:] == [
        "--run-id",
        "tr-0123456789abcdef0123",
    ]


def test_job_succeeds_pod_trains_members_split_over_ranks(store, world) -> None:
    state, _, digest = world
    manifest, _ = load_manifest(world[1])
    cluster = Cluster()
    outputs: list[dict] = []
    cluster.pod = _pod(state, Path(store.blobs.root), outputs)
    cluster.script = [PENDING_S, RUNNING_S, DONE_S]
    parent = load_ensemble("abdomen-trio-v1")
    members = [m for m in parent.members if m.name in HP["members"]]
    run_dir = state / "training" / "runs" / digest.split(":")[1][:16]
    progress, jobs = [], []
    results = _stage(cluster, state).run(
        "tr-ok", parent, members, manifest, digest, run_dir,
        cancel_requested=lambda: False, stopping=lambda: False,
        on_progress=lambda *a: progress.append(a), on_job=jobs.append,
    )  # fmt: skip
    assert [r.member for r in results] == ["unet", "dynunet"] and all(r.steps == 2 for r in results)
    assert sorted((o["member"], o["rank"]) for o in outputs) == [("dynunet", 1), ("unet", 0)]  # split over ranks
    for r in results:
        doc = json.loads((run_dir / r.member / "result.json").read_text())
        assert doc["digest"] == r.digest and doc["run_id"] == "tr-ok"
    assert {(p[0], p[1], p[2]) for p in progress} == {("unet", 2, 2), ("dynunet", 2, 2)}
    assert [j["state"] for j in jobs] == ["pending", "running", "succeeded"]
    assert jobs[0]["pods"][0]["reason"] == "ImagePullBackOff"
    assert [c[0] for c in cluster.calls].count("create") == 1
    # the same run again (service restarted after the Job finished and the TTL removed it):
    # the results on the state volume are used, no Job is created
    cluster.jobs.clear()
    cluster.calls.clear()
    again = _stage(cluster, state).run(
        "tr-ok", parent, members, manifest, digest, run_dir, cancel_requested=lambda: False, stopping=lambda: False
    )
    assert [r.digest for r in again] == [r.digest for r in results] and cluster.calls == []
    # the entry point itself skips members already done for this run (a retried pod)
    before = {m: (run_dir / m / "result.json").stat().st_mtime_ns for m in ("unet", "dynunet")}
    args = ["--run-id", "tr-ok", "--manifest", str(world[1]), "--blobs", str(store.blobs.root)]
    assert job_main.main([*args, "--run-dir", str(run_dir), "--ensemble", "abdomen-trio-v1"]) == 0
    assert before == {m: (run_dir / m / "result.json").stat().st_mtime_ns for m in ("unet", "dynunet")}


def _executor(store, state: Path, runs: RunStore, cluster: Cluster) -> RunExecutor:
    cfg = ExecutorConfig(state_dir=state, n_boot=50, progress_every_s=0.0, poll_s=0.05)
    return RunExecutor(runs, lambda: store.repo, store.blobs, cfg, remote_finetune=_stage(cluster, state))


def _run_in_thread(executor: RunExecutor, runs: RunStore) -> threading.Thread:
    record = runs.claim()
    assert record is not None
    t = threading.Thread(target=executor.execute, args=(record,), daemon=True)
    t.start()
    return t


def _wait(pred, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_restart_reattaches_and_backoff_fails_the_run(store, tmp_path) -> None:
    state = tmp_path / "state"
    runs = RunStore(tmp_path / "runs.sqlite3")
    cluster = Cluster()
    run = runs.create({"hyperparameters": HP, "seed": 3, "holdout_case_ids": ["case-d"]}, "dr-admin")
    first = _executor(store, state, runs, cluster)
    t = _run_in_thread(first, runs)
    _wait(lambda: runs.get(run.run_id).progress.get("job", {}).get("state") == "running")
    (name,) = cluster.jobs
    assert name.startswith(f"atlasflow-{run.run_id}-")
    first.request_stop()  # the service stops: the Job keeps running, the run stays RUNNING
    t.join(60)
    assert not t.is_alive() and runs.get(run.run_id).state == RUNNING and name in cluster.jobs
    assert not [c for c in cluster.calls if c[0] == "delete"]
    # a new service process: requeue, claim, re-attach to the same Job (create answers 409)
    cluster.jobs[name]["script"] = [RETRYING_S, BACKOFF_S]
    second = _executor(store, state, runs, cluster)
    assert runs.requeue_running() == 1
    t = _run_in_thread(second, runs)
    t.join(60)
    creates = [c for c in cluster.calls if c[0] == "create"]
    assert creates == [("create", name), ("create", name)] and len(cluster.jobs) == 1
    done = runs.get(run.run_id)
    assert (done.state, done.error_reason) == (FAILED, "JOB_BACKOFF_LIMIT_EXCEEDED")
    assert done.progress["job"]["state"] == "failed" and done.progress["job"]["failed_pods"] == 3
    job = run_to_proto(done).progress.job  # what GetTrainingRun answers
    assert (job.name, job.state, job.failed_pods) == (name, "failed", 3)
    assert [(p.phase, p.reason) for p in job.pods] == [("Pending", "ImagePullBackOff")]
    assert not run_to_proto(runs.create({}, "dr-admin")).progress.HasField("job")
    assert f"job {name}  failed  failed_pods=3  {name}-abcde: Pending ImagePullBackOff" in _summary(run_to_proto(done))
    runs.close()


def test_cancel_deletes_the_job_in_the_background(store, tmp_path) -> None:
    state = tmp_path / "state"
    runs = RunStore(tmp_path / "runs.sqlite3")
    cluster = Cluster()
    run = runs.create({"hyperparameters": HP, "seed": 3, "holdout_case_ids": ["case-d"]}, "dr-admin")
    executor = _executor(store, state, runs, cluster)
    t = _run_in_thread(executor, runs)
    _wait(lambda: bool(cluster.jobs))
    (name,) = cluster.jobs
    runs.cancel(run.run_id)
    t.join(60)
    done = runs.get(run.run_id)
    assert (done.state, done.error_reason) == (CANCELLED, "TRAINING_CANCELLED")
    assert ("delete", name, "Background") in cluster.calls and not cluster.jobs
    runs.close()


def test_stale_manifest_job_is_replaced_and_gone_job_fails(world, tmp_path) -> None:
    state, path, digest = world
    manifest, _ = load_manifest(path)
    parent = load_ensemble("abdomen-trio-v1")
    cluster = Cluster()
    stage = _stage(cluster, state)
    old = stage.runner.submit("sha256:" + "ee" * 32, "abdomen-trio-v1", run_id="tr-stale")
    cluster.script = [RUNNING_S]
    stop = iter([False, False, True])
    with pytest.raises(TrainingCancelled):
        stage.run("tr-stale", parent, parent.members[:1], manifest, digest, state / "r",
                  cancel_requested=lambda: next(stop), stopping=lambda: False)  # fmt: skip
    assert ("delete", old, "Background") in cluster.calls
    cluster.jobs.clear()
    cluster.script = [RUNNING_S]
    cluster.pod = lambda body: cluster.jobs.clear()  # the Job vanishes (deleted by hand)
    with pytest.raises(JobFailed) as exc:
        stage.run("tr-gone", parent, parent.members[:1], manifest, digest, state / "r",
                  cancel_requested=lambda: False, stopping=lambda: False)  # fmt: skip
    assert exc.value.reason == "JOB_GONE"


def test_failure_reasons_and_settings(tmp_path) -> None:
    assert failure_reason("BackoffLimitExceeded") == "JOB_BACKOFF_LIMIT_EXCEEDED"
    assert failure_reason("DeadlineExceeded") == "JOB_DEADLINE_EXCEEDED"
    assert failure_reason("Evicted") == "JOB_FAILED"
    assert from_settings(TrainingSettings(), tmp_path) is None
    with pytest.raises(FailedPrecondition) as exc:
        from_settings(TrainingSettings(runner="k8s"), tmp_path)
    assert exc.value.reason == "INVALID_RUNNER"
    with pytest.raises(FailedPrecondition) as exc:
        job_settings(TrainingSettings(runner="kubernetes", job_namespace="ns", job_image="img"))
    assert exc.value.metadata["missing"] == "job_state_pvc"
    s = TrainingSettings(
        runner="kubernetes",
        job_namespace="ns",
        job_image="img:1",
        job_state_pvc="state",
        blob_url="s3://bucket/blobs",
        blob_s3_endpoint_url="http://minio:9000",
        job_node_selector='{"nvidia.com/gpu.present": "true"}',
        job_tolerations='[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
    )
    js = job_settings(replace(s, job_s3_credentials_secret="atlasflow-s3"))
    assert js.blob_url == "s3://bucket/blobs" and js.node_selector == {"nvidia.com/gpu.present": "true"}
    assert js.env["ATLASFLOW_TRAINING_BLOB_S3_ENDPOINT_URL"] == "http://minio:9000"
    body = build_job(js, "sha256:" + "ab" * 32, "v", run_id="tr-1")
    kubernetes_validate.validate(body, "1.35.0", strict=True)
    pod = body["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "s3-credentials"]
    assert vol["secret"]["secretName"] == "atlasflow-s3"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/var/run/secrets/atlasflow/s3/credentials"
    with pytest.raises(FailedPrecondition) as exc:
        job_settings(TrainingSettings(**{**s.__dict__, "job_tolerations": "{}"}))
    assert exc.value.reason == "INVALID_JOB_SETTINGS"


def test_an_unreachable_api_is_waited_for_then_fails(world) -> None:
    state, path, digest = world
    manifest, _ = load_manifest(path)
    parent = load_ensemble("abdomen-trio-v1")
    blip = ApiException(status=503, reason="ServiceUnavailable")
    cluster = Cluster()
    cluster.script = [RUNNING_S, blip, blip, BACKOFF_S]
    kw = {"cancel_requested": lambda: False, "stopping": lambda: False}
    with pytest.raises(JobFailed) as exc:  # two failed reads, then the Job's real outcome
        _stage(cluster, state).run("tr-blip", parent, parent.members[:1], manifest, digest, state / "r", **kw)
    assert exc.value.reason == "JOB_BACKOFF_LIMIT_EXCEEDED"
    cluster = Cluster()
    cluster.script = [blip]
    stage = _stage(cluster, state)
    stage.api_grace_s = 0.0
    with pytest.raises(Unavailable) as exc2:
        stage.run("tr-down", parent, parent.members[:1], manifest, digest, state / "r", **kw)
    assert exc2.value.reason == "KUBERNETES_UNAVAILABLE" and len(cluster.jobs) == 1  # the Job is left running


def test_job_entry_point_reads_an_s3_blob_store(store, tmp_path, monkeypatch) -> None:
    """The Job's URL form (``--blobs s3://...``, options from the ATLASFLOW_TRAINING_BLOB_S3_*
    variables the runner puts in the pod): moto's S3 server, a real HTTP peer on loopback."""
    from atlasflow.common.s3blobs import S3BlobStore
    from atlasflow.testing.s3 import CREDENTIALS, MotoS3

    m = build_manifest(
        collect_decisions(store.repo),
        parent_version="abdomen-trio-v1",
        seed=3,
        hyperparameters={**HP, "members": ["unet"]},
        holdout_cases={"case-d"},
    )
    path, digest = write_manifest(m, tmp_path / "manifests")
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with MotoS3() as server:
        server.create_bucket("site")
        s3 = S3BlobStore("site", "blobs", server.options())
        for case in m.train:
            for d in (case.ct_digest, case.label_map_digest):
                s3.put(store.blobs.get(d))
        opts = server.options()
        monkeypatch.setenv("ATLASFLOW_TRAINING_BLOB_S3_ENDPOINT_URL", opts.endpoint_url)
        monkeypatch.setenv("ATLASFLOW_TRAINING_BLOB_S3_REGION", opts.region)
        monkeypatch.setenv("ATLASFLOW_TRAINING_BLOB_S3_ADDRESSING_STYLE", opts.addressing_style)
        run_dir = tmp_path / "run"
        args = ["--run-id", "tr-s3", "--manifest", str(path), "--blobs", "s3://site/blobs", "--run-dir", str(run_dir)]
        assert job_main.main([*args, "--ensemble", "abdomen-trio-v1"]) == 0
    doc = job_main.read_result(run_dir, "unet")
    assert doc is not None and doc["run_id"] == "tr-s3" and doc["steps"] == 2
