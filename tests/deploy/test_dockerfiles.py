"""Static checks of the Dockerfiles in deploy/ (no container engine on this machine, so the
images cannot be built here; see deploy/README.md).

Each image must match the chart that runs it: entrypoint, exposed ports, non-root uid 10001,
pinned base images, and build inputs that exist in the repository and pass the ignore file.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VALUES = yaml.safe_load((REPO / "charts" / "atlasflow" / "values.yaml").read_text())
SERVICES = ("ingest", "segmentation", "ranking", "labels")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined and comment
    lines dropped (as Docker's parser does)."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling continuation"
    return out


def final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    return ins[starts[-1] :]


def build_args(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)


def chart_ports(component: str) -> set[int]:
    v = VALUES[component]
    if component == "triton":
        return set(v["ports"].values())
    if component == "gateway":
        return {v["http"]["port"], v["metrics"]["port"]}
    ports = {v["grpc"]["port"], v["metrics"]["port"]}
    if component == "ingest":
        ports.add(v["dicom"]["port"])
    return ports


def ignored(patterns: list[str], rel: str) -> bool:
    """Docker ignore semantics (last matching pattern wins, '!' re-includes, a directory
    pattern covers its contents)."""
    result = False
    parts = rel.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            result = not neg
    return result


@pytest.mark.parametrize("component", (*SERVICES, "gateway", "triton", "training"))
def test_dockerfile_matches_chart(component: str) -> None:
    path = DEPLOY / component / "Dockerfile"
    ins = instructions(path)
    args = build_args(ins)
    final = final_stage(ins)

    # base images pinned to a version, never latest
    for op, a in ins:
        if op == "FROM":
            image = a.split()[0]
            image = args.get(image.strip("${}"), image) if image.startswith("$") else image
            if ":" not in image:  # a previous stage's name
                continue
            assert not image.endswith(":latest"), image
    # non-root uid/gid 10001 in the final stage, set after the last RUN
    users = [a for op, a in final if op == "USER"]
    assert users and users[-1] == "10001:10001", users
    last_run = max(i for i, (op, _) in enumerate(final) if op == "RUN")
    last_user = max(i for i, (op, _) in enumerate(final) if op == "USER")
    assert last_user > last_run
    # entrypoint and ports agree with the chart
    (entry,) = [json.loads(a) for op, a in final if op == "ENTRYPOINT"]
    exposed = {int(p) for op, a in final if op == "EXPOSE" for p in a.split()}
    assert exposed == chart_ports(component)
    if component == "triton":
        # tritonserver serving the volume the chart mounts at modelRepository.path; the image
        # bakes in no repository (the chart's initContainer writes it, test_chart_triton.py)
        assert entry == ["tritonserver"]
        (cmd,) = [json.loads(a) for op, a in final if op == "CMD"]
        assert cmd == [f"--model-repository={VALUES['triton']['modelRepository']['path']}"]
        assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:24\.\d\d-py3", args["TRITON_IMAGE"])
        assert not [a for op, a in final if op == "COPY" and "/models" in a]
        # what the generated model.py imports is installed into the stub's interpreter
        (check,) = [a for op, a in final if op == "RUN" and "python3 -m pip install" in a]
        assert "import numpy, torch, monai, atlasflow.segmentation.triton_repo" in check
    else:
        assert entry == ["atlasflow", "serve", component]
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    if component == "gateway":
        # the review app is built in a node stage as scripts/bootstrap.sh builds it, from the
        # committed lock file, and served from the folder WEB_DIR names
        assert re.fullmatch(r"node:\d+(\.\d+)*-bookworm-slim", args["NODE_IMAGE"])
        runs = [a for op, a in ins if op == "RUN"]
        assert any("npm ci" in a for a in runs) and any("npm run build" in a for a in runs)
        bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
        assert "npm ci" in bootstrap and "npm run --silent build" in bootstrap
        copies = [a for op, a in final if op == "COPY"]
        assert any("--from=web /web/build/" in a for a in copies)
        envs = " ".join(a for op, a in final if op == "ENV")
        assert "ATLASFLOW_GATEWAY_WEB_DIR=/srv/web" in envs


@pytest.mark.parametrize("component", (*SERVICES, "gateway", "triton", "training"))
def test_build_context_inputs_exist_and_are_not_ignored(component: str) -> None:
    path = DEPLOY / component / "Dockerfile"
    ignore = [
        ln.strip()
        for ln in (path.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = []
    for op, a in instructions(path):
        if op == "COPY" and "--from=" not in a:
            words = [w for w in a.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for src in sources:
        rel = src.rstrip("/")
        assert (REPO / rel).exists(), f"{component}: COPY source {rel} is missing from the repository"
        assert not ignored(ignore, rel), f"{component}: {rel} is excluded by Dockerfile.dockerignore"
    assert ignored(ignore, ".venv/bin/python") and ignored(ignore, ".tools/helm")
    # the wheel needs every package in pyproject's package-dir
    assert "services/" in sources or "services" in sources


def test_training_image_runs_the_service_and_the_jobs_trainer() -> None:
    """The chart's training image (training.image, and the Job's by default) holds the service
    (the ENTRYPOINT, checked above) and the fine-tune Job's trainer: the Job's container command
    (the product's own `build_job`) replaces the ENTRYPOINT with torchrun, which the build checks
    along with both entry points' imports; CPU torch by default, the CUDA index by build arg."""
    from atlasflow.training.jobs_k8s import JobSettings, build_job

    assert VALUES["training"]["image"]["repository"] == "atlasflow/training"
    ins = instructions(DEPLOY / "training" / "Dockerfile")
    final = final_stage(ins)
    args = build_args(final)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert (
        build_args(instructions(DEPLOY / "segmentation" / "Dockerfile"))["TORCH_INDEX_URL"] == args["TORCH_INDEX_URL"]
    )
    (install,) = [a for op, a in final if op == "RUN" and "pip install" in a]
    assert '--extra-index-url "$TORCH_INDEX_URL"' in install
    assert "[cluster]" in install  # the kubernetes client of the runner (pyproject's extra)
    job = build_job(
        JobSettings(namespace="ns", image="atlasflow/training:0.1.0", state_pvc="state", blob_pvc="blobs", gpus=2),
        "sha256:" + "ab" * 32,
        "abdomen-trio-v1",
        run_id="tr-1",
    )
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    module = command[command.index("-m") + 1]
    assert command[0] == "torchrun" and module == "atlasflow.training.job"
    assert f"{command[0]} --help" in install
    assert "atlasflow.training.job" in install and "import kubernetes" in install
    assert "atlasflow.training.app" in install and "atlasflow.training.k8s_runner" in install
    # a GPU pod gets libcuda only with the "compute" driver capability (the slim base sets none)
    envs = " ".join(a for op, a in final if op == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in envs
    # the Job pod runs as the image's user (uid 10001 owns nothing else it needs)
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
