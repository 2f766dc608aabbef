"""The atlasflow wheel (what every image installs) ships the files `atlasflow triton-repo` reads.

The chart's Triton initContainer runs `atlasflow triton-repo /models --ensemble <version>` in the
segmentation image, whose atlasflow comes from `pip wheel .` over pyproject.toml, README.md and
services/ (deploy/*/Dockerfile). That command resolves the version to
`atlasflow/segmentation/ensembles/<version>.json` and copies the members' checkpoints it names
(`../weights/*.pt`): both must be inside the wheel, or the pod never starts. The wheel is built
here from a copy of exactly the Docker build context.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "charts" / "atlasflow" / "values.yaml").read_text())


def test_wheel_contains_the_served_ensemble_and_its_checkpoints(tmp_path: Path) -> None:
    ctx = tmp_path / "context"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, ctx / name)
    shutil.copytree(REPO / "services", ctx / "services", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("atlasflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "atlasflow/segmentation/triton_repo.py" in names

    versions = VALUES["triton"]["modelRepository"]["ensembles"] or [VALUES["segmentation"]["ensemble"]]
    missing = []
    for version in versions:
        member = f"atlasflow/segmentation/ensembles/{version}.json"
        if member not in names:
            missing.append(member)
            continue
        raw = json.loads(zipfile.ZipFile(wheel).read(member))
        for m in raw["members"]:
            if m.get("checkpoint"):
                path = posixpath.normpath(posixpath.join(posixpath.dirname(member), m["checkpoint"]))
                if path not in names:
                    missing.append(path)
    assert not missing, (
        f"the wheel lacks {missing}: `atlasflow triton-repo` fails in the images. pyproject.toml's "
        '[tool.setuptools.package-data] needs "atlasflow.segmentation" = ["ensembles/*.json", "weights/*"]'
    )
