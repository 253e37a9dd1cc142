"""Our chains inside vLLM 0.32, as a custom-class proposer:

    LLM(model=BASE, speculative_config={"method": "custom_class", "num_speculative_tokens": K,
        "model": "medusaforge.serving.vllm.proposer.MedusaforgeProposer"})

with the drafter named in the environment (SpeculativeConfig 0.32 has no field for a custom
proposer's own options, and the environment reaches vLLM's worker processes):
    MEDUSAFORGE_DRAFTER    a heads folder (`medusaforge train`, any layout import_heads reads) or an
                           EAGLE-3 draft (`train --method eagle3`, or its export); unset: lookup only
    MEDUSAFORGE_LOOKUP     1 (default) / 0: prompt-lookup chains when the context repeats
    MEDUSAFORGE_MAX_BATCH  draft nothing while more requests than this share a step (default 4)
    MEDUSAFORGE_LOOKUP_MIN_NGRAM  beside a model drafter, lookup after a match this long (default 2)
    MEDUSAFORGE_DRAFT_LOG  a file: one JSON line per drafted request and step (tests, debugging)

The interface, as vllm/v1/spec_decode/custom_class_proposer.py and v1/worker/gpu_model_runner.py
(0.32) define it: the class is built with the VllmConfig; the runner calls load_model(target) (CPU
runner: always) and, after each step's bookkeeping, propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu, slot_mappings=...), one list per request of the runner's input batch. Hidden states
are not passed, so load_model hooks the target: a forward hook keeps the last forward's final
hidden states and positions (and, for EAGLE-3, the aux hidden states vLLM's own EAGLE-3 path asks
the model for, stripped from the output so the runner sees what it expects). Rows are mapped to
requests with the runner's query_start_loc and input batch, which load_model finds as the object
whose `drafter` is this proposer.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from medusaforge.serving.vllm import check_vllm_version, options_from_env

check_vllm_version()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from medusaforge.drafters.chain import ChainDrafter, ChainRequest  # noqa: E402
from medusaforge.drafters.eagle3_proposer import prepare_draft  # noqa: E402
from medusaforge.interop.eagle3_layout import check_capturable, find_eagle3_folder, import_eagle3  # noqa: E402
from medusaforge.interop.importer import import_heads  # noqa: E402


class _BaseView(nn.Module):
    """What prepare_draft reads of a base model: its input embeddings (vLLM's, unpadded)."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


class MedusaforgeProposer:
    """vLLM's custom-class proposer drafting our chains (see the module docstring)."""

    def __init__(self, vllm_config) -> None:
        self.num_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.hf_config = vllm_config.model_config.hf_config.get_text_config()
        self.dtype = vllm_config.model_config.dtype
        self.options = options_from_env(os.environ)
        self.chains: ChainDrafter | None = None
        self.runner = None
        self.captured: tuple | None = None  # (positions [T], hidden [T, H], aux [T, H] per captured layer or None)
        self.layer_slot: dict[int, int] = {}  # feature layer -> index into the captured aux list

    # ---- loading -----------------------------------------------------------------------------

    def load_model(self, target_model: nn.Module) -> None:
        self.runner = _find_runner(self)
        heads = eagle3 = None
        folder = self.options["drafter"]
        if folder is not None:
            eagle_folder = find_eagle3_folder(folder)
            if eagle_folder is not None:
                eagle3 = self._load_eagle3(eagle_folder, target_model)
            else:
                heads = self._load_heads(folder, target_model)
        self.chains = ChainDrafter(self.num_tokens, heads=heads, eagle3=eagle3, lookup=self.options["lookup"],
                                   lookup_min_ngram=self.options["lookup_min_ngram"], max_batch=self.options["max_batch"])
        if self.chains.feature_layers:
            layers = tuple(sorted(set(self.chains.feature_layers)))
            # The same switch vLLM's eagle3 method flips (runner._setup_eagle3_aux_hidden_state_outputs):
            # the model then returns (hidden, [aux per layer, in sorted order]).
            target_model.set_aux_hidden_state_layers(layers)
            self.layer_slot = {layer: i for i, layer in enumerate(layers)}
        if heads is not None or eagle3 is not None:
            target_model.register_forward_hook(self._capture, with_kwargs=True)

    def _load_heads(self, folder: str, target_model: nn.Module) -> nn.Module:
        path = Path(folder)
        if not (path / "config.json").is_file() and (path / "heads" / "config.json").is_file():
            path = path / "heads"  # a `train --out` folder
        heads = import_heads(path)
        config = heads.config
        if (config.hidden_size, config.vocab_size) != (self.hf_config.hidden_size, self.hf_config.vocab_size):
            raise ValueError(f"MEDUSAFORGE_DRAFTER={folder}: heads for hidden {config.hidden_size} / vocab "
                             f"{config.vocab_size}, the served model has {self.hf_config.hidden_size} / {self.hf_config.vocab_size}")
        weight = target_model.lm_head.weight
        heads.to(device=weight.device, dtype=self.dtype).eval()
        if config.shared_lm_head:
            heads.init_from_base(weight[: config.vocab_size])  # vLLM pads the vocabulary to a multiple of 64
        return heads

    def _load_eagle3(self, folder: Path, target_model: nn.Module) -> nn.Module:
        # vLLM's Llama-family models keep the embedding at model.embed_tokens (no get_input_embeddings).
        weight = target_model.model.embed_tokens.weight[: self.hf_config.vocab_size]
        embed = nn.Embedding.from_pretrained(weight, freeze=True)
        draft = import_eagle3(folder, embed, base_num_layers=self.hf_config.num_hidden_layers)
        check_capturable(draft.feature_layers, self.hf_config.num_hidden_layers)
        return prepare_draft(draft, _BaseView(embed).to(dtype=self.dtype))

    def _capture(self, module, args, kwargs, output):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        if isinstance(output, tuple):  # (hidden, aux): hand the runner the hidden states only
            hidden, aux = output
            self.captured = (positions, hidden, aux)
            return hidden
        self.captured = (positions, output, None)
        return output

    # ---- drafting ----------------------------------------------------------------------------

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_) -> list[list[int]]:
        runner = self.runner
        num_reqs = len(sampled_token_ids)
        req_ids = runner.input_batch.req_ids[:num_reqs]
        self.chains.retain(runner.requests)  # finished requests' states go
        max_batch = self.chains.max_batch
        if max_batch is not None and not self.chains.feature_layers and sum(map(bool, sampled_token_ids)) > max_batch:
            # A large batch drafts nothing (ChainDrafter.step would say so too). Only an EAGLE-3 cache
            # must see every step; a lookup index catches up from the full text when drafting resumes.
            return [[] for _ in range(num_reqs)]
        query_start = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        positions, hidden, aux = self.captured if self.captured is not None else (None, None, None)
        if positions is not None:
            positions = positions[: query_start[-1]].tolist()  # one device sync per step, not one per request
        requests, rows = [], []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:  # a prefill chunk that is not the last one, or a discarded request
                continue
            total = int(num_tokens_no_spec[i])
            tokens = token_ids_cpu[i, :total].tolist()
            if positions is not None:
                first = query_start[i]
                start = positions[first]
                run = slice(first, first + total - 1 - start)  # the accepted positions of this step
                request = ChainRequest(req_ids[i], tokens, start, hidden=hidden[run] if self.chains.needs_hidden else None,
                                       features=self._features(aux, run))
            else:  # lookup only: no hidden states needed; the step "ran" the last position
                request = ChainRequest(req_ids[i], tokens, total - 2)
            requests.append(request)
            rows.append(i)
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        for i, chain in zip(rows, self.chains.step(requests)):
            drafts[i] = chain
        if self.options["draft_log"]:
            self._log(requests, [drafts[i] for i in rows])
        return drafts

    def _features(self, aux, run: slice) -> torch.Tensor | None:
        """[n, 3, H] in the draft's feature-layer order (a layer listed twice is captured once)."""
        if not self.chains.feature_layers:
            return None
        return torch.stack([aux[self.layer_slot[layer]][run] for layer in self.chains.feature_layers], dim=1)

    def _log(self, requests: list[ChainRequest], chains: list[list[int]]) -> None:
        with open(self.options["draft_log"], "a") as log:
            for request, chain in zip(requests, chains):
                state = self.chains.states.get(request.req_id)
                source = state.chosen[-1] if state is not None and state.chosen and chain else None
                log.write(json.dumps({"req_id": request.req_id, "num_tokens": len(request.tokens), "start": request.start,
                                      "chain": chain, "source": source}) + "\n")


def _find_runner(proposer):
    """The model runner that holds `proposer` as its drafter: the caller of load_model (vLLM 0.32's
    CPU and GPU runners call self.drafter.load_model(self.model) from their own load_model)."""
    frame = inspect.currentframe()
    while frame is not None:  # f_back only: inspect.stack() would read every frame's source file
        candidate = frame.f_locals.get("self")
        if getattr(candidate, "drafter", None) is proposer:
            return candidate
        frame = frame.f_back
    raise RuntimeError("MedusaforgeProposer.load_model was not called by a vLLM model runner holding it as its "
                       "drafter; this vLLM version is not supported (see medusaforge.serving.vllm.SUPPORTED_VLLM)")
