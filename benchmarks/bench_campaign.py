"""A labelling campaign through R replicas of every service on one PostgreSQL and an S3 store.

Given no database or store URLs it starts its own PostgreSQL 15 cluster
(`atlasflow.testing.postgres.PostgresCluster`, one database per service: ingest and
segmentation both have an `outbox` table) and moto's S3 server (`atlasflow.testing.s3.MotoS3`)
on loopback, and stops them at the end. Then, like `atlasflow up` (`cli/local.py`: the same
environment, the stack's own token issuer and CA, mTLS): one Triton (PyTriton, CPU, shared) and R
replicas each of ingest, segmentation, ranking and labels as separate `atlasflow serve <service>`
processes, each with its own ports and data directory, all on the same databases and the same
blob bucket. Targets: replica i of a service calls replica i of the others (ingest i ->
segmentation i, segmentation i -> labels i and ranking i, labels i -> ranking i).

N studies (the bundled example CT cropped to --slices axial slices, each with its own synthetic
UIDs: `cli/demo_series.build_demo_datasets`) are sent by C-STORE (dcmtk storescu, TCP_NODELAY)
concurrently, study k to ingest replica k mod R. The bench waits until every study has an AI label
version and a worklist entry, then prints studies sent / completed, lost, duplicated (a second
segmentation job of one series version + ensemble, a second AI label version of one case + model
version: `atlasflow.testing.campaign.account`), throughput, and per-stage figures:

- measured latencies from the services' own timestamps: ingest (series created -> assembled,
  includes the quiet period), segmentation (job created -> done; Triton inference seconds),
  labels (job done -> AI version written), ranking (job done -> worklist entry updated);
- measured CPU-seconds per study of each service (all its replicas, from /proc, the idle rate
  measured before the first study subtracted) and of Triton (the models, on CPU here).

``--kill``: once every study is sent and one has completed, replica 0 of every service gets
SIGKILL and is restarted on its data directory; the run must still end with 0 lost, 0 duplicated.

Then it projects an 8,448-CT campaign on K GPU nodes (`campaign.project`): the GPU stage from
../shared/DESIGN.md (11.4 GPU-s per CT, trio, bf16, overlap 0.75, H200: NOT measured here), the
non-GPU stages from the CPU-seconds measured here scaled by voxels to DESIGN's 266x266x250 CT
(an assumption, printed). ``--json``: one JSON object instead of the text.

    .venv/bin/python benchmarks/bench_campaign.py --studies 6 --replicas 2 [--kill] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import nibabel as nib
import numpy as np

from atlasflow.cli.demo_series import DEFAULT_DEMO_NIFTI, build_demo_datasets, demo_uid
from atlasflow.cli.local import LocalDeployment
from atlasflow.common.ports import free_ports
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.identity import atlas_id
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from atlasflow.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from atlasflow.testing.campaign import (
    CAMPAIGN_CTS,
    GPU_SECONDS_PER_CT,
    REFERENCE_CT_VOXELS,
    JobRecord,
    VersionRecord,
    account,
    project,
)

SERVICES = ["labels", "ranking", "segmentation", "ingest"]  # start order (as local.START_ORDER)
PORT_KEYS = {
    "ingest": ("ingest", "dicom", "ingest_metrics"),
    "segmentation": ("segmentation", "segmentation_metrics"),
    "ranking": ("ranking", "ranking_metrics"),
    "labels": ("labels", "labels_metrics"),
}
BUCKET = "atlasflow-campaign"
AE = "ATLASDEMO"


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (a service and its children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


@dataclass(frozen=True)
class S3Target:
    url: str  # s3://bucket/prefix
    endpoint: str  # empty: AWS
    env: dict[str, str]  # credentials for the services (the emulator's dummy ones)


@dataclass
class Proc:
    service: str
    replica: int
    popen: subprocess.Popen[bytes]
    cpu_s: float = 0.0  # last sample of this incarnation


class Campaign:
    def __init__(self, args: argparse.Namespace, state: Path, db_urls: dict[str, str], s3: S3Target) -> None:
        self.args = args
        self.state = state
        self.quiet = args.quiet
        self.base = LocalDeployment.create(
            state, auto_ports=True, quiet_period_s=args.quiet_period, accepted_aets=(AE,), extra_env=dict(s3.env)
        )
        self.db_urls = db_urls
        self.s3 = s3
        self.replicas: dict[tuple[str, int], LocalDeployment] = {}
        self.procs: dict[tuple[str, int], Proc] = {}
        self.finished_cpu: dict[str, float] = {}  # CPU of killed incarnations
        self.deid_key = state / "auth" / "deid.key"
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- processes
    def replica_count(self, service: str) -> int:
        return self.args.seg_replicas if service == "segmentation" else self.args.replicas

    def deployment(self, r: int) -> LocalDeployment:
        """Replica r's view of the stack: its own service ports, Triton's shared."""
        if ("*", r) not in self.replicas:
            ports = dict(self.base.ports)
            keys = [k for v in PORT_KEYS.values() for k in v]
            ports.update(zip(keys, free_ports(len(keys)), strict=True))
            self.replicas["*", r] = LocalDeployment(
                self.state,
                ports,
                self.base.ensemble,
                self.base.quiet_period_s,
                self.base.extra_env,
                self.base.accepted_aets,
            )
        dep = self.replicas["*", r]
        # a service with fewer replicas than r: replica r's peers are replica r mod count
        return dep

    def env(self, service: str, r: int) -> dict[str, str]:
        dep = self.deployment(r)
        env = dep._env(service)  # noqa: SLF001 - the launcher's own environment, as `atlasflow up` builds it
        p = f"ATLASFLOW_{service.upper()}_"
        env[p + "DATA_DIR"] = str(self.state / "data" / f"{service}-{r}")
        env[p + "DATABASE_URL"] = self.db_urls[service]
        env[p + "BLOB_URL"] = self.s3.url
        env[p + "BLOB_S3_ENDPOINT_URL"] = self.s3.endpoint
        env[p + "BLOB_S3_REGION"] = "us-east-1"
        env[p + "BLOB_S3_ADDRESSING_STYLE"] = "path"
        # peers of a service with fewer replicas (segmentation kept at 1): replica r mod count
        for target, peer in (("SEGMENTATION_TARGET", "segmentation"), ("LABELS_TARGET", "labels")):
            if p + target in env:
                env[p + target] = self.deployment(r % self.replica_count(peer)).target(peer)
        if service == "ingest":
            env[p + "ASSEMBLY_CLAIM_S"] = str(self.args.lease_s)
        if service == "segmentation":
            env[p + "JOB_LEASE_S"] = str(self.args.lease_s)
        if service == "labels":
            env[p + "DEID_KEY_FILE"] = str(self.deid_key)  # one pseudonym key for every replica
        return env

    def spawn(self, service: str, r: int) -> None:
        dep = self.deployment(r)
        logf = open(self.state / "logs" / f"{service}-{r}.log", "ab")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(
            dep._command(service),  # noqa: SLF001
            env=self.env(service, r),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.state,
            umask=0o077,
        )
        self.procs[service, r] = Proc(service, r, popen)

    def wait_healthy(self, keys: list[tuple[str, int]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for service, r in keys:
            while not self.deployment(r).healthy(service):
                proc = self.procs[service, r].popen
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{service}-{r} exited ({proc.returncode}); see {self.state}/logs/{service}-{r}.log"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service}-{r} not healthy after {timeout_s:.0f} s")
                time.sleep(0.5)

    def start(self) -> None:
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.base.start(["triton"])  # writes run/, the tokens and the CA; starts the shared Triton
        fd = os.open(self.deid_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        keys = [(s, r) for s in SERVICES for r in range(self.replica_count(s))]
        for s, r in keys:
            self.spawn(s, r)
        self.base.wait_healthy(self.args.start_timeout, names=["triton"])
        self.wait_healthy(keys, self.args.start_timeout)

    def sample_cpu(self) -> dict[str, float]:
        """CPU-seconds so far of every service (all replicas, killed incarnations included) and Triton."""
        with self.lock:
            out = dict(self.finished_cpu)
            for (service, _r), proc in self.procs.items():
                if proc.popen.poll() is None:
                    proc.cpu_s = max(proc.cpu_s, group_cpu_seconds(proc.popen.pid))
                out[service] = out.get(service, 0.0) + proc.cpu_s
            triton = self.base.pids().get("triton")
            out["triton"] = group_cpu_seconds(triton) if triton else 0.0
        return out

    def kill_and_restart(self, r: int) -> list[str]:
        killed = []
        for service in SERVICES:
            if (service, r) not in self.procs:
                continue
            self.sample_cpu()
            with self.lock:
                proc = self.procs.pop((service, r))
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait()
                self.finished_cpu[service] = self.finished_cpu.get(service, 0.0) + proc.cpu_s
            killed.append(f"{service}-{r}")
        time.sleep(1.0)
        for service in SERVICES:
            if f"{service}-{r}" in killed:
                self.spawn(service, r)
        self.wait_healthy([(s, r) for s in SERVICES if f"{s}-{r}" in killed], self.args.start_timeout)
        return killed

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.base.stop(names=["triton"])

    # ---------------------------------------------------------------- clients
    def stub(self, cls: Any, service: str, r: int) -> Any:
        dep = self.deployment(r)
        return cls(dep.channel(service, token=dep.token_source("admin", "bench-campaign")))


def make_studies(n: int, slices: int, out: Path) -> tuple[list[tuple[str, list[Path]]], int]:
    """n studies of the example CT cropped to `slices` central axial slices; (case_id, files) each."""
    img = cast(nib.Nifti1Image, nib.load(str(DEFAULT_DEMO_NIFTI)))
    hu = np.asanyarray(img.dataobj)
    affine = np.array(img.affine, dtype=np.float64)
    z = hu.shape[2]
    slices = min(slices, z)
    z0 = (z - slices) // 2
    hu = hu[:, :, z0 : z0 + slices]
    affine[:3, 3] += affine[:3, 2] * z0
    studies = []
    for k in range(n):
        seed = f"bench-campaign-{k}-{out.name}"
        folder = out / f"study{k:04d}"
        folder.mkdir(parents=True)
        files = []
        for ds in build_demo_datasets(hu, affine, seed_name=seed):
            path = folder / f"IM{int(ds.InstanceNumber):04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append((atlas_id("case", demo_uid(seed, "study")), files))
    return studies, int(np.prod(hu.shape))


def storescu(files: list[Path], port: int) -> None:
    subprocess.run(
        ["storescu", "-aet", AE, "-aec", "ATLASFLOW", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=dict(os.environ, TCP_NODELAY="1"),
        capture_output=True,
    )


def ts(t: Any) -> float:
    return float(t.seconds) + t.nanos / 1e9


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def collect(c: Campaign, cases: list[str], r: int) -> dict[str, Any]:
    """Everything the services list about the campaign's cases (through replica r)."""
    ingest = c.stub(ingest_pb2_grpc.IngestServiceStub, "ingest", r)
    seg = c.stub(segmentation_pb2_grpc.SegmentationServiceStub, "segmentation", r % c.args.seg_replicas)
    labels = c.stub(labels_pb2_grpc.LabelServiceStub, "labels", r)
    ranking = c.stub(ranking_pb2_grpc.RankingServiceStub, "ranking", r)
    series, token = [], ""
    while True:
        resp = ingest.ListSeries(ingest_pb2.ListSeriesRequest(page_size=200, page_token=token), timeout=30)
        series += list(resp.series)
        token = resp.next_page_token
        if not token:
            break
    jobs, versions, worklist = [], [], {}
    for case in cases:
        jobs += list(
            seg.ListSegmentationJobs(
                segmentation_pb2.ListSegmentationJobsRequest(case_id=case, page_size=100), timeout=30
            ).jobs
        )
        versions += list(
            labels.ListLabelVersions(
                labels_pb2.ListLabelVersionsRequest(case_id=case, page_size=100), timeout=30
            ).versions
        )
        try:
            worklist[case] = ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case), timeout=30).item
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return {"series": series, "jobs": jobs, "versions": versions, "worklist": worklist}


def progress(c: Campaign, cases: list[str], done: set[str], r: int) -> tuple[int, int, set[str]]:
    """A cheap look while the campaign runs (its RPCs cost the polled replicas CPU): one paged list
    of the jobs, then labels and ranking only for the cases whose job succeeded and that are not yet
    complete. Returns (jobs of the campaign, succeeded jobs, newly completed cases)."""
    seg = c.stub(segmentation_pb2_grpc.SegmentationServiceStub, "segmentation", r % c.args.seg_replicas)
    labels = c.stub(labels_pb2_grpc.LabelServiceStub, "labels", r)
    ranking = c.stub(ranking_pb2_grpc.RankingServiceStub, "ranking", r)
    ours, jobs, token = set(cases), [], ""
    while True:
        req = segmentation_pb2.ListSegmentationJobsRequest(page_size=100, page_token=token)
        resp = seg.ListSegmentationJobs(req, timeout=30)
        jobs += [j for j in resp.jobs if j.case_id in ours]
        token = resp.next_page_token
        if not token:
            break
    succeeded = {j.case_id for j in jobs if j.state == common_pb2.OPERATION_STATE_SUCCEEDED}
    new = set()
    for case in sorted(succeeded - done):
        versions = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case), timeout=30).versions
        if not any(v.provenance.source == labels_pb2.LABEL_SOURCE_AI for v in versions):
            continue
        try:
            ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=case), timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        new.add(case)
    return len(jobs), len(succeeded), new


def records(raw: dict[str, Any]) -> tuple[list[JobRecord], list[VersionRecord]]:
    jobs = [
        JobRecord(
            j.job_id,
            j.case_id,
            j.series_id,
            j.series_version,
            j.ensemble_version,
            common_pb2.OperationState.Name(j.state).removeprefix("OPERATION_STATE_"),
        )
        for j in raw["jobs"]
    ]
    versions = [
        VersionRecord(
            v.version_id,
            v.case_id,
            labels_pb2.LabelSource.Name(v.provenance.source).removeprefix("LABEL_SOURCE_").lower(),
            v.provenance.model_version,
            v.provenance.job_id,
        )
        for v in raw["versions"]
    ]
    return jobs, versions


def stage_latencies(raw: dict[str, Any], cases: set[str]) -> dict[str, float]:
    """Median seconds per stage from the services' own timestamps."""
    ingest = [
        ts(s.update_time) - ts(s.create_time)
        for s in raw["series"]
        if s.case_id in cases and s.state in (ingest_pb2.SERIES_STATE_ASSEMBLED, ingest_pb2.SERIES_STATE_DISPATCHED)
    ]
    done = {j.job_id: ts(j.update_time) for j in raw["jobs"] if j.state == common_pb2.OPERATION_STATE_SUCCEEDED}
    seg = [ts(j.update_time) - ts(j.create_time) for j in raw["jobs"] if j.job_id in done]
    infer = [j.result.inference_seconds for j in raw["jobs"] if j.job_id in done]
    lab = [
        ts(v.create_time) - done[v.provenance.job_id]
        for v in raw["versions"]
        if v.provenance.source == labels_pb2.LABEL_SOURCE_AI and v.provenance.job_id in done
    ]
    rank = [ts(w.update_time) - done[w.source_job_id] for w in raw["worklist"].values() if w.source_job_id in done]
    return {
        "ingest_to_assembled_s": _median(ingest),
        "segmentation_job_s": _median(seg),
        "segmentation_inference_s": _median(infer),
        "labels_after_job_s": _median(lab),
        "ranking_after_job_s": _median(rank),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="bench-campaign-"))
    quiet = args.quiet
    stack: list[Any] = []
    try:
        if args.postgres_admin_url:
            admin = args.postgres_admin_url
            import psycopg

            def create_db(name: str) -> str:
                db = f"campaign_{name}_{os.getpid()}"
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{db}"')
                return admin.rsplit("/", 1)[0] + "/" + db

        else:
            from atlasflow.testing.postgres import PostgresCluster

            pg = PostgresCluster(max_connections=400).start()
            stack.append(pg)
            log(f"PostgreSQL 15 on 127.0.0.1:{pg.port}", quiet)

            def create_db(name: str) -> str:
                return pg.create_database(f"campaign_{name}_")

        db_urls = {s: create_db(s) for s in SERVICES}
        if args.blob_url:
            s3 = S3Target(args.blob_url, args.s3_endpoint, {})
        else:
            from atlasflow.testing.s3 import MotoS3

            moto = MotoS3().start()
            stack.append(moto)
            moto.create_bucket(BUCKET)
            s3 = S3Target(f"s3://{BUCKET}/blobs", moto.endpoint, moto.env)
            log(f"moto S3 on {moto.endpoint}", quiet)
        c = Campaign(args, state, db_urls, s3)
        stack.append(c)
        t0 = time.monotonic()
        c.start()
        log(
            f"stack up in {time.monotonic() - t0:.0f} s: Triton + {args.replicas} x ingest/ranking/labels, "
            f"{args.seg_replicas} x segmentation; state {state}",
            quiet,
        )
        studies, voxels = make_studies(args.studies, args.slices, state / "dicom")
        cases = [case for case, _ in studies]
        # idle CPU of the stack (pollers, heartbeats), subtracted from the per-study figures
        idle0, t_idle = c.sample_cpu(), time.monotonic()
        time.sleep(args.idle_window)
        idle1 = c.sample_cpu()
        idle_rate = {k: (idle1[k] - idle0.get(k, 0.0)) / (time.monotonic() - t_idle) for k in idle1}
        cpu0 = c.sample_cpu()

        t_send = time.monotonic()
        send_errors: list[str] = []
        resent = 0

        def send(k: int) -> None:
            nonlocal resent
            _case, files = studies[k]
            for attempt in range(5):
                r = (k + attempt) % args.replicas  # study k to ingest replica k mod R (next one on failure)
                try:
                    storescu(files, c.deployment(r).ports["dicom"])
                    return
                except subprocess.CalledProcessError as e:
                    resent += 1
                    send_errors.append(f"study {k} -> ingest-{r}: storescu rc {e.returncode}")
                    time.sleep(2)
            raise RuntimeError(f"study {k} could not be sent")

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(args.studies, 2 * args.replicas)))
        sends = [pool.submit(send, k) for k in range(args.studies)]
        killed: list[str] = []
        deadline = time.monotonic() + args.timeout
        done_at: dict[str, float] = {}
        poll_r = args.replicas - 1
        while time.monotonic() < deadline:
            time.sleep(args.poll)
            c.sample_cpu()
            try:
                n_jobs, n_ok, new = progress(c, cases, set(done_at), poll_r)
            except grpc.RpcError as e:
                log(f"poll failed ({e.code().name}); retrying", quiet)
                continue
            now = time.monotonic()
            for case in new:
                done_at.setdefault(case, now)
            sent_all = all(f.done() for f in sends)
            log(
                f"sent {sum(f.done() for f in sends)}/{args.studies}, jobs {n_jobs} ({n_ok} succeeded), "
                f"completed {len(done_at)}",
                quiet,
            )
            started = n_jobs if args.kill_at == "first-job" else len(done_at)
            if args.kill and not killed and sent_all and started >= 1 and len(done_at) < args.studies:
                log("SIGKILL replica 0 of every service, restarting it", quiet)
                killed = c.kill_and_restart(0)
                log(f"killed and restarted: {', '.join(killed)}", quiet)
            if sent_all and len(done_at) == len(cases) and (killed or not args.kill):
                break
        for f in sends:
            if f.done() and f.exception():
                send_errors.append(str(f.exception()))
        pool.shutdown(wait=False, cancel_futures=True)
        wall = (max(done_at.values()) if done_at else time.monotonic()) - t_send
        cpu1 = c.sample_cpu()
        # a last look after a settle time: a duplicate made after completion still counts
        time.sleep(args.settle)
        raw = collect(c, cases, poll_r)
        jobs, versions = records(raw)
        acc = account(cases, jobs, versions, raw["worklist"].keys())
        n_done = max(1, len(acc.completed))
        cpu_per_study = {k: max(0.0, cpu1[k] - cpu0.get(k, 0.0) - idle_rate.get(k, 0.0) * wall) / n_done for k in cpu1}
        cpu_gross = {k: (cpu1[k] - cpu0.get(k, 0.0)) / n_done for k in cpu1}
        non_gpu = {k: v for k, v in cpu_per_study.items() if k != "triton"}
        scale = REFERENCE_CT_VOXELS / voxels
        projections = []
        for k in args.nodes:
            p = project(non_gpu, nodes=k, cores_per_node=args.cores_per_node, scale=scale)
            projections.append(
                {
                    "gpu_nodes": k,
                    "hours": round(p.hours, 2),
                    "gpu_stage_hours": round(p.gpu_hours, 2),
                    "cpu_stages_hours": round(next(iter(p.cpu_hours.values()), 0.0), 2),
                    "bottleneck": p.bottleneck,
                    "cores_to_keep_pace": {s: round(v, 2) for s, v in p.cores_needed.items()},
                }
            )
        return {
            "measured": {
                "studies_sent": args.studies,
                "studies_completed": len(acc.completed),
                "lost": len(acc.lost),
                "lost_cases": acc.lost,
                "duplicated": acc.duplicated,
                "duplicates": acc.duplicates,
                "failed_jobs": acc.failed_jobs,
                "segmentation_jobs": len(jobs),
                # jobs run more than once (a killed replica's lease taken over, or a retry)
                "segmentation_jobs_retried": sum(1 for j in raw["jobs"] if j.attempts > 1),
                "ai_label_versions": sum(v.source == "ai" for v in versions),
                "studies_per_hour": round(len(acc.completed) / wall * 3600, 1) if wall > 0 else 0.0,
                "wall_s": round(wall, 1),
                "replicas": {s: c.replica_count(s) for s in SERVICES} | {"triton": 1},
                "killed": killed,
                "kill_at": args.kill_at if args.kill else "",
                "send_retries": resent,
                "send_errors": send_errors,
                "study": {"voxels": voxels, "slices": min(args.slices, 112), "instances": len(studies[0][1])},
                "stage_latency_s": {k: round(v, 2) for k, v in stage_latencies(raw, set(cases)).items()},
                "cpu_s_per_study": {k: round(v, 2) for k, v in cpu_per_study.items()},
                "cpu_s_per_study_gross": {k: round(v, 2) for k, v in cpu_gross.items()},
                "idle_cpu_s_per_s": {k: round(v, 3) for k, v in idle_rate.items()},
                # how the work spread over the replicas (CPU-s of the live incarnation of each)
                "cpu_s_by_process": {f"{s}-{r}": round(p.cpu_s, 1) for (s, r), p in sorted(c.procs.items())},
                "cpu_count": os.cpu_count(),
            },
            "projected": {
                "campaign_cts": CAMPAIGN_CTS,
                "gpu_seconds_per_ct": GPU_SECONDS_PER_CT,
                "gpu_source": "../shared/DESIGN.md: trio, bf16, overlap 0.75, H200, 266x266x250 CT (not measured here)",
                "cpu_scale_by_voxels": round(scale, 2),
                "cores_per_node": args.cores_per_node,
                "assumption": "non-GPU stages' CPU-s scale with voxels; CPU pool = nodes x cores_per_node "
                "shared by the non-GPU stages; the stages overlap as a pipeline",
                "by_nodes": projections,
            },
        }
    finally:
        for thing in reversed(stack):
            try:
                thing.stop()
            except Exception as e:  # noqa: BLE001 - stop what else can be stopped
                log(f"stop failed: {e}", quiet)
        if args.keep_state:
            log(f"state kept in {state}", quiet)
        else:
            shutil.rmtree(state, ignore_errors=True)


def print_text(res: dict[str, Any]) -> None:
    m, p = res["measured"], res["projected"]
    print("MEASURED (this machine, CPU; PostgreSQL 15 + moto S3 on loopback)")
    print(f"  replicas: {m['replicas']}; killed: {', '.join(m['killed']) or 'none'}")
    print(f"  study: {m['study']['instances']} CT instances, {m['study']['voxels']} voxels")
    print(
        f"  studies sent {m['studies_sent']}, completed {m['studies_completed']}, lost {m['lost']}, "
        f"duplicated {m['duplicated']}, failed jobs {m['failed_jobs']}"
    )
    print(
        f"  segmentation jobs {m['segmentation_jobs']}, AI label versions {m['ai_label_versions']}, "
        f"jobs run more than once {m['segmentation_jobs_retried']}, send retries {m['send_retries']}"
    )
    print(f"  wall {m['wall_s']} s (first send -> last completion), {m['studies_per_hour']} studies/hour")
    print("  stage latency, median s (services' timestamps):")
    for k, v in m["stage_latency_s"].items():
        print(f"    {k:28s} {v:8.2f}")
    print("  CPU-s per study (all replicas, idle rate subtracted; gross in brackets):")
    for k, v in m["cpu_s_per_study"].items():
        print(f"    {k:28s} {v:8.2f}  ({m['cpu_s_per_study_gross'][k]:.2f})")
    print(f"  CPU-s by process (this incarnation): {m['cpu_s_by_process']}")
    for d in m["duplicates"]:
        print(f"  DUPLICATE {d}")
    for case in m["lost_cases"]:
        print(f"  LOST {case}")
    print(f"PROJECTED ({p['campaign_cts']} CTs; GPU {p['gpu_seconds_per_ct']} s/CT from {p['gpu_source']};")
    print(f"  CPU-s x {p['cpu_scale_by_voxels']} by voxels; {p['cores_per_node']} cores/node; {p['assumption']})")
    for row in p["by_nodes"]:
        print(
            f"  {row['gpu_nodes']:3d} GPU nodes: {row['hours']:7.2f} h  (GPU stage {row['gpu_stage_hours']} h, "
            f"CPU stages {row['cpu_stages_hours']} h) bottleneck: {row['bottleneck']}"
        )
        print(f"        cores each non-GPU stage needs to keep pace with the GPUs: {row['cores_to_keep_pace']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--replicas", type=int, default=2, help="replicas of ingest, ranking, labels (and segmentation)")
    ap.add_argument("--seg-replicas", type=int, help="segmentation replicas (default --replicas)")
    ap.add_argument("--kill", action="store_true", help="SIGKILL replica 0 of every service mid-flow, restart it")
    ap.add_argument(
        "--kill-at",
        choices=["first-job", "first-done"],
        default="first-job",
        help="kill once every study is sent and the first segmentation job exists (series still assembling, "
        "jobs running) or the first study completed",
    )
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (progress stays on stderr)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--slices", type=int, default=48, help="axial slices of each study (the example CT has 112)")
    ap.add_argument("--quiet-period", type=float, default=2.0)
    ap.add_argument("--lease-s", type=float, default=20.0, help="ingest assembly claim and segmentation job lease")
    ap.add_argument("--postgres-admin-url", default="", help="use this PostgreSQL (databases are created in it)")
    ap.add_argument("--blob-url", default="", help="use this s3://bucket/prefix (credentials: boto3's chain)")
    ap.add_argument("--s3-endpoint", default="")
    ap.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    ap.add_argument("--cores-per-node", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--poll", type=float, default=2.0)
    ap.add_argument("--idle-window", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--keep-state", action="store_true")
    args = ap.parse_args()
    args.seg_replicas = args.seg_replicas or args.replicas
    if args.replicas < 1 or args.seg_replicas < 1 or args.studies < 1:
        ap.error("--studies, --replicas and --seg-replicas must be >= 1")
    res = run(args)
    if args.json:
        print(json.dumps({**res["measured"], **{"projected": res["projected"]}}, indent=2))
    else:
        print_text(res)
    m = res["measured"]
    return 0 if m["lost"] == 0 and m["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
