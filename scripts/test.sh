#!/usr/bin/env bash
# Quick start, command 2: bootstrap (Debian dcmtk, .venv with test extras, helm, buf) and run
# every check: buf lint on the protos, ruff lint and format check, mypy (config in pyproject.toml),
# then pytest (unit, integration, end-to-end with a real Triton server and dcmtk storescu).
# The first failing step stops the run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
echo "== buf lint"
.tools/buf lint
echo "== ruff check"
.venv/bin/ruff check services tests benchmarks scripts
echo "== ruff format --check"
.venv/bin/ruff format --check services tests benchmarks scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
