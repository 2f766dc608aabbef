"""The `atlasflow` command (Click).

atlasflow serve {ingest,segmentation,ranking,labels,training,gateway,triton}   run one service (foreground)
atlasflow up [--state-dir DIR] [--auto-ports]                   start everything locally
atlasflow down [--state-dir DIR]                                stop it
atlasflow status [--state-dir DIR]                              health of each process
atlasflow delete-study [--state-dir DIR] STUDY --reason R [--wait]   delete a study everywhere (admin)
atlasflow demo [--out DIR]                                      the end-to-end demo
atlasflow token --role ROLE --subject NAME [--ttl S]            a token the local stack accepts
atlasflow send DIR [--target HOST:PORT] [--commit] [--assign-uids] [--token-file F]  gRPC upload
atlasflow worklist | lease | review | versions | export         the review loop (cli/review.py)
atlasflow convert DICOM_DIR OUT.nii.gz                          DICOM series -> NIfTI (HU, RAS)
atlasflow retrieve ...                                          C-FIND + C-MOVE from a PACS
atlasflow triton-repo OUT_DIR                                   Triton model repository for the cluster
atlasflow rank ROOT --out OUT [--mode reference|enhanced]       offline attention + priority
atlasflow db upgrade --service ranking [--url URL]              apply a service's schema migrations

Exit codes: atlasflow.cli.exitcodes (0 ok, 1 failure, 2 usage, 3 not found, 4 permission,
5 unavailable, 6 invalid input, 7 conflict, 8 timeout).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click
import grpc

from atlasflow.cli import delete, review
from atlasflow.cli.exitcodes import CliError, ExitCode, rpc_error
from atlasflow.cli.stack import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    progress,
    progress_enabled,
    state_dir_option,
    token_file_option,
)
from atlasflow.common.auth import ROLES

SERVICES = ("ingest", "segmentation", "ranking", "labels", "training", "gateway", "triton")
# Sub-commands implemented by a library module's own `main(argv) -> int` (its argparse owns
# the options): `atlasflow <name> ...` == `python -m <module> ...`.
DELEGATED = {
    "convert": ("atlasflow.ingest.convert", "DICOM series -> NIfTI with HU and RAS affine"),
    "retrieve": ("atlasflow.ingest.retrieve", "query/retrieve a study from a PACS (C-FIND + C-MOVE)"),
    "triton-repo": ("atlasflow.segmentation.triton_repo", "write a Triton model repository (Python backend + weights)"),
    "rank": ("atlasflow.ranking.offline", "offline attention maps + priority.csv"),
}
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 permission (no/invalid token, role),
5 unavailable (stack not running), 6 invalid input, 7 conflict (lease held, newer version),
8 timeout (a --wait gave up; the work goes on).
"""


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
    elif name == "training":
        from atlasflow.training.app import main as serve_training

        serve_training()
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


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
def cli() -> None:
    """atlasflow: DICOM in, segmentation, attention ranking, review, labelled dataset out.

    \b
    Examples:
      atlasflow up --state-dir .atlasflow            start the stack locally
      atlasflow token --role reviewer --subject me > me.token
      atlasflow worklist --token-file me.token       the ranked cases
      atlasflow demo --out demo                      the whole pipeline on the bundled CT

    Run `atlasflow COMMAND --help` for a command's options and examples.
    """
    # A command may point ATLASFLOW_TLS_* at a local stack's TLS for its own calls: put them
    # back when it ends, so an in-process caller (CliRunner, the demo) inherits nothing.
    click.get_current_context().call_on_close(_restore_tls_env(_tls_env()))


# ----------------------------------------------------------------------------- the stack


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="""\b
Examples:
  atlasflow serve labels          (settings from ATLASFLOW_LABELS_* variables)
  atlasflow serve triton --ensemble abdomen-trio-v1 --grpc-port 8001
""",
)
@click.argument("service", type=click.Choice(SERVICES))
@click.argument("rest", nargs=-1, type=click.UNPROCESSED)
def serve(service: str, rest: tuple[str, ...]) -> int:
    """Run one service in the foreground (what `atlasflow up` and the images start)."""
    _serve(service)
    return 0


@cli.command(
    epilog="""\b
Examples:
  atlasflow up                                  default ports, state in .atlasflow
  atlasflow up --state-dir /tmp/af --auto-ports
"""
)
@state_dir_option()
@click.option(
    "--auto-ports", is_flag=True, help="pick free ports instead of the defaults (50051-50054, 11112, 8000-8002)"
)
@click.option(
    "--quiet-period",
    type=float,
    default=5.0,
    show_default=True,
    help="seconds without new instances before a series is assembled",
)
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="seconds to wait for every process to be healthy"
)
@click.option(
    "--accept-aet",
    default="STORESCU,ATLASDEMO",
    show_default=True,
    help="calling AE titles the DICOM SCP accepts, comma-separated (others are rejected)",
)
def up(state_dir: Path, auto_ports: bool, quiet_period: float, timeout: float, accept_aet: str) -> int:
    """Start all services and Triton locally (child processes; state in --state-dir)."""
    from atlasflow.cli.local import LocalDeployment

    aets = tuple(a.strip() for a in accept_aet.split(",") if a.strip())
    dep = LocalDeployment.create(state_dir, auto_ports, quiet_period_s=quiet_period, accepted_aets=aets)
    dep.start()
    try:
        dep.wait_healthy(timeout)
    except TimeoutError as exc:
        raise CliError(
            f"not healthy in time: {exc}", ExitCode.UNAVAILABLE, f"logs in {dep.state_dir / 'logs'}"
        ) from None
    click.echo(json.dumps(dep.endpoints(), indent=2))
    click.echo(f"review gateway: {dep.gateway_url()} (demo logins in {dep.auth_dir / 'demo-passwords.txt'})")
    return 0


@cli.command(epilog="\b\nExample:\n  atlasflow down --state-dir .atlasflow\n")
@state_dir_option()
def down(state_dir: Path) -> int:
    """Stop the local services (SIGTERM, then SIGKILL after the grace period)."""
    from atlasflow.cli.local import LocalDeployment

    if not (state_dir / "run" / "endpoints.json").exists():
        click.echo(f"nothing running under {state_dir}", err=True)
        return 0
    LocalDeployment.load(state_dir).stop()
    return 0


@cli.command(epilog="\b\nExample:\n  atlasflow status --state-dir .atlasflow   (exit 1 when a process is down)\n")
@state_dir_option()
def status(state_dir: Path) -> int:
    """Show the health of the local services; exit 1 unless every one is SERVING."""
    from atlasflow.cli.local import START_ORDER, LocalDeployment

    if not (state_dir / "run" / "endpoints.json").exists():
        click.echo(f"nothing running under {state_dir}", err=True)
        return 1
    dep = LocalDeployment.load(state_dir)
    ok = True
    for name in START_ORDER:
        healthy = dep.healthy(name)
        ok &= healthy
        click.echo(f"{name:13s} {'SERVING' if healthy else 'DOWN'}")
    return 0 if ok else 1


@cli.command(
    epilog="""\b
Examples:
  atlasflow demo                        writes atlasflow-demo/ (dataset, montage.png)
  atlasflow demo --out /tmp/demo --keep-running
  atlasflow demo --rounds 2 --out /tmp/demo    then 2 rounds of the loop (review, train,
                                                gate, roll-out, re-rank): /tmp/demo/rounds.json
"""
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("atlasflow-demo"), show_default=True
)
@click.option("--keep-running", is_flag=True, help="leave the services up")
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="rounds of the loop through the services after the demo (a simulated radiologist revises"
    " the top-ranked organs, a training run fine-tunes, gates and rolls out); one row per round in"
    " OUT/rounds.json",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="with --rounds: fine-tune steps per round (one member, 32^3 crops, CPU)",
)
def demo(out: Path, keep_running: bool, rounds: int, steps: int) -> int:
    """The end-to-end demo on the bundled CT (starts and stops its own stack)."""
    from atlasflow.cli.demo import run_demo

    return run_demo(out, keep_running=keep_running, rounds=rounds, steps=steps)


@cli.command(
    epilog="""\b
Examples:
  atlasflow token --role reviewer --subject dr.lee > lee.token
  atlasflow token --role admin --subject me --ttl 600 > admin.token
"""
)
@state_dir_option()
@click.option("--role", required=True, type=click.Choice(ROLES))
@click.option("--subject", required=True, help="who the token names (the principal of every action)")
@click.option("--ttl", type=float, default=3600.0, show_default=True, help="lifetime in seconds")
def token(state_dir: Path, role: str, subject: str, ttl: float) -> int:
    """Print a token the local stack (`atlasflow up`) accepts."""
    from atlasflow.common.auth import LocalIssuer

    auth_dir = state_dir / "auth"
    if not (auth_dir / LocalIssuer.KEY_FILE).exists():
        raise CliError(f"no local issuer under {auth_dir}: start the stack first (atlasflow up)")
    click.echo(LocalIssuer.create_or_load(auth_dir).mint(subject, [role], ttl_s=ttl))
    return 0


# ----------------------------------------------------------------------------- data in / out


@cli.command(
    epilog="""\b
Examples:
  atlasflow send study/ --commit --token-file connector.token
  atlasflow send export/ --assign-uids --target ingest.example:50051
"""
)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="ingest gRPC host:port")
@click.option("--commit", is_flag=True, help="commit the series after upload")
@click.option(
    "--assign-uids",
    is_flag=True,
    help="derive stable Study/Series/SOP Instance UIDs for files whose UIDs are empty (de-identified"
    " exports); without it the server refuses them",
)
@token_file_option("file holding the bearer token (role connector or admin)")
@state_dir_option(
    "TLS of the stack `atlasflow up` runs there (unless $ATLASFLOW_TLS_CA_FILE/_CERT_FILE/_KEY_FILE are set)"
)
def send(
    directory: Path, target: str, commit: bool, assign_uids: bool, token_file: Path | None, state_dir: Path
) -> int:
    """Upload DICOM files over the gRPC streaming API (resumable; progress bar on a terminal).

    A file the server refuses exits 1 with its reason."""
    from atlasflow.common.auth import TokenSource
    from atlasflow.ingest.client import UploadError, derive_uids, send_files

    _local_tls(state_dir)
    paths = sorted(p for p in directory.rglob("*") if p.is_file())
    with progress("sending", len(paths), progress_enabled()) as bar:

        def load(p: Path) -> bytes:
            data = p.read_bytes()
            bar.advance()
            return derive_uids(data) if assign_uids else data

        try:
            receipts = send_files(
                paths,
                target,
                commit=commit,
                assign_uids=assign_uids,
                load=load,
                token=TokenSource(path=token_file) if token_file else None,
            )
        except UploadError as exc:
            code = ExitCode.FAILURE
            if exc.reason in (
                "MISSING_TOKEN",
                "INVALID_TOKEN",
                "ROLE_NOT_ALLOWED",
                "UNAUTHENTICATED",
                "PERMISSION_DENIED",
            ):
                code = ExitCode.PERMISSION
            elif exc.reason == "UNAVAILABLE":
                code = ExitCode.UNAVAILABLE
            hint = ""
            if exc.reason == "MISSING_UID":
                hint = (
                    "these files have empty Study/Series/SOP Instance UIDs; add"
                    " --assign-uids to derive stable UIDs on this machine"
                )
            raise CliError(f"refused: {exc.reason}: {exc.message}", code, hint) from None
    dups = sum(r.duplicate for r in receipts)
    conflicts = sum(r.conflict for r in receipts)
    click.echo(f"{len(receipts)} instances durable ({dups} duplicates, {conflicts} conflicts)")
    return 0


@cli.command(
    "delete-study",
    epilog="""\b
Examples:
  atlasflow delete-study 1.2.840.113619.2.55 --reason "consent withdrawn, ticket 4711" --wait
  atlasflow delete-study case-3f2a... --reason "duplicate upload" --token-file admin.token
""",
)
@click.argument("study")
@click.option("--reason", required=True, help="why (kept with the operation; no patient data)")
@state_dir_option()
@click.option("--target", default="", help="ingest host:port (default: the stack in --state-dir)")
@token_file_option("an admin's token")
@click.option("--wait", is_flag=True, help="follow the progress until every service is done")
@click.option(
    "--timeout", type=float, default=600.0, show_default=True, help="with --wait: give up after this many seconds"
)
def delete_study(
    study: str, reason: str, state_dir: Path, target: str, token_file: Path | None, wait: bool, timeout: float
) -> int:
    """Delete a study everywhere (admin): ingest DeleteStudy, then its progress (GetDeletion).

    STUDY is a StudyInstanceUID or an atlasflow case id (case-...)."""
    args = argparse.Namespace(
        study=study,
        reason=reason,
        state_dir=state_dir,
        target=target,
        token_file=token_file,
        wait=wait,
        timeout=timeout,
    )
    return delete.run(args)


# ----------------------------------------------------------------------------- databases

#: services whose store runs on atlasflow.common.db (Alembic)
DB_SERVICES = ("ranking", "ingest", "segmentation", "labels", "training")


@cli.group(
    epilog="\b\nExample:\n  atlasflow db upgrade --service ranking --url sqlite:///.atlasflow/data/ranking/ranking.sqlite3\n"
)
def db() -> None:
    """Database schemas of the services (Alembic migrations; the services also upgrade on start)."""


@db.command(
    "upgrade",
    epilog="""\b
Example:
  ATLASFLOW_RANKING_DATABASE_URL=postgresql://atlas@db:5432/ranking atlasflow db upgrade --service ranking
""",
)
@click.option("--service", required=True, type=click.Choice(DB_SERVICES))
@click.option(
    "--url",
    default="",
    help="database URL or SQLite path (default: $ATLASFLOW_<SERVICE>_DATABASE_URL, or the file "
    "$ATLASFLOW_<SERVICE>_DATABASE_URL_FILE names, which keep a password off argv)",
)
def db_upgrade(service: str, url: str) -> int:
    """Apply a service's pending schema migrations (adopting a database made before Alembic)."""
    from atlasflow.common.settings import read_secret_setting

    key = f"ATLASFLOW_{service.upper()}_DATABASE_URL"
    url = url or read_secret_setting(key, os.environ) or ""
    if not url:
        raise click.UsageError(f"give --url or set {key} (or {key}_FILE)")
    upgrade_database = importlib.import_module(f"atlasflow.{service}.app").upgrade_database
    click.echo(f"{service}: at revision {upgrade_database(url)}")
    return 0


for _command in review.COMMANDS:
    cli.add_command(_command)
cli.add_command(importlib.import_module("atlasflow.cli.audit").audit)  # atlasflow audit (cli/audit.py)
cli.add_command(importlib.import_module("atlasflow.cli.train").train)  # atlasflow train (cli/train.py)
for _command in importlib.import_module("atlasflow.cli.models").COMMANDS:  # model list|import, segment
    cli.add_command(_command)


def _delegated(name: str, module: str, help_: str) -> click.Command:
    @click.command(
        name,
        help=f"{help_} (options: `atlasflow {name} --help`)",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> int:
        _local_tls(Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)))
        return int(importlib.import_module(module).main(list(args)) or 0)

    return command


for _name, (_module, _help) in DELEGATED.items():
    cli.add_command(_delegated(_name, _module, _help))


# ----------------------------------------------------------------------------- entry point


def _fail(command: str, message: str, hint: str = "") -> None:
    click.echo(f"atlasflow {command}: {message}".rstrip(), err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default sys.argv[1:]); return the exit code.

    The client commands point ``ATLASFLOW_TLS_*`` at a local stack's TLS for their own calls;
    those variables are put back as they were when the command ends, so a caller in the same
    process (the demo, a test) does not inherit another stack's certificates."""
    restore = _restore_tls_env(_tls_env())
    try:
        return _main(argv)
    finally:
        restore()


def _tls_env() -> dict[str, str | None]:
    from atlasflow.common.tls import CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV

    return {k: os.environ.get(k) for k in (CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV)}


def _restore_tls_env(saved: dict[str, str | None]) -> Callable[[], None]:
    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:  # the module's own argparse sees every argument, --help too
        _local_tls(Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)))
        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        rv = cli.main(args=argv, prog_name="atlasflow", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except CliError as exc:
        _fail(command, exc.message, exc.hint)
        return int(exc.code)
    except grpc.RpcError as exc:
        err = rpc_error(exc)
        _fail(command, err.message, err.hint)
        return int(err.code)
    return int(rv or 0)


if __name__ == "__main__":
    sys.exit(main())
