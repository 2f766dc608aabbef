"""The review loop from the command line, against a real local stack (Triton with the demo
ensemble, ingest, segmentation, labels, ranking; the way `atlasflow up` starts them), each
command run as a user runs it (`python -m atlasflow.cli.main ...`, a subprocess):

send the bundled CT -> `worklist --json` lists the case -> `lease` (a second reviewer is
refused, --renew, --release, --next) -> `review` with a mask off the grid is refused before
anything is sent -> `review --revise liver=mask.nii.gz` makes a version that changes exactly
those voxels (read back with `versions` and labels GetLabelVersion) -> `export --wait` writes
the dataset. Without a token every command exits 4.

One stack serves the module (Triton start-up and the CPU inference dominate the cost).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from atlasflow.cli.demo import wait_for_pipeline
from atlasflow.cli.demo_series import DEFAULT_DEMO_NIFTI, write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes, to_nifti_bytes
from atlasflow.common.organs import ORGAN_IDS
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.e2e

NAMES = ["triton", "labels", "ranking", "segmentation", "ingest"]
LIVER = ORGAN_IDS["liver"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    dep = LocalDeployment.create(tmp_path_factory.mktemp("loop"), auto_ports=True, quiet_period_s=1.0)
    dep.start(NAMES)
    try:
        dep.wait_healthy(600, NAMES)
        yield dep
    finally:
        dep.stop(names=NAMES)


@pytest.fixture(scope="module")
def tokens(stack: LocalDeployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tokens")
    out = {}
    for name, role in (("dr.a", "reviewer"), ("dr.b", "reviewer"), ("admin", "admin"), ("connector", "connector")):
        out[name] = d / f"{name}.token"
        out[name].write_text(stack.mint(role, name))
    return out


def cli(stack: LocalDeployment, *args: str, token: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``atlasflow ARGS`` as a user runs it: the stack from ATLASFLOW_STATE_DIR, the token from
    ATLASFLOW_TOKEN_FILE (none when ``token`` is None: the test session's own is removed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATLASFLOW_TLS_", "ATLASFLOW_TOKEN_FILE"))}
    env["ATLASFLOW_STATE_DIR"] = str(stack.state_dir)
    if token is not None:
        env["ATLASFLOW_TOKEN_FILE"] = str(token)
    return subprocess.run(
        [sys.executable, "-m", "atlasflow.cli.main", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def case_id(stack: LocalDeployment, tokens: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled CT sent with `atlasflow send --commit`, segmented, labelled and ranked."""
    files = write_demo_series(DEFAULT_DEMO_NIFTI, tmp_path_factory.mktemp("dicom"))
    sent = cli(
        stack, "send", str(files[0].parent), "--commit", "--target", stack.target("ingest"), token=tokens["connector"]
    )
    assert sent.returncode == 0, sent.stderr
    assert f"{len(files)} instances durable" in sent.stdout
    case, _job = wait_for_pipeline(stack, timeout_s=1200)
    return case


def _labels(stack: LocalDeployment) -> labels_pb2_grpc.LabelServiceStub:
    return labels_pb2_grpc.LabelServiceStub(stack.channel("labels", token=stack.token_source("admin", "test")))


def _versions(stack: LocalDeployment, case: str) -> list[labels_pb2.LabelVersion]:
    return list(_labels(stack).ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=case)).versions)


def test_without_a_token_every_loop_command_exits_4(stack: LocalDeployment, case_id: str, tmp_path: Path) -> None:
    for args in (["worklist"], ["lease", case_id], ["versions", case_id], ["review", case_id, "--accept", "liver"]):
        run = cli(stack, *args)
        assert run.returncode == 4, (args, run.stdout, run.stderr)
        assert "UNAUTHENTICATED" in run.stderr and "--token-file" in run.stderr, run.stderr
    # a role that may not: a connector reading the worklist
    token = tmp_path / "c.token"
    token.write_text(stack.mint("connector", "pacs"))
    run = cli(stack, "worklist", token=token)
    assert run.returncode == 4 and "PERMISSION_DENIED" in run.stderr, run.stderr


def test_worklist_json_lists_the_case_with_per_organ_reasons(
    stack: LocalDeployment, tokens: dict[str, Path], case_id: str
) -> None:
    run = cli(stack, "worklist", "--json", token=tokens["dr.a"])
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    (item,) = [i for i in doc["items"] if i["case_id"] == case_id]
    assert doc["total_size"] >= 1 and item["rank"] == 1 and item["status"] == "pending"
    assert item["organs"] and all(isinstance(o["reasons"], list) for o in item["organs"])
    assert any(o["reasons"] for o in item["organs"])
    table = cli(stack, "worklist", "--status", "pending", token=tokens["dr.a"])
    assert table.returncode == 0 and case_id in table.stdout and "priority" in table.stdout
    assert "\x1b[" not in table.stderr  # no progress bar or colour when not a terminal


def test_lease_second_reviewer_renew_release_next(
    stack: LocalDeployment, tokens: dict[str, Path], case_id: str
) -> None:
    got = cli(stack, "lease", case_id, "--json", token=tokens["dr.a"])
    assert got.returncode == 0, got.stderr
    (item,) = json.loads(got.stdout)["items"]
    assert item["status"] == "leased" and item["lease"]["reviewer"] == "dr.a"
    taken = cli(stack, "lease", case_id, token=tokens["dr.b"])
    assert taken.returncode == 7 and "LEASE_HELD_BY_OTHER" in taken.stderr, taken.stderr
    # a review needs the caller's lease (labels asks ranking): dr.b's is refused, nothing written
    head = _versions(stack, case_id)[0].version_id
    sneaky = cli(stack, "review", case_id, "--accept", "liver", token=tokens["dr.b"])
    assert sneaky.returncode == 7 and "LEASE_NOT_HELD" in sneaky.stderr, sneaky.stderr
    assert f"atlasflow lease {case_id}" in sneaky.stderr
    assert _versions(stack, case_id)[0].version_id == head
    renewed = cli(stack, "lease", "--renew", "--minutes", "30", "--json", token=tokens["dr.a"])
    assert renewed.returncode == 0, renewed.stderr
    assert [i["case_id"] for i in json.loads(renewed.stdout)["items"]] == [case_id]
    released = cli(stack, "lease", "--release", case_id, token=tokens["dr.a"])
    assert released.returncode == 0 and "pending" in released.stdout, released.stdout + released.stderr
    # --next needs an open round (an admin starts it)
    ranking = ranking_pb2_grpc.RankingServiceStub(stack.channel("ranking", token=stack.token_source("admin", "op")))
    ranking.StartRound(ranking_pb2.StartRoundRequest(budget_fraction=1.0, request_id="cli-loop-round"))
    nxt = cli(stack, "lease", "--next", "--json", token=tokens["dr.a"])
    assert nxt.returncode == 0, nxt.stderr
    assert json.loads(nxt.stdout)["items"][0]["case_id"] == case_id


def test_review_refuses_a_mask_off_the_grid_before_sending(
    stack: LocalDeployment, tokens: dict[str, Path], case_id: str, tmp_path: Path
) -> None:
    head = _versions(stack, case_id)[0]
    shape = tuple(head.geometry.shape)
    affine = np.asarray(head.geometry.affine).reshape(4, 4)
    wrong_shape = tmp_path / "shape.nii.gz"
    wrong_shape.write_bytes(to_nifti_bytes(np.zeros((shape[0], shape[1], shape[2] + 1), np.uint8), affine))
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    wrong_affine = tmp_path / "affine.nii.gz"
    wrong_affine.write_bytes(to_nifti_bytes(np.zeros(shape, np.uint8), shifted))
    blobs_before = sorted(p.name for p in stack.blob_dir.rglob("*") if p.is_file())
    for path, message in ((wrong_shape, "has shape"), (wrong_affine, "another affine")):
        run = cli(stack, "review", case_id, "--revise", f"liver={path}", token=tokens["dr.a"])
        assert run.returncode == 6, run.stdout + run.stderr
        assert message in run.stderr and "not resampled" in run.stderr, run.stderr
    assert [v.version_id for v in _versions(stack, case_id)][0] == head.version_id  # nothing sent
    assert sorted(p.name for p in stack.blob_dir.rglob("*") if p.is_file()) == blobs_before  # nothing stored


def test_review_revise_changes_exactly_the_masks_voxels(
    stack: LocalDeployment, tokens: dict[str, Path], case_id: str, tmp_path: Path
) -> None:
    cli(stack, "lease", case_id, token=tokens["dr.a"])  # held already (test above): renews
    head = _versions(stack, case_id)[0]
    old, affine = from_nifti_bytes(LocalBlobStore(stack.blob_dir).get(head.label_map.digest))
    liver = old == LIVER
    mask = liver.copy()
    inside = np.argwhere(liver)[:25]  # 25 liver voxels removed
    background = old == 0
    outside = np.argwhere(background)[:: max(1, int(background.sum()) // 40)][:40]  # 40 background voxels added
    mask[tuple(inside.T)] = False
    mask[tuple(outside.T)] = True
    path = tmp_path / "liver_fixed.nii.gz"
    path.write_bytes(to_nifti_bytes(mask.astype(np.uint8), affine))
    run = cli(
        stack, "review", case_id, "--revise", f"liver={path}", "--accept", "spleen", "--json", token=tokens["dr.a"]
    )
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(run.stdout)
    assert doc["version"]["parent_version_id"] == head.version_id
    assert doc["item"]["status"] == "revised"
    # read back: `versions` lists it first, with dr.a as the author of the liver and the spleen
    listed = cli(stack, "versions", case_id, "--json", token=tokens["dr.a"])
    assert listed.returncode == 0, listed.stderr
    newest = json.loads(listed.stdout)["versions"][0]
    assert newest["version_id"] == doc["version"]["version_id"] and newest["author"] == "dr.a"
    assert newest["organ_authors"]["liver"] == "dr.a" and newest["organ_authors"]["spleen"] == "dr.a"
    table = cli(stack, "versions", case_id, token=tokens["dr.a"])
    assert table.returncode == 0 and head.version_id in table.stdout
    # ... and labels GetLabelVersion: the label map changed exactly where the mask differs
    version = _labels(stack).GetLabelVersion(labels_pb2.GetLabelVersionRequest(version_id=newest["version_id"])).version
    new, new_affine = from_nifti_bytes(LocalBlobStore(stack.blob_dir).get(version.label_map.digest))
    assert np.allclose(new_affine, affine, atol=1e-4)
    expected = np.where(mask, LIVER, np.where(liver, 0, old))
    assert np.array_equal(new, expected)
    changed = new != old
    assert changed.sum() == len(inside) + len(outside)


def test_export_wait_writes_the_dataset(stack: LocalDeployment, tokens: dict[str, Path], case_id: str) -> None:
    dest = stack.state_dir / "exports" / "ds1"
    run = cli(stack, "export", "--dest", str(dest), "--wait", "--json", token=tokens["admin"])
    assert run.returncode == 0, run.stdout + run.stderr
    job = json.loads(run.stdout)["job"]
    assert job["state"] == "succeeded" and job["cases_done"] == job["cases_total"] >= 1
    manifest = json.loads((dest / "manifest.json").read_text())
    case_dir = dest / manifest["cases"][0]["case"]  # de-identified: the case's pseudonym
    assert (case_dir / "ct.nii.gz").is_file() and (case_dir / "combined_labels.nii.gz").is_file()
    exported, _ = from_nifti_bytes((case_dir / "combined_labels.nii.gz").read_bytes())
    head = _versions(stack, case_id)[0]
    stored, _ = from_nifti_bytes(LocalBlobStore(stack.blob_dir).get(head.label_map.digest))
    assert np.array_equal(exported, stored)  # the reviewed version is what the dataset holds
    # a reviewer may not export
    denied = cli(stack, "export", "--dest", str(dest.parent / "ds2"), token=tokens["dr.a"])
    assert denied.returncode == 4 and "PERMISSION_DENIED" in denied.stderr, denied.stderr
