"""Run inside the vLLM venv (not by pytest): load heads folders with vLLM's own Medusa code and
print the tokens its proposer drafts from fixed hidden states.

  .venv-vllm/bin/python tests/vllm_draft_tokens.py SPEC.json OUT.json

SPEC.json: {"base": HF folder, "hidden": safetensors file with "hidden" [N, hidden_size],
"dtype": "float32", "drafts": {name: heads folder}}. OUT.json: {name: [[token per head] per
position]} or {name: {"error": message}} when vLLM refuses the folder.

What runs is vLLM's: EngineArgs -> SpeculativeConfig (method detection, config renaming),
MedusaProposer.load_model (its model loader and Medusa.load_weights) and MedusaProposer.propose
(the blocks, compute_logits with its LogitsProcessor and token_map, argmax per head). Only the
engine around it (scheduler, KV cache, the base model's forward) is left out, so that the hidden
states can be fixed.
"""

import json
import sys
import traceback

import torch
from safetensors.torch import load_file
from vllm.config import set_current_vllm_config
from vllm.distributed.parallel_state import (
    init_distributed_environment,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.spec_decode.medusa import MedusaProposer
from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

# The model loader ends with torch.accelerator.empty_cache(), which raises on a machine with no
# accelerator; vLLM's CPU model runner turns the accelerator calls into no-ops first, and so do we.
_set_torch_accelerator_to_noop()


def draft_tokens(base: str, heads: str, hidden: torch.Tensor, dtype: str) -> list:
    config = json.load(open(f"{heads}/config.json"))
    num_heads = config.get("num_heads") or config["medusa_num_heads"]
    args = EngineArgs(model=base, dtype=dtype, max_model_len=256, seed=0,
                      speculative_config={"method": "medusa", "model": heads, "num_speculative_tokens": num_heads})
    vllm_config = args.create_engine_config()
    with set_current_vllm_config(vllm_config):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:29517",
                                         local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
        proposer = MedusaProposer(vllm_config, torch.device("cpu"))
        proposer.load_model(None)
        with torch.inference_mode():
            tokens = proposer.propose(num_heads, hidden.to(vllm_config.model_config.dtype), None)
    return tokens.tolist()


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    hidden = load_file(spec["hidden"])["hidden"]
    results = {}
    for name, heads in spec["drafts"].items():
        try:
            results[name] = draft_tokens(spec["base"], heads, hidden, spec.get("dtype", "float32"))
        except Exception as error:  # a folder vLLM refuses is a result, not a crash of the harness
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
