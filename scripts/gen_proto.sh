#!/usr/bin/env bash
# Regenerate the gRPC Python modules from protonmf/api/proto (committed; tests/test_grpc.py checks
# they match). Needs grpcio-tools (dev extra). The code imports the modules as
# protonmf.api.proto.protonmf.v1, so protoc runs on a copy laid out that way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-protonmf/api/proto/protonmf/v1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/protonmf/api/proto/protonmf/v1"
cp protonmf/api/proto/protonmf/v1/protonmf.proto "$tmp/protonmf/api/proto/protonmf/v1/"
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$tmp/protonmf/api/proto/protonmf/v1/protonmf.proto"
cp "$tmp"/protonmf/api/proto/protonmf/v1/protonmf_pb2*.py* "$OUT/"
