"""The `atlasflow` command line without a stack: the gRPC -> exit code mapping, argument parsing
(Click's CliRunner), `--help` with examples on every command, and the mask geometry check that
refuses a mask off the case's grid before anything is sent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from atlasflow.cli.exitcodes import GRPC_EXIT, CliError, ExitCode, exit_code_for
from atlasflow.cli.main import DELEGATED, cli, main
from atlasflow.cli.review import check_mask, confirmation_delta, organs_of
from atlasflow.common.v1 import common_pb2


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.OK, 0),
        (grpc.StatusCode.NOT_FOUND, 3),
        (grpc.StatusCode.UNAUTHENTICATED, 4),
        (grpc.StatusCode.PERMISSION_DENIED, 4),
        (grpc.StatusCode.UNAVAILABLE, 5),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 5),
        (grpc.StatusCode.INVALID_ARGUMENT, 6),
        (grpc.StatusCode.FAILED_PRECONDITION, 7),
        (grpc.StatusCode.ABORTED, 7),
        (grpc.StatusCode.INTERNAL, 1),
        (grpc.StatusCode.DATA_LOSS, 1),
        (None, 1),
    ],
)
def test_grpc_status_maps_to_exit_code(code: grpc.StatusCode | None, exit_code: int) -> None:
    assert exit_code_for(code) == exit_code


def test_every_mapped_exit_code_is_documented() -> None:
    import atlasflow.cli.exitcodes as mod

    doc = mod.__doc__ or ""
    for code in ExitCode:
        assert f"\n{code.value}      {code.name}" in doc, code
    assert set(GRPC_EXIT.values()) <= set(ExitCode)


COMMANDS = sorted(set(cli.commands) - set(DELEGATED))


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_command_shows_an_example(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"atlasflow {name}" in result.output.split("Example", 1)[1]


def test_top_level_help_lists_the_loop_and_the_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("worklist", "lease", "review", "export", "versions", "send", "serve", "up", "convert"):
        assert name in result.output
    assert "Exit codes" in result.output and "4 permission" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["worklist", "--status", "nonsense"],
        ["worklist", "--limit", "0"],
        ["worklist", "--organ", "brain"],
        ["lease"],
        ["lease", "--next", "--release", "case-1"],
        ["lease", "--next", "case-1"],
        ["review", "case-1"],
        ["review", "case-1", "--revise", "liver"],
        ["review", "case-1", "--revise", "liver=/does/not/exist.nii.gz"],
        ["export", "--identified", "--dates", "full"],
        ["serve", "nonsense"],
        ["token", "--role", "god", "--subject", "x"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == ExitCode.USAGE
    assert "Usage:" in capsys.readouterr().err


def test_no_stack_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worklist", "--state-dir", str(tmp_path)]) == ExitCode.UNAVAILABLE
    err = capsys.readouterr().err
    assert "no running stack" in err and "atlasflow up" in err


def test_unreadable_token_file_is_permission(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "endpoints.json").write_text('{"ports": {"ranking": 1}}')
    missing = tmp_path / "nope.token"
    assert main(["worklist", "--state-dir", str(tmp_path), "--token-file", str(missing)]) == ExitCode.PERMISSION
    assert "cannot read token file" in capsys.readouterr().err


def test_status_without_stack_exits_1_and_down_exits_0(tmp_path: Path) -> None:
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert main(["down", "--state-dir", str(tmp_path)]) == 0


def test_delegated_commands_keep_their_own_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["convert", "--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out  # argparse's, not Click's


def test_organ_names() -> None:
    assert organs_of(["liver,spleen", "LIVER", "organ_aorta", "5"]) == [5, 8, 1]


def _geometry(shape: tuple[int, int, int], affine: np.ndarray) -> common_pb2.VolumeGeometry:
    return common_pb2.VolumeGeometry(shape=list(shape), affine=[float(x) for x in affine.ravel()])


AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


@pytest.mark.parametrize(
    ("mask", "affine", "message"),
    [
        (np.zeros((4, 5, 7), np.uint8), AFFINE, "has shape (4, 5, 7), the case's volume is (4, 5, 6)"),
        (np.zeros((4, 5, 6), np.uint8), AFFINE + np.diag([0, 0, 0, 0]) + np.eye(4) * 0.01, "another affine"),
        (np.zeros((4, 5, 6), np.uint8), np.diag([0.8, 0.8, 2.5, 1.0]), "another affine"),
        (np.full((4, 5, 6), 3, np.uint8), AFFINE, "must hold 0 and 1"),
        (np.full((4, 5, 6), 0.5, np.float32), AFFINE, "non-integer"),
    ],
)
def test_mask_off_the_grid_is_refused(mask: np.ndarray, affine: np.ndarray, message: str) -> None:
    with pytest.raises(CliError) as err:
        check_mask(mask, affine, _geometry((4, 5, 6), AFFINE), 5, "m.nii.gz")
    assert err.value.code == ExitCode.INVALID and message in err.value.message


def test_mask_on_the_grid_passes() -> None:
    mask = np.zeros((4, 5, 6), np.int16)
    mask[1, 2, 3] = 5
    mask[0, 0, 0] = 1
    check_mask(mask, AFFINE + 5e-5, _geometry((4, 5, 6), AFFINE), 5, "m.nii.gz")


def test_confirmation_delta_is_all_zero_bits_of_the_volume() -> None:
    import gzip

    raw = gzip.decompress(confirmation_delta(_geometry((4, 5, 6), AFFINE)))
    assert raw == bytes(15)  # ceil(120 / 8)


def test_a_command_leaves_no_tls_environment_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`send` points ATLASFLOW_TLS_* at the local stack's TLS for its own calls; an in-process
    caller (CliRunner, the demo, the next test) must not inherit them."""
    for key in ("ATLASFLOW_TLS_CA_FILE", "ATLASFLOW_TLS_CERT_FILE", "ATLASFLOW_TLS_KEY_FILE"):
        monkeypatch.delenv(key, raising=False)
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("x")
    (tmp_path / "run").mkdir()
    endpoints = {"ingest": "127.0.0.1:9", "tls": {f"{n}_file": str(p) for n, p in files.items()}}
    (tmp_path / "run" / "endpoints.json").write_text(json.dumps(endpoints))
    empty = tmp_path / "empty"
    empty.mkdir()
    CliRunner().invoke(cli, ["send", str(empty), "--state-dir", str(tmp_path)])
    assert "ATLASFLOW_TLS_CA_FILE" not in os.environ
    main(["send", str(empty), "--state-dir", str(tmp_path)])
    assert "ATLASFLOW_TLS_CA_FILE" not in os.environ
