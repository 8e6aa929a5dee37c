#!/usr/bin/env bash
# Regenerate the gRPC Python modules from service/proto (committed; tests/test_grpc.py checks
# they match). Needs grpcio-tools (dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  service/proto/protonmf/v1/protonmf.proto
