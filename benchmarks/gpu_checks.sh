#!/usr/bin/env bash
# The GPU checks in two prepared steps, for a CUDA machine (never CI). Logs and JSON go to $OUT.
#
#   benchmarks/gpu_checks.sh prepare   torch only: NMF on the GPU (test + benchmark), and the
#                                      bench_graph conversions (--device auto: NMF on CUDA) and
#                                      exports into $WORK
#   benchmarks/gpu_checks.sh run       onnxruntime-gpu: the gpu-marked tests (CUDA provider
#                                      parity, verify on CUDA, fp16 variant, IOBinding and CUDA
#                                      graphs vs session.run), graph latency on the CUDA
#                                      provider, `protonmf verify --device cuda` on each
#                                      converted model, the service core's stages, and
#                                      GraphSession.run plain vs IOBinding vs CUDA graphs on Lite0
#                                      (max |Δ| against session.run ≤ 1e-4, then latency)
#   benchmarks/gpu_checks.sh service   onnxruntime-gpu + bentoml: the real service on the CUDA
#                                      provider (batch buckets on, every bucket warmed) under
#                                      1/8/32/64 clients vs the logits-only service and raw
#                                      onnxruntime, both on CUDA, with the issue's pass/fail
#                                      lines (/explain at 64 clients ≥ 0.3× raw batch 32,
#                                      p99 ≤ 150 ms); the same service with
#                                      PROTONMF_IO_BINDING=on, and with PROTONMF_CUDA_GRAPHS
#                                      (buckets auto); then the trivial-graph ceiling
#
# STEPS="a b" runs only the named steps of a stage (default: all).
#
# Needs python3 with CUDA torch, timm, onnx, onnxscript, scikit-learn, pillow, safetensors,
# tqdm, prometheus_client, pytest; `run` also onnxruntime-gpu first on PYTHONPATH, and the
# CUDA/cuDNN libraries it loads on LD_LIBRARY_PATH; the GPU-decoding test also
# nvidia-nvimgcodec-cu13 + nvidia-nvjpeg-cu13 (or -cu12), and skips itself without them. Each step has its own time limit and a
# failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
WORK=${WORK:-/tmp/gpu_work}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "${1:-}" in
prepare | run | service) ;;
*)
    echo "usage: $0 prepare|run|service" >&2
    exit 2
    ;;
esac
LOG="$OUT/$1.log"

# protonmf.service and protonmf.converter are service/ and converter/ (pyproject's
# package-dir). Without an install of this checkout (pip install -e .), links make them
# importable from it: for the scripts (PYTHONPATH) and for the servers they start
# (`bentoml serve --working-dir` puts the checkout first on sys.path).
if ! "$PY" -c "import protonmf.service, protonmf.converter" 2>/dev/null; then
    for pkg in service converter; do
        [[ -e protonmf/$pkg ]] || ln -s "../$pkg" "protonmf/$pkg"
    done
fi

STEPS=${STEPS:-all}

step() {  # step NAME SECONDS CMD…: run with a limit, log it, keep going on failure
    local name=$1 limit=$2
    shift 2
    [[ $STEPS == all || " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name rc=${PIPESTATUS[0]} ($(date +%T))" | tee -a "$LOG"
}

case "$1" in
prepare)
    step gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    step versions 60 "$PY" -c "import torch, timm, onnx, sklearn; print('torch', torch.__version__,
torch.cuda.get_device_name(), '| timm', timm.__version__, '| onnx', onnx.__version__,
'| sklearn', sklearn.__version__)"
    step nmf-test 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_nmf.py
    step bench-nmf 200 "$PY" benchmarks/bench_nmf.py --device cuda --threads 8 --rows 20000 \
        --repeats 2 --out "$OUT/bench_nmf_cuda.json"
    step graph-prepare 300 "$PY" benchmarks/bench_graph.py --prepare-only --workdir "$WORK" \
        --fashion-artifact "$WORK/fashion"
    ;;
run)
    step providers 60 "$PY" -c "import onnxruntime as ort; from protonmf.graph import create_session
print(ort.__version__, ort.__file__, ort.get_available_providers())
s, used = create_session('$WORK/fashion/model.onnx', 'cuda'); print('in use:', s.get_providers())"
    step gpu-tests 240 "$PY" -m pytest -q -s -p no:cacheprovider -m gpu tests/test_graph.py \
        tests/test_iobinding.py tests/test_gpu_decode.py
    step bench-graph 300 "$PY" benchmarks/bench_graph.py --device cuda --workdir "$WORK" \
        --fashion-artifact "$WORK/fashion" --out "$OUT/bench_graph_cuda.json"
    for art in fashion lite0 resnet34; do  # the report to its own file, progress to the log
        [[ -d "$WORK/$art" && ($STEPS == all || " $STEPS " == *" verify "*) ]] || continue
        echo "=== verify-$art ($(date +%T))" | tee -a "$LOG"
        timeout 120 "$PY" -m protonmf.cli verify "$WORK/$art" --device cuda --json \
            >"$OUT/verify_$art.json" 2>>"$LOG"
        echo "=== verify-$art rc=$? $(cat "$OUT/verify_$art.json")" | tee -a "$LOG"
    done
    step bench-core 120 "$PY" benchmarks/bench_core.py "$WORK/lite0" --device cuda \
        --threads 8 --out "$OUT/bench_core_cuda.json"
    step iobinding 150 "$PY" benchmarks/bench_core.py "$WORK/lite0" --device cuda --io-binding \
        --threads 8 --rounds 20 --max-diff 1e-4 --out "$OUT/bench_core_iobinding_cuda.json"
    ;;
service)
    blackbox=$(ls "$WORK"/tf_efficientnet_lite0-*-blackbox.onnx 2>/dev/null | head -n 1)
    step bench-service 500 "$PY" benchmarks/bench_service.py --device cuda \
        --artifact "$WORK/lite0" ${blackbox:+--blackbox "$blackbox"} \
        --workdir "$WORK/service" --endpoints explain --clients 1,8,32,64 --duration 10 \
        --gpu-targets --out "$OUT/bench_service_cuda.json"
    # one GPU, the 16 cores put to work: 4 workers (an event loop each, ~4 CPU-ms per
    # /explain image once decoding left it) x 3 decode processes
    step bench-service-scaled 300 env PROTONMF_DECODE_PROCESSES=3 "$PY" benchmarks/bench_service.py \
        --device cuda --workers 4 --artifact "$WORK/lite0" ${blackbox:+--blackbox "$blackbox"} \
        --workdir "$WORK/service" --endpoints explain --clients 64 --duration 10 \
        --gpu-targets --out "$OUT/bench_service_cuda_scaled.json"
    step bench-service-iobinding 300 env PROTONMF_IO_BINDING=on "$PY" benchmarks/bench_service.py \
        --device cuda --artifact "$WORK/lite0" ${blackbox:+--blackbox "$blackbox"} \
        --workdir "$WORK/service" --endpoints explain --clients 1,64 --duration 10 \
        --gpu-targets --out "$OUT/bench_service_cuda_iobinding.json"
    step bench-service-cuda-graphs 300 env PROTONMF_CUDA_GRAPHS=true PROTONMF_BATCH_BUCKETS=auto \
        "$PY" benchmarks/bench_service.py --device cuda --artifact "$WORK/lite0" \
        ${blackbox:+--blackbox "$blackbox"} --workdir "$WORK/service" --endpoints explain \
        --clients 1,64 --duration 10 --gpu-targets --out "$OUT/bench_service_cuda_graphs.json"
    step bench-ceiling 200 "$PY" benchmarks/bench_ceiling.py --artifact "$WORK/lite0" \
        --workdir "$WORK/service" --clients 1,32 --duration 10 \
        --out "$OUT/bench_ceiling_cuda_host.json"
    ;;
*)
    echo "usage: $0 prepare|run|service" >&2
    exit 2
    ;;
esac
