#!/bin/bash
# One 8B recipe on 1 node x 8 GPUs, end to end: plan, distill through vLLM, train under torchrun.
#   examples/run_8b_recipe.sh HUB_ID PREFIX SHIPPED_CONFIG RECIPE
# e.g. examples/run_8b_recipe.sh meta-llama/Llama-3.1-8B-Instruct llama3.1-8b llama-3.1-8b-instruct medusa1
# (the per-recipe scripts beside this one pass these). Reads configs/PREFIX-distill.yaml and
# configs/PREFIX-RECIPE-train.yaml; outputs go where those files say (runs/PREFIX/...).
# Variables: NPROC (8 GPUs), GPU_GIB (80: the memory the plan checks against), PORT (8000),
# START_SERVER (1: start `vllm serve` for the distillation and stop it before training; 0: use the
# server already at http://localhost:$PORT/v1), SKIP_DISTILL (1: the replies are already there).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=$1 PREFIX=$2 SHIPPED=configs/models/$3 RECIPE=$4
NPROC=${NPROC:-8}
GPU_GIB=${GPU_GIB:-80}
PORT=${PORT:-8000}
DISTILL=configs/$PREFIX-distill.yaml
TRAIN=configs/$PREFIX-$RECIPE-train.yaml
mkdir -p runs

# 1. Does the run fit? Built from the shipped config.json on the meta device: no weights, seconds.
medusaforge train --config "$TRAIN" --model "$SHIPPED" --plan --plan-gpus 1 "$NPROC" --device-memory-gib "$GPU_GIB"

# 2. The target writes the replies, through an OpenAI-compatible server (resumable: a rerun asks
#    only the prompts still missing). vLLM takes every GPU with data parallelism, and is stopped
#    before training needs them.
if [ "${SKIP_DISTILL:-0}" != 1 ]; then
    server=""
    if [ "${START_SERVER:-1}" = 1 ]; then
        vllm serve "$MODEL" --port "$PORT" --data-parallel-size "$NPROC" > "runs/$PREFIX-vllm.log" 2>&1 &
        server=$!
        trap '[ -n "$server" ] && kill "$server" 2>/dev/null || true' EXIT
        until curl -sf "http://localhost:$PORT/v1/models" > /dev/null; do
            kill -0 "$server" 2>/dev/null || { echo "vllm serve exited; see runs/$PREFIX-vllm.log" >&2; exit 1; }
            sleep 5
        done
    fi
    medusaforge distill --config "$DISTILL" --endpoint "http://localhost:$PORT/v1"
    if [ -n "$server" ]; then
        kill "$server"
        wait "$server" 2>/dev/null || true
        server=""
    fi
fi

# 3. Train on every GPU. --resume auto continues from the newest complete checkpoint after a crash
#    or a requeue (and starts fresh when there is none). For a base that does not fit replicated,
#    add --fsdp-base (the plan's "+fsdp-base" rows).
torchrun --standalone --nproc-per-node "$NPROC" -m medusaforge.cli train --config "$TRAIN" --resume auto
