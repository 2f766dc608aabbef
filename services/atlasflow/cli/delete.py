"""`atlasflow delete-study`: delete a study everywhere (ingest's DeleteStudy, role admin) and
follow its progress (GetDeletion).

    atlasflow token --state-dir .atlasflow --role admin --subject me > admin.token
    atlasflow delete-study --state-dir .atlasflow --token-file admin.token 1.2.840.113619.2.55 \\
        --reason "consent withdrawn, ticket 4711" --wait

STUDY is a StudyInstanceUID or an atlasflow case id (``case-…``, as ListSeries shows it). The
token comes from --token-file or ``ATLASFLOW_TOKEN_FILE``; the ingest address from the stack in
--state-dir (or --target).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from atlasflow.cli.exitcodes import ExitCode, exit_code_for
from atlasflow.common.v1 import common_pb2
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc

DONE = common_pb2.OPERATION_STATE_SUCCEEDED


def add_parser(sub: Any) -> None:
    p = sub.add_parser("delete-study", help="delete a study everywhere (admin): DeleteStudy, then its progress")
    p.add_argument("study", help="StudyInstanceUID, or an atlasflow case id (case-...)")
    p.add_argument("--reason", required=True, help="why (kept with the operation; no patient data)")
    p.add_argument("--state-dir", type=Path, default=Path(".atlasflow"))
    p.add_argument("--target", default="", help="ingest host:port (default: the stack in --state-dir)")
    p.add_argument("--token-file", type=Path, default=None, help="an admin's token (default ATLASFLOW_TOKEN_FILE)")
    p.add_argument("--wait", action="store_true", help="follow the progress until every service is done")
    p.add_argument("--timeout", type=float, default=600.0, help="with --wait: give up after this many seconds")


def describe(d: ingest_pb2.Deletion) -> str:
    state = common_pb2.OperationState.Name(d.state).removeprefix("OPERATION_STATE_").lower()
    parts = []
    for s in d.steps:
        mark = "done" if s.state == DONE else ("waiting: " + s.last_error if s.last_error else "queued")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()) if v)
        parts.append(f"  {s.service:<13} {mark}{'  (' + counts + ')' if counts else ''}")
    return f"deletion {d.deletion_id} of {d.case_id}: {state}\n" + "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from atlasflow.common.auth import TokenSource
    from atlasflow.common.clients import sync_channel
    from atlasflow.common.tls import install_local_stack_tls

    install_local_stack_tls(args.state_dir)
    target = args.target
    if not target:
        from atlasflow.cli.local import LocalDeployment

        target = LocalDeployment.load(args.state_dir).target("ingest")
    token = TokenSource(path=args.token_file) if args.token_file else None
    stub = ingest_pb2_grpc.IngestServiceStub(sync_channel(target, token=token))
    request = ingest_pb2.DeleteStudyRequest(reason=args.reason)
    if args.study.startswith("case-"):
        request.case_id = args.study
    else:
        request.study_instance_uid = args.study
    try:
        deletion = stub.DeleteStudy(request, timeout=120).deletion
        print(describe(deletion), flush=True)
        deadline = time.monotonic() + args.timeout
        while args.wait and deletion.state != DONE:
            if time.monotonic() > deadline:
                print("atlasflow delete-study: still running; follow it again later", file=sys.stderr)
                return ExitCode.TIMEOUT
            time.sleep(2.0)
            latest = stub.GetDeletion(ingest_pb2.GetDeletionRequest(deletion_id=deletion.deletion_id), timeout=30)
            if latest.deletion != deletion:
                print(describe(latest.deletion), flush=True)
            deletion = latest.deletion
    except grpc.RpcError as exc:
        print(f"atlasflow delete-study: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return exit_code_for(exc.code())
    return 0
