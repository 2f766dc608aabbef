"""The training service's ``RUNNER=kubernetes``: the fine-tune stage of a round runs as a
Kubernetes ``batch/v1`` Job instead of in the service's process (no grpc).

The executor (`atlasflow.training.executor`) still builds the manifest, writes the version,
evaluates and gates in its own process; `KubernetesFinetune.bind` gives `run_round` a fine-tune
stage that, for run ``run_id``:

1. skips the Job when every member's ``result.json`` is already on the state volume for this
   run (a restart after the Job finished and its TTL removed it);
2. deletes Jobs of the same run for another manifest (the decisions changed while the service
   was down) and creates the run's Job (`jobs_k8s.run_job_name`: run id + manifest, so the
   create of a restarted service answers 409 AlreadyExists and it re-attaches to the Job it
   created before instead of starting a second one);
3. watches it: every ``poll_s`` the Job's status (Complete / Failed with its reason, active and
   failed pod counts: a failed pod that the Job retries is reported as ``retrying``), its pods'
   phase and waiting reason (ImagePullBackOff, Unschedulable) and the members' progress read
   from their ``log.jsonl`` on the state volume, written to the run's progress;
4. on success reads each member's ``result.json`` and checks the weights' digest; on failure
   raises `JobFailed` with a reason the run keeps (``JOB_BACKOFF_LIMIT_EXCEEDED``,
   ``JOB_DEADLINE_EXCEEDED``, ``JOB_FAILED``, ``JOB_GONE``, ``JOB_RESULT_MISSING``); an API
   server that does not answer is waited for up to ``api_grace_s`` (then
   ``KUBERNETES_UNAVAILABLE``; the Job keeps running and a restart re-attaches);
5. on a cancel of the run deletes the Job (propagation Background: the API removes the Job at
   once and the garbage collector its pods) and raises `TrainingCancelled` (the run becomes
   CANCELLED); when the service itself stops it leaves the Job running and raises
   `TrainingCancelled` without deleting (the run stays RUNNING, is queued again at the next
   start and re-attaches). Finished Jobs are removed by their ``ttlSecondsAfterFinished``.

Why the state volume is the channel back (not the run database): the Job pod then needs no
database credentials, no network path to PostgreSQL and no API token (its NetworkPolicy denies
all egress except the blob store); the files are the ones the trainer writes anyway for
checkpoints and resume, and they are written atomically (result) or appended line by line
(progress), so a reader never sees a torn result. The cost: the state PVC must be readable by
both the service and the Job pod (ReadWriteMany when they run on different nodes).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasflow.common.errors import FailedPrecondition, Unavailable
from atlasflow.segmentation.ensemble import ENSEMBLE_DIR, EnsembleConfig, MemberConfig
from atlasflow.training.dataset import DOMAIN, Manifest
from atlasflow.training.finetune import Hyperparameters, MemberResult, TrainingCancelled
from atlasflow.training.job import read_result
from atlasflow.training.jobs_k8s import STATE_MOUNT, JobFailed, KubernetesJobRunner

log = logging.getLogger(__name__)

FinetuneStage = Callable[[EnsembleConfig, Sequence[MemberConfig], Manifest, str, Path], list[MemberResult]]


def failure_reason(condition_reason: str) -> str:
    """A Job's Failed condition reason as a run's error reason: BackoffLimitExceeded ->
    JOB_BACKOFF_LIMIT_EXCEEDED, DeadlineExceeded -> JOB_DEADLINE_EXCEEDED, else JOB_FAILED."""
    known = {"BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy"}
    if condition_reason not in known:
        return "JOB_FAILED"
    return "JOB_" + re.sub(r"(?<!^)(?=[A-Z])", "_", condition_reason).upper()


def member_progress(run_dir: Path, member: str) -> tuple[int, float]:
    """(last step, its loss) of ``<run_dir>/<member>/log.jsonl``; (0, nan) before the first."""
    path = run_dir / member / "log.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0, float("nan")
    for line in reversed(lines):
        try:
            doc = json.loads(line)
            return int(doc["step"]), float(doc["loss"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return 0, float("nan")


@dataclass
class KubernetesFinetune:
    """See the module docstring. ``state_dir``: the service's state directory, the same volume
    the Job mounts at ``state_mount``."""

    runner: KubernetesJobRunner
    state_dir: Path
    poll_s: float = 5.0
    state_mount: str = STATE_MOUNT
    sleep: Callable[[float], None] = time.sleep
    # how long the API may stay unreachable while a Job is watched before the run fails
    # (KUBERNETES_UNAVAILABLE); the Job itself keeps running meanwhile
    api_grace_s: float = 300.0

    def job_path(self, path: Path) -> str:
        """``path`` (under the service's state_dir) as the Job pod sees it."""
        try:
            rel = Path(path).resolve().relative_to(Path(self.state_dir).resolve())
        except ValueError:
            raise FailedPrecondition(
                "NOT_ON_STATE_VOLUME",
                "a training file is not on the state volume the Job mounts",
                domain=DOMAIN,
                metadata={"path": str(path)[-200:]},
            ) from None
        return f"{self.state_mount}/{rel.as_posix()}"

    def parent_ref(self, parent: EnsembleConfig) -> str:
        """The parent ensemble for the Job: a shipped version by name (it is in the image), a
        trained one by its ``ensemble.json`` on the state volume."""
        if parent.source is None or Path(parent.source).resolve().parent == ENSEMBLE_DIR.resolve():
            return parent.version
        return self.job_path(Path(parent.source))

    def bind(
        self,
        run_id: str,
        *,
        cancel_requested: Callable[[], bool],
        stopping: Callable[[], bool],
        on_progress: Callable[[str, int, int, float], None] | None = None,
        on_job: Callable[[dict[str, Any]], None] | None = None,
    ) -> FinetuneStage:
        """The fine-tune stage of run ``run_id`` (for `run_round`'s ``finetune_stage``).
        ``on_job``: called with the Job's observed state (name, state, pods) when it changes."""

        def stage(
            parent: EnsembleConfig, members: Sequence[MemberConfig], manifest: Manifest, digest: str, run_dir: Path
        ) -> list[MemberResult]:
            return self.run(
                run_id,
                parent,
                members,
                manifest,
                digest,
                run_dir,
                cancel_requested=cancel_requested,
                stopping=stopping,
                on_progress=on_progress,
                on_job=on_job,
            )

        return stage

    def run(
        self,
        run_id: str,
        parent: EnsembleConfig,
        members: Sequence[MemberConfig],
        manifest: Manifest,
        digest: str,
        run_dir: Path,
        *,
        cancel_requested: Callable[[], bool],
        stopping: Callable[[], bool],
        on_progress: Callable[[str, int, int, float], None] | None = None,
        on_job: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[MemberResult]:
        steps = Hyperparameters.from_dict(manifest.hyperparameters).steps
        names = [m.name for m in members]
        done = self._results(run_dir, names, run_id)
        if done is not None:
            return done
        manifest_path = Path(self.state_dir) / "training" / "manifests" / f"{digest.split(':', 1)[-1]}.json"
        self.job_path(manifest_path)  # fails early when the manifest is not on the state volume
        self.job_path(run_dir)
        parent_ref = self.parent_ref(parent)
        name = self.runner.submit(digest, parent_ref, run_id=run_id)
        for other in self.runner.jobs_of_run(run_id):
            if other != name:  # the same run, an older manifest: its result would be stale
                self.runner.delete(other)
        last_seen: dict[str, Any] = {}
        unreachable_since = 0.0
        progress_seen: dict[str, int] = {}
        while True:
            if cancel_requested():
                self.runner.delete(name)
                raise TrainingCancelled("", 0)
            if stopping():
                raise TrainingCancelled("", 0)  # the Job keeps running; the next start re-attaches
            try:
                job = self.runner.read(name)
                pods = self.runner.pods(name)
            except Unavailable:
                if time.monotonic() - (unreachable_since or time.monotonic()) > self.api_grace_s:
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                self.sleep(self.poll_s)
                continue
            unreachable_since = 0.0
            if job is None:
                results = self._results(run_dir, names, run_id)
                if results is not None:
                    return results  # finished and already removed by its TTL
                raise JobFailed("JOB_GONE", "the training Job no longer exists", domain=DOMAIN, metadata={"job": name})
            state, reason, active, failed = _observe(job)
            for member in names:
                step, loss = member_progress(run_dir, member)
                if on_progress is not None and step and progress_seen.get(member) != step:
                    progress_seen[member] = step
                    on_progress(member, step, steps, loss)
            if state == "running" and not active:
                state = "pending"
            if state == "running" and failed:
                state = "retrying"
            seen: dict[str, Any] = {"name": name, "state": state, "failed_pods": failed}
            if state in ("pending", "retrying", "failed"):
                seen["pods"] = pods
            if seen != last_seen:
                last_seen = seen
                if on_job is not None:
                    on_job(seen)
            if state == "succeeded":
                results = self._results(run_dir, names, run_id)
                if results is None:
                    raise JobFailed(
                        "JOB_RESULT_MISSING",
                        "the training Job succeeded but a member's result is not on the state volume",
                        domain=DOMAIN,
                        metadata={"job": name},
                    )
                return results
            if state == "failed":
                raise JobFailed(
                    failure_reason(reason),
                    "the training Job failed",
                    domain=DOMAIN,
                    metadata={"job": name, "reason": reason},
                )
            self.sleep(self.poll_s)

    @staticmethod
    def _results(run_dir: Path, names: Sequence[str], run_id: str) -> list[MemberResult] | None:
        out = []
        for member in names:
            doc = read_result(run_dir, member)
            if doc is None or doc.get("run_id") != run_id:
                return None
            out.append(
                MemberResult(
                    member,
                    run_dir / member / "weights.pt",
                    str(doc["digest"]),
                    int(doc["steps"]),
                    float(doc["final_loss"]),
                    float(doc["seconds"]),
                    int(doc.get("resumed_from", 0)),
                )
            )
        return out


def _observe(job: Any) -> tuple[str, str, int, int]:
    """(succeeded | failed | running, the Failed condition's reason, active pods, failed pods)."""
    status = job.status
    if status is None:
        return "running", "", 0, 0
    active, failed = int(status.active or 0), int(status.failed or 0)
    for cond in status.conditions or []:
        if cond.type == "Complete" and cond.status == "True":
            return "succeeded", "", active, failed
        if cond.type == "Failed" and cond.status == "True":
            return "failed", str(cond.reason or "Failed"), active, failed
    if int(status.succeeded or 0) >= 1:
        return "succeeded", "", active, failed
    return "running", "", active, failed


SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _json_setting(name: str, raw: str, kind: type) -> Any:
    if not raw.strip():
        return kind()
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise FailedPrecondition(
            "INVALID_JOB_SETTINGS",
            f"ATLASFLOW_TRAINING_{name.upper()} must be a JSON {kind.__name__}",
            domain=DOMAIN,
            metadata={"setting": name},
        )
    return value


def job_settings(settings: Any) -> Any:
    """`jobs_k8s.JobSettings` from a `TrainingSettings` (its ``job_*`` fields)."""
    from atlasflow.training.jobs_k8s import JobSettings

    namespace = settings.job_namespace
    if not namespace and SA_NAMESPACE.is_file():
        namespace = SA_NAMESPACE.read_text().strip()
    missing = [n for n, v in (("job_namespace", namespace), ("job_image", settings.job_image)) if not v]
    missing += ["job_state_pvc"] if not settings.job_state_pvc else []
    if missing:
        raise FailedPrecondition(
            "INVALID_JOB_SETTINGS",
            "RUNNER=kubernetes needs the Job's namespace, image and state PVC",
            domain=DOMAIN,
            metadata={"missing": ",".join(missing)},
        )
    blob_url = settings.job_blob_url
    if not settings.job_blob_pvc and not blob_url and settings.blob_url.startswith("s3://"):
        blob_url = settings.blob_url
    env = {}
    if blob_url:
        env = {
            "ATLASFLOW_TRAINING_BLOB_S3_ENDPOINT_URL": settings.blob_s3_endpoint_url,
            "ATLASFLOW_TRAINING_BLOB_S3_REGION": settings.blob_s3_region,
            "ATLASFLOW_TRAINING_BLOB_S3_ADDRESSING_STYLE": settings.blob_s3_addressing_style,
        }
    return JobSettings(
        namespace=namespace,
        image=settings.job_image,
        state_pvc=settings.job_state_pvc,
        blob_pvc=settings.job_blob_pvc,
        blob_url=blob_url,
        gpus=settings.job_gpus,
        cpu=settings.job_cpu,
        memory=settings.job_memory,
        shm_size=settings.job_shm_size,
        node_selector=_json_setting("job_node_selector", settings.job_node_selector, dict),
        tolerations=_json_setting("job_tolerations", settings.job_tolerations, list),
        backoff_limit=settings.job_backoff_limit,
        ttl_seconds_after_finished=settings.job_ttl_s,
        active_deadline_seconds=settings.job_active_deadline_s,
        service_account=settings.job_service_account,
        priority_class=settings.job_priority_class,
        env=env,
        s3_credentials_secret=settings.job_s3_credentials_secret if blob_url else "",
        s3_credentials_key=settings.job_s3_credentials_key,
    )


def from_settings(settings: Any, state_dir: Path, *, batch: Any = None, core: Any = None) -> KubernetesFinetune | None:
    """The Kubernetes fine-tune stage when ``settings.runner`` is "kubernetes", None for
    "local"; FailedPrecondition INVALID_RUNNER for anything else. ``batch`` / ``core``: the
    client's BatchV1Api / CoreV1Api (default: the in-cluster configuration)."""
    if settings.runner == "local":
        return None
    if settings.runner != "kubernetes":
        raise FailedPrecondition(
            "INVALID_RUNNER", "ATLASFLOW_TRAINING_RUNNER must be local or kubernetes", domain=DOMAIN
        )
    runner = KubernetesJobRunner(job_settings(settings), batch, core, poll_s=settings.job_poll_s)
    return KubernetesFinetune(runner, Path(state_dir), poll_s=settings.job_poll_s)
