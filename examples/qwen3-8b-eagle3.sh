#!/bin/bash
# An EAGLE-3 draft for Qwen/Qwen3-8B on 1 node x 8 GPUs: plan (configs/models/qwen3-8b), distill through
# vLLM (configs/qwen3-8b-distill.yaml), train under torchrun (configs/qwen3-8b-eagle3-train.yaml).
# See examples/run_8b_recipe.sh for the variables (NPROC, GPU_GIB, PORT, START_SERVER, SKIP_DISTILL).
exec "$(dirname "$0")/run_8b_recipe.sh" Qwen/Qwen3-8B qwen3-8b qwen3-8b eagle3
