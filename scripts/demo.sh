#!/usr/bin/env bash
# The main job on the embedded default: convert, verify, report, serve, explain one image,
# stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENTOML_DO_NOT_TRACK=true
ART=${ART:-artifacts/fashion-default}
PORT=${PORT:-3000}
GRPC_PORT=${GRPC_PORT:-50051}
.venv/bin/protonmf convert --out "$ART"
.venv/bin/protonmf verify "$ART" --json
# One self-contained HTML page: evaluation, plots, reading, prototype atlas with exemplars.
.venv/bin/protonmf report "$ART" --out "$ART/report.html"
.venv/bin/protonmf serve "$ART" --port "$PORT" --grpc-port "$GRPC_PORT" > /tmp/protonmf-demo-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 90); do curl -sf "localhost:$PORT/readyz" >/dev/null && break; sleep 1; done
img=$(ls data/fashion-mnist/test/bag/*.png | head -1)
echo "explanation of $img (top 2 classes, no heatmaps):"
curl -sf -F "images=@$img" -F top_k=2 -F heatmaps=false "localhost:$PORT/explain" | .venv/bin/python -m json.tool
echo "the same image over gRPC (protonmf.v1.ProtoNMF/Classify):"
.venv/bin/python - "$img" "$GRPC_PORT" <<'PY'
import sys, time
from protonmf.client import GrpcClient, RequestFailed
for _ in range(50):  # gRPC health turns SERVING right after /readyz
    try:
        with GrpcClient(f"127.0.0.1:{sys.argv[2]}") as c:
            print(c.classify([open(sys.argv[1], "rb").read()], top_k=2).model_dump_json(indent=2))
        break
    except RequestFailed:
        time.sleep(0.2)
PY
curl -sf -F "images=@$img" "localhost:$PORT/overlay" -o "$ART/overlay-example.png"
echo "overlay: $ART/overlay-example.png"
echo "report: $ART/report.html (open it in a browser; it loads nothing from the network)"
echo "artifact: $(cd "$ART" && pwd)"
