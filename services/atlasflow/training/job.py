"""The container entry point of a Kubernetes training Job (no grpc):
``torchrun --standalone --nnodes=1 --nproc_per_node=<gpus> -m atlasflow.training.job --run-id R
--manifest M --blobs B --run-dir D --ensemble E --device cuda`` (what `jobs_k8s.build_job` writes
for the training service's ``RUNNER=kubernetes``).

Each torchrun rank (``RANK`` / ``WORLD_SIZE``; one process without torchrun) fine-tunes its share
of the members (rank r: members r, r + world, ...) on ``cuda:<LOCAL_RANK>`` with
`atlasflow.training.finetune.finetune_member`: member-parallel, no gradient exchange. It is
resumable: a retried pod (the Job's ``backoffLimit``) or a second Job of the same run and
manifest resumes each member from its checkpoint on the state volume, and a member whose
``result.json`` already names its weights is not trained again.

What the training service reads back (all on the shared state volume, no API or database access
from the pod): per member ``<run-dir>/<member>/log.jsonl`` (one line per step: the progress) and,
when the member is done, ``<run-dir>/<member>/result.json`` (member, digest of ``weights.pt``,
steps, final loss, seconds, resumed_from, run id), written atomically after the weights.
``--blobs``: a directory (the blob PVC) or a blob URL (``s3://bucket/prefix``; endpoint, region
and addressing style from ``ATLASFLOW_TRAINING_BLOB_S3_*``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlasflow.common.blobstore import S3Options, open_blob_store
from atlasflow.training.dataset import atomic_write
from atlasflow.training.finetune import MemberResult, finetune_member, sha256_file, this_ranks_share, trainer_arguments

RESULT = "result.json"


def result_doc(result: MemberResult, run_id: str) -> dict[str, Any]:
    return {
        "member": result.member,
        "digest": result.digest,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 3),
        "resumed_from": result.resumed_from,
        "run_id": run_id,
    }


def read_result(run_dir: Path, member: str) -> dict[str, Any] | None:
    """A member's ``result.json`` when it exists and its weights still have that digest."""
    path = run_dir / member / RESULT
    weights = run_dir / member / "weights.pt"
    if not path.is_file() or not weights.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("digest") != sha256_file(weights):
        return None
    return doc


def _s3_from_env() -> S3Options:
    env = os.environ.get
    return S3Options(
        endpoint_url=env("ATLASFLOW_TRAINING_BLOB_S3_ENDPOINT_URL", ""),
        region=env("ATLASFLOW_TRAINING_BLOB_S3_REGION", ""),
        addressing_style=env("ATLASFLOW_TRAINING_BLOB_S3_ADDRESSING_STYLE", "auto"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = trainer_arguments(
        "python -m atlasflow.training.job", "blob store directory or s3:// URL", __doc__.split("\n")[0]
    )
    parser.add_argument("--run-id", required=True, help="the training service's run id")
    args = parser.parse_args(argv)
    manifest, digest, members, device = this_ranks_share(args)
    blobs = open_blob_store(args.blobs, _s3_from_env())
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    for member in members:
        done = read_result(run_dir, member.name)
        if done is not None and done.get("run_id") == args.run_id:
            print(json.dumps({**done, "rank": rank, "skipped": True}), flush=True)
            continue
        result = finetune_member(member, manifest, digest, blobs, run_dir, device=device)
        doc = result_doc(result, args.run_id)
        atomic_write(run_dir / member.name / RESULT, (json.dumps(doc) + "\n").encode())
        print(json.dumps({**doc, "rank": rank}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
