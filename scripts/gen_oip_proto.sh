#!/usr/bin/env bash
# Regenerate the Open Inference Protocol v2 gRPC modules (service/oip_grpc.py) from the
# vendored service/proto/inference/grpc_predict_v2.proto (Apache-2.0, KServe; committed,
# tests/test_oip.py checks they match). Needs grpcio-tools (dev extra). The package stays
# `inference` (the wire names: inference.GRPCInferenceService/ModelInfer); the modules import
# as protonmf.service.proto.inference (service/ installs as protonmf.service), so protoc runs
# on a copy laid out that way, as scripts/gen_proto.sh does for protonmf.v1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-service/proto/inference}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/protonmf/service/proto/inference"
cp service/proto/inference/grpc_predict_v2.proto "$tmp/protonmf/service/proto/inference/"
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "$tmp/protonmf/service/proto/inference/grpc_predict_v2.proto"
cp "$tmp"/protonmf/service/proto/inference/grpc_predict_v2_pb2*.py* "$OUT/"
