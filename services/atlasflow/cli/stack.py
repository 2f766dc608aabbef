"""What the client commands share: the stack they talk to, their token, progress bars, output.

A client command reaches a running stack through ``--state-dir`` (default ``.atlasflow`` or
``ATLASFLOW_STATE_DIR``): its addresses and its TLS (CA + the command line's certificate) come
from ``run/endpoints.json``, which `atlasflow up` writes; ``ATLASFLOW_TLS_CA_FILE`` /
``_CERT_FILE`` / ``_KEY_FILE``, when set, replace that TLS. The bearer token comes from
``--token-file`` or ``ATLASFLOW_TOKEN_FILE`` (a file, never a value on the command line).

Progress bars go to stderr, and only when stderr is a terminal and the output is not ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from atlasflow.cli.exitcodes import CliError, ExitCode
from atlasflow.common.auth import TOKEN_FILE_ENV, TokenSource

STATE_DIR_ENV = "ATLASFLOW_STATE_DIR"
DEFAULT_STATE_DIR = ".atlasflow"


def state_dir_option(help_: str = "state directory of the stack (`atlasflow up`)") -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_STATE_DIR,
        envvar=STATE_DIR_ENV,
        show_default=True,
        show_envvar=True,
        help=help_,
    )


def token_file_option(
    help_: str = "file holding your bearer token (`atlasflow token ... > FILE`)",
) -> Callable[..., Any]:
    return click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar=TOKEN_FILE_ENV,
        show_envvar=True,
        help=help_,
    )


json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output (JSON on stdout)")


def token_source(token_file: Path | None) -> TokenSource:
    """The caller's token; an unreadable file is refused here (exit PERMISSION), no token at all
    is left to the server to refuse (UNAUTHENTICATED -> exit PERMISSION)."""
    if token_file is None:
        return TokenSource()
    try:
        if not Path(token_file).read_text().strip():
            raise CliError(f"token file {token_file} is empty", ExitCode.PERMISSION)
    except OSError as exc:
        raise CliError(f"cannot read token file {token_file}: {exc.strerror}", ExitCode.PERMISSION) from None
    return TokenSource(path=token_file)


@dataclass
class Stack:
    """A running stack as a client sees it: addresses + TLS from run/endpoints.json, a token."""

    state_dir: Path
    token: TokenSource
    doc: dict[str, Any]

    @classmethod
    def open(cls, state_dir: Path, token_file: Path | None) -> Stack:
        path = Path(state_dir) / "run" / "endpoints.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            raise CliError(
                f"no running stack under {state_dir} (no readable {path})",
                ExitCode.UNAVAILABLE,
                "start one with `atlasflow up --state-dir DIR`, or give --state-dir / ATLASFLOW_STATE_DIR",
            ) from None
        return cls(Path(state_dir), token_source(token_file), doc)

    def target(self, service: str) -> str:
        ports = self.doc.get("ports", {})
        if service not in ports:
            raise CliError(f"{self.state_dir}/run/endpoints.json names no {service} port", ExitCode.UNAVAILABLE)
        return f"127.0.0.1:{int(ports[service])}"

    def channel(self, service: str) -> grpc.Channel:
        from atlasflow.common.clients import sync_channel
        from atlasflow.common.tls import PLAINTEXT, default_client_tls, local_stack_tls

        tls = default_client_tls()
        if not tls.enabled:
            tls = local_stack_tls(self.state_dir) or PLAINTEXT
        return sync_channel(self.target(service), token=self.token, tls=tls)

    @property
    def subject(self) -> str:
        """The token's subject (unverified: only to pick the caller's own leases; the server
        decides who the caller is)."""
        import jwt

        try:
            claims = jwt.decode(self.token.token(), options={"verify_signature": False})
        except (jwt.PyJWTError, OSError):
            return ""
        return str(claims.get("sub", ""))


# ----------------------------------------------------------------------------- output


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def progress_enabled(as_json: bool = False) -> bool:
    return not as_json and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class _Bar:
    """A progress bar on stderr (click.progressbar) whose total may become known late; a no-op
    when disabled."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self._bar: Any = None
        self._pos = 0
        if enabled:
            self._bar = click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True)
            self._bar.__enter__()

    def set(self, done: int, total: int | None = None) -> None:
        if self._bar is None:
            return
        if total is not None and total > 0:
            self._bar.length = total
        step = max(0, min(done, self._bar.length) - self._pos)
        if step:
            self._bar.update(step)
            self._pos += step

    def advance(self, n: int = 1) -> None:
        self.set(self._pos + n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextmanager
def progress(label: str, total: int, enabled: bool) -> Iterator[_Bar]:
    bar = _Bar(label, total, enabled)
    try:
        yield bar
    finally:
        bar.close()


def poll(
    fetch: Callable[[], Any],
    done: Callable[[Any], bool],
    *,
    timeout_s: float,
    interval_s: float = 0.5,
    on_update: Callable[[Any], None] | None = None,
) -> Any:
    """Call ``fetch`` until ``done(result)``; `CliError` TIMEOUT after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = fetch()
        if on_update is not None:
            on_update(result)
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise CliError(f"still running after {timeout_s:.0f} s; it goes on on the server", ExitCode.TIMEOUT)
        time.sleep(interval_s)
