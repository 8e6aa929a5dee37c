#!/usr/bin/env bash
# Create .venv and install protonmf with everything the converter, service and tests need.
# Offline but for the package registries; torch/torchvision come pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip_install() {  # quiet on success; the log (minus local-index noise) on failure
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "bootstrap: pip install $* failed" >&2
    exit 1
  fi
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "bootstrap: installing protonmf[convert,serve,dev] into .venv (torch from local disk: a few minutes)"
pip_install -c constraints.txt -e '.[convert,serve,dev]'
# foolbox only for its 20 bundled ImageNet photos (test data); its own deps are not needed.
pip_install --no-deps foolbox==3.3.4
# Deploy checks (tests/test_deploy.py, tests/test_prometheus_integration.py): promtool,
# prometheus, kubectl/kustomize, kubernetes-validate, hadolint, uv.
bash scripts/install_deploy_tools.sh
.venv/bin/python -c "import torch, timm, onnxruntime, protonmf; print('bootstrap: ready: torch', torch.__version__, '| timm', timm.__version__, '| onnxruntime', onnxruntime.__version__)"
