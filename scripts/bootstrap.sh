#!/usr/bin/env bash
# Create .venv and install protonmf with everything the converter, service and tests need.
# Offline but for the package registries; torch/torchvision come pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip_install() {  # quiet on success; the log (minus local-index noise) on failure
  if ! .venv/bin/python -m pip install -q --no-cache-dir "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "bootstrap: pip install $* failed" >&2
    exit 1
  fi
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# A fresh .venv takes ~7 GB (torch's CUDA build and its nvidia-* wheels are most of it).
if ! compgen -G ".venv/lib/python3*/site-packages/torch" >/dev/null; then
  free_gb=$(df -Pk .venv | awk 'NR == 2 {printf "%d", $4 / 1048576}')
  if [ "${free_gb:-0}" -lt 8 ]; then
    echo "bootstrap: warning: ${free_gb} GiB free under $(pwd); the install needs ~7 GB" >&2
  fi
fi
echo "bootstrap: installing protonmf[convert,serve,dev] into .venv (torch from local disk: a few minutes)"
pip_install -c constraints.txt -e '.[convert,serve,dev]'
# foolbox only for its 20 bundled ImageNet photos (test data); its own deps are not needed.
pip_install --no-deps foolbox==3.3.4
# Deploy checks (tests/test_deploy.py, tests/test_prometheus_integration.py): promtool,
# prometheus, kubectl/kustomize, kubernetes-validate, hadolint, uv.
bash scripts/install_deploy_tools.sh
.venv/bin/python -c "import torch, timm, onnxruntime, protonmf; print('bootstrap: ready: torch', torch.__version__, '| timm', timm.__version__, '| onnxruntime', onnxruntime.__version__)"
