#!/usr/bin/env bash
# Regenerate the Open Inference Protocol v2 gRPC modules (service/oip/grpc.py) from the
# vendored protonmf/api/proto/inference/grpc_predict_v2.proto (Apache-2.0, KServe; committed,
# tests/test_oip.py checks they match). Needs grpcio-tools (dev extra). The package stays
# `inference` (the wire names: inference.GRPCInferenceService/ModelInfer); the modules import
# as protonmf.api.proto.inference , so protoc runs
# on a copy laid out that way, as scripts/gen_proto.sh does for protonmf.v1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-protonmf/api/proto/inference}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/protonmf/api/proto/inference"
cp protonmf/api/proto/inference/grpc_predict_v2.proto "$tmp/protonmf/api/proto/inference/"
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$tmp/protonmf/api/proto/inference/grpc_predict_v2.proto"
cp "$tmp"/protonmf/api/proto/inference/grpc_predict_v2_pb2*.py* "$OUT/"
