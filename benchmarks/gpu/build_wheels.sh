#!/usr/bin/env bash
# Build .whl/, the wheel directory the device call of finetune_throughput.sh carries
# (run HERE, in the repository root, with the package index reachable; nothing of this runs on
# the device). The device image (/work/.library/device/KINDS.md) already has torch, numpy,
# scipy, einops, grpcio, protobuf; atlasflow itself travels as source (PYTHONPATH=services: its
# wheel is 11.6 MB and the working tree plus .whl must stay under the call's 64 MiB). What is
# missing there, found by running the --dry-run with every other distribution blocked
# (docs/training.md "Fine-tune throughput on a GPU"): MONAI, nibabel, pydicom and OpenTelemetry
# API/SDK. All are pure-Python wheels (py3-none-any), so the Python 3.11 here fetches what the
# device's Python 3.12 installs. Versions: the ones this venv runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
pins=()
for dist in monai nibabel pydicom opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions; do
  pins+=("$dist==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls -la .whl
du -sh .whl
