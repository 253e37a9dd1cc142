#!/bin/bash
# Medusa-1 heads for meta-llama/Llama-3.1-8B-Instruct on 1 node x 8 GPUs: plan (configs/models/llama-3.1-8b-instruct), distill through
# vLLM (configs/llama3.1-8b-distill.yaml), train under torchrun (configs/llama3.1-8b-medusa1-train.yaml).
# See examples/run_8b_recipe.sh for the variables (NPROC, GPU_GIB, PORT, START_SERVER, SKIP_DISTILL).
exec "$(dirname "$0")/run_8b_recipe.sh" meta-llama/Llama-3.1-8B-Instruct llama3.1-8b llama-3.1-8b-instruct medusa1
