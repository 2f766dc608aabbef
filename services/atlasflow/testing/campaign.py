"""The pure parts of `benchmarks/bench_campaign.py`: result accounting and the campaign projection.

`account` turns what the services list (ingest series, segmentation jobs, label versions,
worklist entries) into studies completed / lost / duplicated; `project` turns measured per-study
costs and the GPU figure of ../shared/DESIGN.md into hours for an 8,448-CT campaign on K GPU
nodes. No process, network or database here: tests/benchmarks/test_bench_campaign.py checks both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: ../shared/DESIGN.md "Performance anchors", GPU: the trio (U-Net, Swin UNETR, DynUNet) at the
#: reference overlap 0.75 in bf16 on one H200, one abdominal CT at 1.5 mm (266x266x250).
GPU_SECONDS_PER_CT = 11.4
#: AbdomenAtlas-8K
CAMPAIGN_CTS = 8448
#: voxels of the CT the GPU figure was measured on (266x266x250)
REFERENCE_CT_VOXELS = 266 * 266 * 250


@dataclass(frozen=True)
class JobRecord:
    """One segmentation job as ListSegmentationJobs reports it."""

    job_id: str
    case_id: str
    series_id: str
    series_version: int
    ensemble_version: str
    state: str  # "SUCCEEDED", "FAILED", "RUNNING", ...


@dataclass(frozen=True)
class VersionRecord:
    """One label version as ListLabelVersions reports it."""

    version_id: str
    case_id: str
    source: str  # "ai", "human", ...
    model_version: str
    job_id: str


@dataclass
class Accounting:
    sent: int
    completed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: "what: key" for every extra job or AI version (one line per duplicate beyond the first)
    duplicates: list[str] = field(default_factory=list)
    failed_jobs: int = 0

    @property
    def duplicated(self) -> int:
        return len(self.duplicates)


def account(
    sent_cases: Iterable[str],
    jobs: Iterable[JobRecord],
    versions: Iterable[VersionRecord],
    worklist_cases: Iterable[str],
) -> Accounting:
    """A study is completed when its case has an AI label version and a worklist entry; lost when
    it was sent and is not completed; a duplicate is a second (third...) segmentation job of one
    (series, series version, ensemble) or a second AI label version of one (case, model version)."""
    sent = list(dict.fromkeys(sent_cases))
    jobs = list(jobs)
    versions = list(versions)
    ranked = set(worklist_cases)
    ai_cases = {v.case_id for v in versions if v.source == "ai"}
    acc = Accounting(sent=len(sent))
    for case in sent:
        (acc.completed if case in ai_cases and case in ranked else acc.lost).append(case)
    job_keys = Counter((j.series_id, j.series_version, j.ensemble_version) for j in jobs)
    for key, n in sorted(job_keys.items()):
        acc.duplicates += [f"segmentation job: {key[0]} v{key[1]} {key[2]}"] * (n - 1)
    version_keys = Counter((v.case_id, v.model_version) for v in versions if v.source == "ai")
    for (case, model), n in sorted(version_keys.items()):
        acc.duplicates += [f"AI label version: {case} {model}"] * (n - 1)
    acc.failed_jobs = sum(1 for j in jobs if j.state == "FAILED")
    return acc


@dataclass(frozen=True)
class Projection:
    nodes: int
    cts: int
    gpu_hours: float  # wall hours of the GPU stage on `nodes` GPUs
    cpu_hours: dict[str, float]  # wall hours of each non-GPU stage on its share of the CPU pool
    hours: float  # the campaign: the slowest stage (the stages overlap, as a pipeline)
    bottleneck: str
    cores_needed: dict[str, float]  # cores each non-GPU stage needs to keep pace with the GPUs


def project(
    cpu_seconds_per_ct: Mapping[str, float],
    *,
    nodes: int,
    cores_per_node: int = 16,
    gpu_seconds_per_ct: float = GPU_SECONDS_PER_CT,
    cts: int = CAMPAIGN_CTS,
    scale: float = 1.0,
) -> Projection:
    """Hours of a `cts`-CT campaign on `nodes` GPU nodes (one GPU each) with `cores_per_node` CPU
    cores each for the non-GPU stages. ``cpu_seconds_per_ct``: measured CPU-seconds per study of
    each non-GPU stage (ingest, the segmentation service around Triton, ranking, labels); they are
    multiplied by ``scale`` (the voxel ratio of a campaign CT to the measured one: an assumption
    that these stages cost in proportion to voxels). The pool of ``nodes * cores_per_node`` cores
    is split between the stages in proportion to their cost (what autoscaled replicas would do),
    so every CPU stage takes the same hours, the total CPU work over the pool. The stages run as a
    pipeline: the campaign takes as long as its slowest stage."""
    if nodes < 1 or cores_per_node < 1:
        raise ValueError("nodes and cores_per_node must be >= 1")
    gpu_h = cts * gpu_seconds_per_ct / nodes / 3600.0
    pool = nodes * cores_per_node
    scaled = {k: max(0.0, v) * scale for k, v in cpu_seconds_per_ct.items()}
    total_cpu_s = sum(scaled.values())
    cpu_h_all = cts * total_cpu_s / pool / 3600.0
    cpu_h = {k: (cpu_h_all if total_cpu_s else 0.0) for k in scaled}
    gpu_s_total = gpu_h * 3600.0
    cores = {k: (cts * v / gpu_s_total if gpu_s_total else float("inf")) for k, v in scaled.items()}
    if gpu_h >= cpu_h_all:
        bottleneck, hours = "GPU (segmentation models)", gpu_h
    else:
        top = max(scaled, key=lambda k: scaled[k])
        bottleneck, hours = f"CPU (non-GPU stages; the largest: {top})", cpu_h_all
    return Projection(nodes, cts, gpu_h, cpu_h, hours, bottleneck, cores)
