#!/usr/bin/env bash
# Fine-tune throughput of the trio on one GPU (issue 15), prepared for ONE call on the lent
# H100/H200 machine (/work/.library/device/README.md). Not run on a GPU yet.
#
#   here, once:   bash benchmarks/gpu/build_wheels.sh          # -> .whl/ (ignored by git)
#   here, check:  bash benchmarks/gpu/finetune_throughput.sh --dry-run   # CPU, tiny members
#   device:       run(command="bash benchmarks/gpu/finetune_throughput.sh", carry=[".whl"],
#                     timeout_s=420)
#
# On the device: installs the carried wheels with --no-deps into /tmp/site (the device README's
# way: the image's venv at /opt/torch/.venv keeps its torch and numpy untouched, /tmp/site comes
# first on PYTHONPATH), puts services/ (atlasflow's source) on PYTHONPATH, prints the GPU, then
# runs benchmarks/gpu/finetune_throughput.py: each trio member at its reference patch size
# (96^3, 96^3, 128^3), bf16 autocast, batch 2, 30 steps (5 warm-up), and prints s/step,
# crops/s, peak GPU memory per member and cases/hour per GPU, then the JSON. The JSON and the
# log are written under $OUT (they come back with the call). Budget: the full trio on an H100 is
# expected well under 5 minutes (start-up ~1 min, data preparation ~20 s per member); the
# timeout leaves a rerun inside the 15 minutes of device time.
# Extra arguments go to the Python part (e.g. --steps 50 --batch-size 4 --autocast none).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/finetune_throughput}
mkdir -p "$OUT"
if [[ " $* " == *" --dry-run "* ]]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
else
  PY=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/services${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/*.whl: run benchmarks/gpu/build_wheels.sh here and carry .whl" >&2
    export PYTHONPATH=$PWD/services${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, monai, atlasflow.training.finetune as f; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
set -o pipefail
"$PY" benchmarks/gpu/finetune_throughput.py --json-out "$OUT/finetune_throughput.json" "$@" 2>&1 | tee "$OUT/finetune_throughput.log"
