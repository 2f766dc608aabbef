"""The `atlasflow` command.

atlasflow serve {ingest,segmentation,ranking,labels,gateway,triton}   run one service (foreground)
atlasflow up [--state-dir DIR] [--auto-ports]                   start everything locally
atlasflow down [--state-dir DIR]                                stop it
atlasflow status [--state-dir DIR]                              health of each process
atlasflow delete-study [--state-dir DIR] STUDY --reason R [--wait]   delete a study everywhere (admin)
atlasflow demo [--out DIR]                                      the end-to-end demo
atlasflow token --role ROLE --subject NAME [--ttl S]            a token the local stack accepts
atlasflow send DIR [--target HOST:PORT] [--commit] [--assign-uids] [--token-file F]  gRPC upload
atlasflow convert DICOM_DIR OUT.nii.gz                          DICOM series -> NIfTI (HU, RAS)
atlasflow retrieve ...                                          C-FIND + C-MOVE from a PACS
atlasflow triton-repo OUT_DIR                                   Triton model repository for the cluster
atlasflow rank ROOT --out OUT [--mode reference|enhanced]       offline attention + priority
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from atlasflow.cli import delete
from atlasflow.common.auth import ROLES

#: state directory of the local stack whose TLS the client commands use (default .atlasflow)
STATE_DIR_ENV = "ATLASFLOW_STATE_DIR"
SERVICES = ("ingest", "segmentation", "ranking", "labels", "gateway", "triton")
# Sub-commands implemented by a library module's own `main(argv) -> int` (its argparse owns
# the options): `atlasflow <name> ...` == `python -m <module> ...`.
DELEGATED = {
    "convert": ("atlasflow.ingest.convert", "DICOM series -> NIfTI with HU and RAS affine"),
    "retrieve": ("atlasflow.ingest.retrieve", "query/retrieve a study from a PACS (C-FIND + C-MOVE)"),
    "triton-repo": ("atlasflow.segmentation.triton_repo", "write a Triton model repository (Python backend + weights)"),
    "rank": ("atlasflow.ranking.offline", "offline attention maps + priority.csv"),
}


def _serve(name: str) -> None:
    """The launcher: run one service's `app.main` (or Triton's server) in this process."""
    if name == "ingest":
        from atlasflow.ingest.app import main as serve_ingest

        serve_ingest()
    elif name == "segmentation":
        from atlasflow.segmentation.app import main as serve_segmentation

        serve_segmentation()
    elif name == "ranking":
        from atlasflow.ranking.app import main as serve_ranking

        serve_ranking()
    elif name == "labels":
        from atlasflow.labels.app import main as serve_labels

        serve_labels()
    elif name == "gateway":
        from atlasflow.gateway.app import main as serve_gateway

        serve_gateway()
    else:
        from atlasflow.segmentation.triton_server import main as serve_triton

        sys.argv = [sys.argv[0], *sys.argv[3:]]
        serve_triton()


def _local_tls(state_dir: Path) -> None:
    """Client commands (send, retrieve) reach a stack started by `atlasflow up` in
    ``state_dir`` with its TLS (CA + the command line's certificate, from run/endpoints.json),
    unless ATLASFLOW_TLS_CA_FILE / _CERT_FILE / _KEY_FILE name other files."""
    from atlasflow.common.tls import install_local_stack_tls

    install_local_stack_tls(state_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=SERVICES)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    for name, help_ in (
        ("up", "start all services and Triton locally"),
        ("down", "stop the local services"),
        ("status", "show the health of the local services"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--state-dir", type=Path, default=Path(".atlasflow"))
        if name == "up":
            p.add_argument(
                "--auto-ports",
                action="store_true",
                help="pick free ports instead of the defaults (50051-50054, 11112, 8000-8002)",
            )
            p.add_argument(
                "--quiet-period",
                type=float,
                default=5.0,
                help="seconds without new instances before a series is assembled",
            )
            p.add_argument("--timeout", type=float, default=300.0)
            p.add_argument(
                "--accept-aet",
                default="STORESCU,ATLASDEMO",
                help="calling AE titles the DICOM SCP accepts, comma-separated (others are rejected)",
            )
    p = sub.add_parser("demo", help="end-to-end demo on the bundled CT")
    p.add_argument("--out", type=Path, default=Path("atlasflow-demo"))
    p.add_argument("--keep-running", action="store_true", help="leave the services up")
    p = sub.add_parser("token", help="print a token the local stack (atlasflow up) accepts")
    p.add_argument("--state-dir", type=Path, default=Path(".atlasflow"))
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--subject", required=True, help="who the token names (the principal of every action)")
    p.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    p = sub.add_parser("send", help="upload DICOM files over the gRPC streaming API")
    p.add_argument("directory", type=Path)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--commit", action="store_true", help="commit the series after upload")
    p.add_argument(
        "--assign-uids",
        action="store_true",
        help="derive stable Study/Series/SOP Instance UIDs for files whose UIDs are"
        " empty (de-identified exports); without it the server refuses them",
    )
    p.add_argument(
        "--token-file",
        default="",
        help="file holding the bearer token (role connector or admin); default $ATLASFLOW_TOKEN_FILE",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get(STATE_DIR_ENV, ".atlasflow")),
        help="TLS of the stack `atlasflow up` runs there (unless $ATLASFLOW_TLS_CA_FILE/_CERT_FILE/_KEY_FILE are set)",
    )
    delete.add_parser(sub)  # atlasflow delete-study (atlasflow.cli.delete)
    for name, (_module, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        _local_tls(Path(os.environ.get(STATE_DIR_ENV, ".atlasflow")))

        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        _serve(args.service)
        return 0
    if args.command == "delete-study":
        return delete.run(args)
    if args.command == "up":
        from atlasflow.cli.local import LocalDeployment

        aets = tuple(a.strip() for a in args.accept_aet.split(",") if a.strip())
        dep = LocalDeployment.create(
            args.state_dir, args.auto_ports, quiet_period_s=args.quiet_period, accepted_aets=aets
        )
        dep.start()
        dep.wait_healthy(args.timeout)
        print(json.dumps(dep.endpoints(), indent=2))
        print(f"review gateway: {dep.gateway_url()} (demo logins in {dep.auth_dir / 'demo-passwords.txt'})")
        return 0
    if args.command in ("down", "status"):
        from atlasflow.cli.local import START_ORDER, LocalDeployment

        if not (args.state_dir / "run" / "endpoints.json").exists():
            print(f"nothing running under {args.state_dir}", file=sys.stderr)
            return 1 if args.command == "status" else 0
        dep = LocalDeployment.load(args.state_dir)
        if args.command == "down":
            dep.stop()
            return 0
        ok = True
        for name in START_ORDER:
            healthy = dep.healthy(name)
            ok &= healthy
            print(f"{name:13s} {'SERVING' if healthy else 'DOWN'}")
        return 0 if ok else 1
    if args.command == "demo":
        from atlasflow.cli.demo import run_demo

        return run_demo(args.out, keep_running=args.keep_running)
    if args.command == "token":
        from atlasflow.common.auth import LocalIssuer

        auth_dir = args.state_dir / "auth"
        if not (auth_dir / LocalIssuer.KEY_FILE).exists():
            print(f"no local issuer under {auth_dir}: start the stack first (atlasflow up)", file=sys.stderr)
            return 1
        print(LocalIssuer.create_or_load(auth_dir).mint(args.subject, [args.role], ttl_s=args.ttl))
        return 0
    if args.command == "send":
        from atlasflow.ingest.client import UploadError, send_directory

        _local_tls(args.state_dir)

        try:
            from atlasflow.common.auth import TokenSource

            token = TokenSource(path=args.token_file) if args.token_file else None
            receipts = send_directory(
                args.directory, args.target, commit=args.commit, assign_uids=args.assign_uids, token=token
            )
        except UploadError as exc:
            print(f"atlasflow send: refused: {exc.reason}: {exc.message}", file=sys.stderr)
            if exc.reason == "MISSING_UID":
                print(
                    "hint: these files have empty Study/Series/SOP Instance UIDs; add"
                    " --assign-uids to derive stable UIDs on this machine",
                    file=sys.stderr,
                )
            return 1
        dups = sum(r.duplicate for r in receipts)
        conflicts = sum(r.conflict for r in receipts)
        print(f"{len(receipts)} instances durable ({dups} duplicates, {conflicts} conflicts)")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
