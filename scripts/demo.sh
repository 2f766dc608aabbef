#!/usr/bin/env bash
# Quick start, command 1: bootstrap (Debian dcmtk, .venv, atlasflow) and run the demo.
# Usage: scripts/demo.sh [--out DIR]   (default DIR: out/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ $# -eq 0 ]; then set -- --out out/demo; fi
exec .venv/bin/atlasflow demo "$@"
