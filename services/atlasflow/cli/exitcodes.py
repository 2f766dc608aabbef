"""Exit codes of the `atlasflow` command, and the one place that maps gRPC status codes to them.

=====  =============  ==============================================================================
code   name           when
=====  =============  ==============================================================================
0      OK             done
1      FAILURE        anything else that went wrong (an internal error, a failed operation)
2      USAGE          bad command line (unknown option, missing argument, bad value)
3      NOT_FOUND      the case, version, job or study does not exist (gRPC NOT_FOUND)
4      PERMISSION     no usable token, an invalid or expired one, or a role that may not do this
                      (gRPC UNAUTHENTICATED, PERMISSION_DENIED)
5      UNAVAILABLE    the stack is not running or a service does not answer (gRPC UNAVAILABLE,
                      DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)
6      INVALID        the input was refused (gRPC INVALID_ARGUMENT, OUT_OF_RANGE; a mask that is
                      not on the case's grid)
7      CONFLICT       the state does not allow it now: a lease held by someone else, a newer label
                      version, nothing to export (gRPC FAILED_PRECONDITION, ABORTED,
                      ALREADY_EXISTS)
8      TIMEOUT        a --wait gave up; the operation goes on on the server
=====  =============  ==============================================================================
"""

from __future__ import annotations

import enum

import grpc


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    PERMISSION = 4
    UNAVAILABLE = 5
    INVALID = 6
    CONFLICT = 7
    TIMEOUT = 8


#: gRPC status code -> exit code (codes not listed: FAILURE).
GRPC_EXIT: dict[grpc.StatusCode, ExitCode] = {
    grpc.StatusCode.OK: ExitCode.OK,
    grpc.StatusCode.NOT_FOUND: ExitCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: ExitCode.PERMISSION,
    grpc.StatusCode.PERMISSION_DENIED: ExitCode.PERMISSION,
    grpc.StatusCode.UNAVAILABLE: ExitCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ExitCode.UNAVAILABLE,
    grpc.StatusCode.INVALID_ARGUMENT: ExitCode.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: ExitCode.INVALID,
    grpc.StatusCode.FAILED_PRECONDITION: ExitCode.CONFLICT,
    grpc.StatusCode.ABORTED: ExitCode.CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: ExitCode.CONFLICT,
}


def exit_code_for(code: grpc.StatusCode | None) -> ExitCode:
    """The exit code of a command that failed with gRPC status ``code``."""
    return GRPC_EXIT.get(code, ExitCode.FAILURE) if code is not None else ExitCode.FAILURE


class CliError(Exception):
    """A command's failure: the message for stderr and the exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def rpc_error(exc: grpc.RpcError, hint: str = "") -> CliError:
    """A `CliError` for a failed call: ``<CODE> <REASON>: <details>`` and the mapped exit code;
    a hint for the codes a user can fix (token, running stack)."""
    from atlasflow.common.server import error_info_of

    code = exc.code() if hasattr(exc, "code") else None
    info = error_info_of(exc) if code is not None else None
    name = code.name if code is not None else "ERROR"
    reason = f" {info.reason}" if info is not None and info.reason else ""
    details = exc.details() if hasattr(exc, "details") else str(exc)
    exit_code = exit_code_for(code)
    if not hint and exit_code == ExitCode.PERMISSION:
        hint = (
            "give a token with --token-file (or ATLASFLOW_TOKEN_FILE) of a role that may do this "
            "(docs/security.md lists them), e.g. `atlasflow token --role reviewer --subject me > me.token`"
        )
    elif not hint and exit_code == ExitCode.UNAVAILABLE:
        hint = "is the stack running? `atlasflow status --state-dir DIR`"
    return CliError(f"{name}{reason}: {details}", exit_code, hint)
