"""Run inside the vLLM venv (not by pytest): one engine, one mode, greedy generation of a batch.

  .venv-vllm/bin/python tests/vllm_generate.py SPEC.json OUT.json

SPEC.json: {"base": HF folder, "prompts": [[token ids] ...], "max_tokens": N, "dtype": "float32",
"speculative_config": dict or null, "env": {name: value} set before vLLM starts}.
OUT.json: {"token_ids": [[generated ids] per prompt], "drafter": {"class": ..., "lm_head_rows": [...]}
for a Medusa model drafter, "medusa_drafts": [[draft per head] per request] of vLLM's
MedusaProposer's first call}.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the script can look at the
drafter it built and record what vLLM's own Medusa proposer drafted.
"""

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.update(spec.get("env", {}))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.spec_decode.medusa import MedusaProposer

    medusa_drafts = []
    original_propose = MedusaProposer.propose

    def recording_propose(self, *args, **kwargs):
        drafts = original_propose(self, *args, **kwargs)
        medusa_drafts.append(drafts.tolist())
        return drafts

    MedusaProposer.propose = recording_propose
    llm = LLM(model=spec["base"], dtype=spec.get("dtype", "float32"), max_model_len=512, seed=0,
              speculative_config=spec.get("speculative_config"), enforce_eager=True, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)

    def describe(worker):
        drafter = getattr(worker.model_runner, "drafter", None)
        model = getattr(drafter, "model", None)
        if model is None:
            return {"class": type(drafter).__name__ if drafter is not None else None}
        return {"class": type(model).__name__, "lm_head_rows": [int(h.weight.shape[0]) for h in model.lm_heads]}

    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
              "drafter": llm.collective_rpc(describe)[0], "medusa_drafts": medusa_drafts[:1]}
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
