#!/usr/bin/env bash
# Builds up the SmolLM2-135M drafter's training data in data/smollm2-135m/, a run at a time. Every step
# continues where the last run stopped, so the same command is rerun each session and the shards it
# adds are committed (TRAINING.md, "Data that accumulates").
#     nice bash scripts/smollm2_data.sh [MINUTES]     # regenerate for MINUTES (default 60), then stop cleanly
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MINUTES=${1:-60}
DATA=data/smollm2-135m
mkdir -p "$DATA/prompts"

# 1. Prompts from the project's generators: code tasks from the documented functions installed in the venv
#    (so another environment builds a somewhat different set), chat and assistant tasks from templates.
#    Repeats and anything overlapping HumanEval or MT-Bench are dropped (tested).
[ -f "$DATA/prompts/templates.jsonl" ] || "$BIN/python" -m dflash_edge.train.prompts \
    "$DATA/prompts/templates.jsonl" --code 7000 --chat 3000 --tasks 4000 --shuffle --seed 25

# 2. Prompts the target writes itself (temperature 1, top-p 0.95, 5-60 tokens, de-duplicated, decontaminated).
"$BIN/python" -m dflash_edge.train.selfquery "$DATA/prompts/selfquery.jsonl" --count 8000 --batch 128 \
    --seed 25 --exclude "$DATA/prompts/templates.jsonl" --threads 2

# 3. Greedy replies (chat template, up to 512 tokens, fp32), the prompt files mixed in proportion, into shards.
"$BIN/python" -m dflash_edge.train.regenerate --prompts "$DATA/prompts/templates.jsonl" \
    "$DATA/prompts/selfquery.jsonl" --output "$DATA/shards" --max-new-tokens 512 --batch 64 --threads 2 \
    --minutes "$MINUTES"
