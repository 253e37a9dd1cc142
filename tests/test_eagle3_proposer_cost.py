"""The EAGLE-3 proposer's cost per step: its tree equals the per-node list version it replaced (kept
below as the reference) step after step, exact ties included; its host syncs do not grow with the
depth; the tree file a drafter folder carries is found; the draft-cost benchmark's shape parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusaforge.decoding.decoder import speculative_generate
from medusaforge.decoding.loading import fitted_tree_file
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.drafters.proposer import DraftTree

VOCAB, HIDDEN, LAYERS, FEATURES = 128, 32, 4, (1, 2, 3)
PROMPTS = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [100, 17, 42]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread on a shared 2-core host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float().eval()


def random_draft(base, draft_vocab: int = VOCAB, tied: bool = False, seed: int = 1) -> Eagle3Draft:
    """A random draft; with draft_vocab < VOCAB it predicts a scattered subset of tokens (d2t != 0).
    tied: lm_head rows come in identical pairs, so every node has children whose scores tie exactly."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(draft_config_from_base(base.config, draft_vocab, FEATURES), base.get_input_embeddings()).eval()
    if draft_vocab < VOCAB:
        target_of = torch.sort(torch.randperm(VOCAB)[:draft_vocab]).values
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[target_of] = True
        draft.set_vocab(target_of - torch.arange(draft_vocab), t2d)
    if tied:
        with torch.no_grad():
            draft.lm_head.weight[1::2] = draft.lm_head.weight[0::2][: draft_vocab // 2]
    return draft


@dataclass
class _Node:
    draft_id: int
    parent: int
    score: float
    depth: int
    hidden: torch.Tensor
    slot: int = -1


class ListProposer(Eagle3Proposer):
    """The proposer before its tensor rewrite, kept verbatim as the reference: one Python node object
    per candidate, a .tolist() per depth, the attention mask built node by node. (Added here only:
    `tied_steps` counts the steps whose chosen nodes include equal scores.)"""

    tied_steps = 0

    @torch.inference_mode()
    def propose(self, tokens, verified) -> DraftTree:
        self.catch_up()
        k = min(self.tree.topk, self.draft.config.draft_vocab_size)
        root_position = self.committed - 1
        nodes = self._children(self.last_hidden[None], [-1], [0.0], [0], k)
        frontier = list(range(len(nodes)))
        for depth in range(1, self.tree.depth):
            expand = sorted(frontier, key=lambda i: -nodes[i].score)[:k]
            outputs = self._expand(nodes, expand, root_position + depth)
            frontier = [len(nodes) + i for i in range(len(expand) * k)]
            nodes += self._children(outputs, expand, [nodes[i].score for i in expand], [depth] * len(expand), k)
        return self._select(nodes, tokens[-1])

    def _children(self, hiddens, parents, scores, depths, k):
        logprobs = torch.log_softmax(self.draft.logits(hiddens).float(), dim=-1)
        top = logprobs.topk(k, dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        return [_Node(indices[j][r], parents[j], scores[j] + values[j][r], depths[j] + 1, hiddens[j])
                for j in range(len(parents)) for r in range(k)]

    def _expand(self, nodes, expand, position):
        device = self.last_hidden.device
        draft_ids = torch.tensor([nodes[i].draft_id for i in expand], device=device)
        input_ids = self.draft.to_target(draft_ids)[None]
        hidden = torch.stack([nodes[i].hidden for i in expand])[None]
        past = len(self.cache)
        mask = torch.zeros(1, len(expand), past + len(expand), dtype=torch.bool, device=device)
        mask[:, :, : self.committed] = True
        for row, index in enumerate(expand):
            nodes[index].slot = past + row
            ancestor = nodes[index].parent
            while ancestor >= 0:
                mask[0, row, nodes[ancestor].slot] = True
                ancestor = nodes[ancestor].parent
            mask[0, row, past + row] = True
        positions = torch.full((1, len(expand)), position, device=device)
        out, self.cache = self.draft.step(input_ids, hidden, positions, self.cache, attention_mask=mask)
        return out[0]

    def _select(self, nodes, root):
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth, i))[: self.tree.num_nodes]
        self.tied_steps += len({nodes[i].score for i in order}) < len(order)
        position = {index: n + 1 for n, index in enumerate(order)}
        parents = (-1,) + tuple(0 if nodes[i].parent < 0 else position[nodes[i].parent] for i in order)
        device = self.last_hidden.device
        draft_ids = torch.tensor([nodes[i].draft_id for i in order], dtype=torch.long, device=device)
        tokens = torch.cat([torch.tensor([root], device=device), self.draft.to_target(draft_ids)])
        return DraftTree(tokens, parents)


class Lockstep:
    """Decodes with `new`; every step, `reference` proposes from the same verified state and the two
    trees must be equal, tokens and parents."""

    def __init__(self, new: Eagle3Proposer, reference: Eagle3Proposer) -> None:
        self.new, self.reference = new, reference
        self.feature_layers = new.feature_layers
        self.trees: list[DraftTree] = []

    def update(self, verified) -> None:
        self.new.update(verified)
        self.reference.update(verified)

    def propose(self, tokens, verified) -> DraftTree:
        tree, expected = self.new.propose(tokens, verified), self.reference.propose(tokens, verified)
        assert tree.tokens.tolist() == expected.tokens.tolist(), f"step {len(self.trees)}"
        assert tree.parents == expected.parents, f"step {len(self.trees)}"
        self.trees.append(tree)
        return tree


@pytest.mark.parametrize("shape,draft_vocab,tied", [
    ((3, 4, 10), VOCAB, False),
    ((4, 5, 16), VOCAB, True),   # exact sibling ties: the stable sorts must break them as Python's sorted did
    ((2, 1, 2), VOCAB, False),   # depth 1: no draft step after the root's
    ((4, 3, 100), 40, True),     # more nodes asked than drafted, a subset draft vocabulary
    ((5, 2, 7), 3, False),       # top-k above the draft vocabulary
])
def test_tree_equals_the_list_version_at_every_step(shape, draft_vocab, tied):
    base = tiny_base()
    draft = random_draft(base, draft_vocab, tied)
    tree = DynamicTree(*shape)
    lockstep = Lockstep(Eagle3Proposer(draft, tree), ListProposer(draft, tree))
    for prompt in PROMPTS:
        speculative_generate(base, lockstep, torch.tensor(prompt), 12, [])
    assert len(lockstep.trees) >= 3 * len(PROMPTS)
    largest = min(tree.num_nodes, sum(min(tree.topk, draft_vocab) ** min(d, 2) for d in range(1, tree.depth + 1)))
    assert {t.num_nodes for t in lockstep.trees} == {largest + 1}
    if tied:  # the ties were real: chosen nodes with equal scores, on most steps
        assert lockstep.reference.tied_steps >= len(lockstep.trees) // 2


def count_host_syncs(monkeypatch) -> dict:
    """Counts the tensor methods that copy a value to the host (and wait for the device to get there)."""
    calls = {"n": 0}
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("proposer_class", [Eagle3Proposer, ListProposer])
def test_host_syncs_per_step_do_not_grow_with_depth(monkeypatch, proposer_class):
    from medusaforge.decoding.verify import new_cache, prefill

    base = tiny_base()
    draft = random_draft(base)
    syncs = {}
    for depth in (2, 6):
        proposer = proposer_class(draft, DynamicTree(topk=3, depth=depth, num_nodes=12))
        verified = prefill(base, new_cache(base), torch.tensor(PROMPTS[1]), proposer.feature_layers)
        proposer.update(verified)
        proposer.catch_up()
        with monkeypatch.context() as patch:
            calls = count_host_syncs(patch)
            proposer.propose(verified.tokens + [verified.next_token], verified)
        syncs[depth] = calls["n"]
    if proposer_class is Eagle3Proposer:
        assert syncs == {2: 1, 6: 1}  # the parents tuple, once per step
    else:  # the counter does see per-depth syncs: the list version's grow with the depth
        assert syncs[6] > syncs[2] > 1


def write_tree_file(path: Path, chosen) -> None:
    path.write_text(json.dumps({"eagle": chosen}))


def test_a_tree_file_in_the_drafter_folder_is_found_and_a_given_one_wins(tmp_path, capsys):
    base = tiny_base()
    out = tmp_path / "eagle3-run"
    random_draft(base).save(out / "draft")  # as train --method eagle3 lays out OUT/draft
    assert fitted_tree_file(out) is None
    write_tree_file(out / "draft" / "tree.json", {"topk": 2, "depth": 3, "num_nodes": 4})
    assert fitted_tree_file(out) == out / "draft" / "tree.json"
    write_tree_file(out / "tree.json", {"topk": 8, "depth": 3, "num_nodes": 24})
    assert fitted_tree_file(out) == out / "tree.json"  # the folder given first, then its draft/
    assert "tree.json (fitted by `medusaforge tree`" in capsys.readouterr().out
    assert fitted_tree_file(out, tmp_path / "mine.json") == tmp_path / "mine.json"


def test_benchmark_shapes_default_fitted_and_given_without_repeats(tmp_path):
    import argparse

    from helpers import import_benchmark

    draft_cost = import_benchmark("draft_cost")
    assert draft_cost.parse_shape("8x3x24") == DynamicTree(8, 3, 24)
    with pytest.raises(argparse.ArgumentTypeError, match="TOPKxDEPTHxNODES"):
        draft_cost.parse_shape("8x3")
    given = [DynamicTree(8, 3, 24), DynamicTree()]
    assert draft_cost.shapes_to_time(None, given) == [DynamicTree(), DynamicTree(8, 3, 24)]
    write_tree_file(tmp_path / "tree.json", {"topk": 2, "depth": 3, "num_nodes": 4})
    assert draft_cost.shapes_to_time(tmp_path / "tree.json", given) == [DynamicTree(), DynamicTree(2, 3, 4), DynamicTree(8, 3, 24)]
    write_tree_file(tmp_path / "tree.json", None)  # the search chose no drafting: nothing extra to time
    assert draft_cost.shapes_to_time(tmp_path / "tree.json", []) == [DynamicTree()]


def test_eval_decodes_with_the_tree_file_in_the_drafter_folder(tmp_path):
    from medusaforge.cli import main
    from medusaforge.models import load_base_model
    from tests.helpers import save_tiny_model, write_jsonl

    model_dir = save_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    Eagle3Draft(draft_config_from_base(base.config, 64, (0, 1, 1)), base.get_input_embeddings()).save(tmp_path / "run" / "draft")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}])
    fitted = {"topk": 2, "depth": 2, "num_nodes": 3}
    write_tree_file(tmp_path / "run" / "tree.json", fitted)

    def eval_tree() -> dict:
        out = tmp_path / "eval.json"
        main(["eval", "--model", str(model_dir), "--drafter", str(tmp_path / "run"), "--prompts", str(prompts),
              "--max-new-tokens", "6", "--dtype", "fp32", "--warmup-tokens", "2", "--json", str(out)])
        result = json.loads(out.read_text())
        assert result["identical"] is True
        return result["tree"]

    assert eval_tree() == fitted
    (tmp_path / "run" / "tree.json").unlink()
    default = DynamicTree()
    assert eval_tree() == {"topk": default.topk, "depth": default.depth, "num_nodes": default.num_nodes}
