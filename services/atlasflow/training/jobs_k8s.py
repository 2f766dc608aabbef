"""Fine-tuning as a Kubernetes ``batch/v1`` Job, through the official ``kubernetes`` Python client
(the ``cluster`` extra: ``pip install atlasflow[cluster]``). No grpc.

`build_job` writes the Job (a plain dict, what the client's ``create_namespaced_job`` accepts
and what tests validate against the Kubernetes OpenAPI schema with kubernetes-validate):

- one pod (``parallelism: 1``, ``completions: 1``), ``restartPolicy: Never``,
  ``backoffLimit`` retries (a retried pod resumes from the members' checkpoints on the state
  volume: `finetune_member` is resumable and deterministic), ``ttlSecondsAfterFinished``
  (the cluster deletes a finished Job and its pods) and ``activeDeadlineSeconds``;
- the command ``torchrun --standalone --nnodes 1 --nproc_per_node <gpus> -m
  atlasflow.training.finetune --manifest ... --run-dir ... --device cuda``: one process per GPU
  of the node, each training its share of the members (`atlasflow.training.finetune.main`);
- ``resources`` requesting ``nvidia.com/gpu`` (requests = limits), CPU and memory; the
  ``nodeSelector`` and ``tolerations`` of the GPU nodes; a hardened security context;
- the training state (manifests, checkpoints, weights) on a PersistentVolumeClaim mounted at
  ``/state``; the blob store either the shared blob PVC mounted at ``/blobs`` or reached by URL
  (``s3://...``: ``ATLASFLOW_TRAINING_BLOB_URL`` in the pod's environment); ``/dev/shm`` as a
  memory ``emptyDir`` (PyTorch data loading).

`KubernetesJobRunner` creates the Job (idempotent: the name is derived from the manifest digest,
so a second submit of the same round finds the existing Job), watches it until it succeeds or
fails (polling ``read_namespaced_job_status``; `should_stop` deletes it with foreground
propagation = cancellation), reads the pods' logs (``pods/log``) and cleans up. The
chart's Role allows exactly these verbs on ``jobs`` and ``pods``/``pods/log``.

Not run against a live cluster (none can run here): see docs/training.md "Kubernetes".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atlasflow.common.errors import AtlasflowError, FailedPrecondition, Unavailable
from atlasflow.training.dataset import DOMAIN

STATE_MOUNT = "/state"
BLOB_MOUNT = "/blobs"
JOB_LABEL = "atlasflow.io/training-manifest"
RUN_LABEL = "atlasflow.io/training-run"
S3_CREDENTIALS_DIR = "/var/run/secrets/atlasflow/s3"


@dataclass(frozen=True)
class JobSettings:
    """How training Jobs are shaped. gpus: GPUs of one node (= torchrun processes);
    state_pvc: PVC of the training state; blob_pvc: PVC of the blob store (or blob_url);
    service_account: the Job pod's (it needs no API access: its token is not mounted)."""

    namespace: str
    image: str
    state_pvc: str
    blob_pvc: str = ""
    blob_url: str = ""
    gpus: int = 1
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 24 * 3600
    service_account: str = ""
    image_pull_policy: str = "IfNotPresent"
    priority_class: str = ""
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables (e.g. BLOB_S3_*)
    # with blob_url: the Secret holding an AWS shared-credentials file (boto3's standard chain
    # reads it through AWS_SHARED_CREDENTIALS_FILE), mounted read-only like the services do
    s3_credentials_secret: str = ""
    s3_credentials_key: str = "credentials"

    def __post_init__(self) -> None:
        if bool(self.blob_pvc) == bool(self.blob_url):
            raise FailedPrecondition(
                "INVALID_JOB_SETTINGS", "exactly one of blob_pvc and blob_url must be set", domain=DOMAIN
            )
        if self.gpus < 1:
            raise FailedPrecondition("INVALID_JOB_SETTINGS", "gpus must be >= 1", domain=DOMAIN)


def job_name(manifest_digest: str) -> str:
    """``atlasflow-train-<first 16 hex of the manifest>`` (a DNS label, < 63 characters)."""
    return "atlasflow-train-" + manifest_digest.split(":", 1)[-1][:16]


def run_job_name(run_id: str, manifest_digest: str) -> str:
    """``atlasflow-<run id>-<first 8 hex of the manifest>`` (a DNS label, < 63 characters): one
    Job per run and manifest, so a restarted service finds the Job it created (re-attach) and a
    run whose decisions changed meanwhile gets a new one."""
    return f"atlasflow-{run_label(run_id)}-{manifest_digest.split(':', 1)[-1][:8]}"


def run_label(run_id: str) -> str:
    """The run id as a label value and name part (lower-case alphanumerics and '-', <= 40)."""
    return "".join(c if c.isalnum() else "-" for c in run_id.lower()).strip("-")[:40]


def build_job(s: JobSettings, manifest_digest: str, parent_ensemble: str, *, run_id: str = "") -> dict[str, Any]:
    """The ``batch/v1`` Job fine-tuning the members on manifest ``manifest_digest`` (its file is
    ``/state/training/manifests/<hex>.json``) from ``parent_ensemble`` (a version name or a JSON
    path under /state). With ``run_id`` (the training service's runner): named by
    `run_job_name`, labelled with the run, and running `atlasflow.training.job` (which also
    writes each member's ``result.json`` for the service)."""
    hexd = manifest_digest.split(":", 1)[-1]
    name = run_job_name(run_id, manifest_digest) if run_id else job_name(manifest_digest)
    labels = {
        "app.kubernetes.io/name": "atlasflow",
        "app.kubernetes.io/component": "training-job",
        JOB_LABEL: hexd[:16],
    }
    if run_id:
        labels[RUN_LABEL] = run_label(run_id)
    command = [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={s.gpus}",
        "-m",
        "atlasflow.training.job" if run_id else "atlasflow.training.finetune",
        "--manifest",
        f"{STATE_MOUNT}/training/manifests/{hexd}.json",
        "--blobs",
        BLOB_MOUNT if s.blob_pvc else s.blob_url,
        "--run-dir",
        f"{STATE_MOUNT}/training/runs/{hexd[:16]}",
        "--ensemble",
        parent_ensemble,
        "--device",
        "cuda",
    ]
    if run_id:
        command += ["--run-id", run_id]
    mounts: list[dict[str, Any]] = [
        {"name": "state", "mountPath": STATE_MOUNT},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "state", "persistentVolumeClaim": {"claimName": s.state_pvc}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    env: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": "4"}]
    env += [{"name": k, "value": str(v)} for k, v in sorted(s.env.items())]
    if s.blob_pvc:
        mounts.append({"name": "blobs", "mountPath": BLOB_MOUNT, "readOnly": True})
        volumes.append({"name": "blobs", "persistentVolumeClaim": {"claimName": s.blob_pvc, "readOnly": True}})
    else:
        env.append({"name": "ATLASFLOW_TRAINING_BLOB_URL", "value": s.blob_url})
        if s.s3_credentials_secret:
            key = s.s3_credentials_key
            env.append({"name": "AWS_SHARED_CREDENTIALS_FILE", "value": f"{S3_CREDENTIALS_DIR}/{key}"})
            mounts.append({"name": "s3-credentials", "mountPath": S3_CREDENTIALS_DIR, "readOnly": True})
            volumes.append(
                {
                    "name": "s3-credentials",
                    "secret": {
                        "secretName": s.s3_credentials_secret,
                        "defaultMode": 0o440,
                        "items": [{"key": key, "path": key}],
                    },
                }
            )
    resources = {
        "requests": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)},
        "limits": {"memory": s.memory, "nvidia.com/gpu": str(s.gpus)},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "containers": [
            {
                "name": "finetune",
                "image": s.image,
                "imagePullPolicy": s.image_pull_policy,
                "command": command,
                "env": env,
                "resources": resources,
                "volumeMounts": mounts,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
    }
    if s.node_selector:
        pod_spec["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in s.tolerations]
    if s.service_account:
        pod_spec["serviceAccountName"] = s.service_account
    if s.priority_class:
        pod_spec["priorityClassName"] = s.priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": s.namespace, "labels": labels},
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": s.backoff_limit,
            "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
            "activeDeadlineSeconds": s.active_deadline_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


class JobFailed(AtlasflowError):
    code = "FAILED_PRECONDITION"


class JobCancelled(AtlasflowError):
    code = "CANCELLED"


def _status(e: Exception) -> int:
    return int(getattr(e, "status", 0) or 0)


class KubernetesJobRunner:
    """Create, watch, read logs of and clean up training Jobs (module docstring). ``batch``: a
    ``kubernetes.client.BatchV1Api``; ``core``: a ``kubernetes.client.CoreV1Api`` (default:
    built from the in-cluster configuration, else ~/.kube/config)."""

    def __init__(self, settings: JobSettings, batch: Any = None, core: Any = None, *, poll_s: float = 5.0) -> None:
        if batch is None or core is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            batch = batch or client.BatchV1Api()
            core = core or client.CoreV1Api()
        self.s, self.batch, self.core, self.poll_s = settings, batch, core, poll_s

    def submit(self, manifest_digest: str, parent_ensemble: str, *, run_id: str = "") -> str:
        """Create the round's Job (or find it: same manifest (and run), same name); returns its
        name."""
        body = build_job(self.s, manifest_digest, parent_ensemble, run_id=run_id)
        name = str(body["metadata"]["name"])
        try:
            self.batch.create_namespaced_job(self.s.namespace, body)
        except Exception as exc:
            if _status(exc) != 409:  # AlreadyExists: the round was submitted before
                raise self._unavailable(exc) from None
        return name

    def _unavailable(self, exc: Exception) -> Unavailable:
        return Unavailable(
            "KUBERNETES_UNAVAILABLE",
            "the Kubernetes API refused or did not answer",
            domain=DOMAIN,
            metadata={"status": str(_status(exc)), "error": type(exc).__name__},
        )

    def read(self, name: str) -> Any:
        """The Job with its status (a ``V1Job``), or None when it does not exist."""
        try:
            return self.batch.read_namespaced_job_status(name, self.s.namespace)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise self._unavailable(exc) from None

    def jobs_of_run(self, run_id: str) -> list[str]:
        """Names of the Jobs labelled with training run ``run_id``."""
        try:
            selector = f"{RUN_LABEL}={run_label(run_id)}"
            jobs = self.batch.list_namespaced_job(self.s.namespace, label_selector=selector)
        except Exception as exc:
            raise self._unavailable(exc) from None
        return sorted(str(j.metadata.name) for j in jobs.items)

    def pods(self, name: str) -> list[dict[str, str]]:
        """The Job's pods: name, phase and the first waiting/terminated container's reason
        (e.g. ImagePullBackOff, OOMKilled, Unschedulable)."""
        try:
            pods = self.core.list_namespaced_pod(self.s.namespace, label_selector=f"job-name={name}")
        except Exception as exc:
            raise self._unavailable(exc) from None
        out = []
        for pod in pods.items:
            st = pod.status
            reason = ""
            for cs in (st.container_statuses or []) if st is not None else []:
                state = cs.state
                detail = (state.waiting or state.terminated) if state is not None else None
                if detail is not None and detail.reason:
                    reason = str(detail.reason)
                    break
            if not reason and st is not None:
                for cond in st.conditions or []:
                    if cond.type == "PodScheduled" and cond.status == "False" and cond.reason:
                        reason = str(cond.reason)
            out.append(
                {
                    "name": str(pod.metadata.name),
                    "phase": str(st.phase or "") if st is not None else "",
                    "reason": reason,
                }
            )
        return sorted(out, key=lambda p: p["name"])

    def state(self, name: str) -> str:
        """ "succeeded", "failed:<reason>", or "running"."""
        job = self.batch.read_namespaced_job_status(name, self.s.namespace)
        status = job.status
        if status is not None:
            for cond in status.conditions or []:
                if cond.type == "Complete" and cond.status == "True":
                    return "succeeded"
                if cond.type == "Failed" and cond.status == "True":
                    return f"failed:{cond.reason or 'Failed'}"
            if (status.succeeded or 0) >= 1:
                return "succeeded"
        return "running"

    def wait(
        self,
        name: str,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        timeout_s: float = 24 * 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Until the Job succeeds; `JobFailed` (reason from its Failed condition, e.g.
        BackoffLimitExceeded, DeadlineExceeded), `JobCancelled` after deleting it when
        ``should_stop()`` turns true."""
        deadline = time.monotonic() + timeout_s
        while True:
            if should_stop():
                self.delete(name, foreground=True)
                raise JobCancelled("TRAINING_CANCELLED", "the training Job was deleted", domain=DOMAIN)
            try:
                state = self.state(name)
            except Exception as exc:
                if _status(exc) == 404:
                    raise JobFailed("JOB_GONE", "the training Job no longer exists", domain=DOMAIN) from None
                raise self._unavailable(exc) from None
            if state == "succeeded":
                return
            if state.startswith("failed:"):
                raise JobFailed(
                    "JOB_FAILED", "the training Job failed", domain=DOMAIN, metadata={"reason": state.split(":", 1)[1]}
                )
            if time.monotonic() > deadline:
                raise JobFailed("JOB_TIMEOUT", "the training Job did not finish in time", domain=DOMAIN)
            sleep(self.poll_s)

    def logs(self, name: str, tail_lines: int = 200) -> dict[str, str]:
        """The last lines of each of the Job's pods (``pods/log``), by pod name."""
        pods = self.core.list_namespaced_pod(self.s.namespace, label_selector=f"job-name={name}")
        out = {}
        for pod in pods.items:
            pod_name = pod.metadata.name
            try:
                out[pod_name] = self.core.read_namespaced_pod_log(pod_name, self.s.namespace, tail_lines=tail_lines)
            except Exception as exc:  # noqa: BLE001 - a pod without logs yet (Pending)
                out[pod_name] = f"(no log: {_status(exc) or type(exc).__name__})"
        return out

    def delete(self, name: str, *, foreground: bool = False) -> None:
        """Delete the Job and its pods (idempotent)."""
        try:
            self.batch.delete_namespaced_job(
                name, self.s.namespace, propagation_policy="Foreground" if foreground else "Background"
            )
        except Exception as exc:
            if _status(exc) != 404:
                raise self._unavailable(exc) from None

    def run(
        self, manifest_digest: str, parent_ensemble: str, *, should_stop: Callable[[], bool] = lambda: False
    ) -> str:
        """submit + wait + delete (the TTL would delete it too); returns the Job name."""
        name = self.submit(manifest_digest, parent_ensemble)
        self.wait(name, should_stop=should_stop)
        self.delete(name)
        return name
