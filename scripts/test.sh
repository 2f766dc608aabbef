#!/usr/bin/env bash
# Quick start, command 2: bootstrap (Debian dcmtk, .venv with test extras, helm, buf) and run
# every test: buf lint on the protos, then pytest (unit, integration, end-to-end with a real
# Triton server and dcmtk storescu). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
echo "== buf lint"
.tools/buf lint
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
