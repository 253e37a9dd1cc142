import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusaforge.decoding.cost import StepCost
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.models import final_hidden_states
from medusaforge.decoding.tree_search import (
    expected_accept_length_from_frequencies,
    grow_tree_from_frequencies,
    path_frequencies,
    truth_ranks,
)


def test_truth_ranks_match_a_direct_recomputation():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    heads = MedusaHeads(32, 64, num_heads=3)
    heads.init_from_base(base.lm_head.weight)
    sequence = torch.randint(0, 64, (20,))
    ranks = truth_ranks(base, heads, sequence, prompt_length=8, max_rank=64)  # full vocab: always found
    assert ranks.shape == (20 - 2 - 7, 3)
    with torch.no_grad():
        hidden = final_hidden_states(base, sequence[None])[0]
        for row, t in enumerate(range(7, 18)):
            for k in range(3):
                if t + k + 2 >= 20:
                    assert ranks[row, k] == -1
                    continue
                order = heads.head_logits(hidden[t], k).argsort(descending=True)
                assert ranks[row, k] == (order == sequence[t + k + 2]).nonzero().item()


def test_tree_from_measured_rank_paths():
    # 4 calibration positions; -1 = the right token was not in that head's top-k
    rank_paths = torch.tensor([[0, 0], [0, 1], [1, 0], [-1, 0]])
    frequencies = path_frequencies(rank_paths)
    assert frequencies == {(0,): 0.5, (0, 0): 0.25, (0, 1): 0.25, (1,): 0.25, (1, 0): 0.25}
    tree = grow_tree_from_frequencies(frequencies, 3)
    assert tree == [[0], [1], [0, 0]]  # most often accepted first; ties: shorter first, then lower ranks
    assert expected_accept_length_from_frequencies(tree, frequencies) == pytest.approx(2.0)


def plain_10ms_drafted_plus_a_tenth_per_node(size: int) -> float:
    return 0.010 if size == 0 else 0.010 + 0.0001 * size


def test_tree_command_writes_a_loadable_tree_with_its_fitted_cost(tmp_path, monkeypatch):
    from helpers import save_tiny_model, write_jsonl

    from medusaforge.commands import tree as tree_command
    from medusaforge.commands.tree import TreeSearchConfig, run
    from medusaforge.decoding.loading import adaptive_drafting
    from medusaforge.decoding.tree import load_tree, load_tree_metadata
    from medusaforge.models import load_base_model, lm_head_of

    model_dir = save_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 2, 1, base_model=str(model_dir))
    heads.init_from_base(lm_head_of(base).weight)
    heads_dir = heads.save(tmp_path / "heads")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"prompt": "What is the capital of France?"}])
    out = tmp_path / "tree.json"
    config = TreeSearchConfig(model=str(model_dir), heads=heads_dir, prompts=str(prompts), limit=2, calibration_tokens=12,
                              sizes=[1, 2, 4], repeats=2, dtype="fp32", measure_prompts=0, out=out,
                              max_rank=64)  # deep enough lists that sizes 1, 2 and 4 are three distinct trees
    real_time_steps = tree_command.time_steps

    def step_costs_by_formula(base, heads, trees, prefix, rounds):
        # The real steps still run; their seconds come from a formula, so the choice does not hang
        # on the load of the host.
        timings = real_time_steps(base, heads, trees, prefix, rounds)
        assert set(timings) == set(trees) and all(len(times) == rounds for times in timings.values())
        return {size: [plain_10ms_drafted_plus_a_tenth_per_node(size)] * rounds for size in timings}

    monkeypatch.setattr(tree_command, "time_steps", step_costs_by_formula)
    config.validate()
    summary = run(config)
    paths, metadata = load_tree(out), load_tree_metadata(out)
    assert [row["nodes"] for row in summary["sizes"]][0] == 0  # "no drafting" is always a candidate
    # The formula's line comes back from the fit, and the size with the most tokens per second under
    # it wins. The tiny random heads accept 1.05-1.18 tokens per step, enough at 0.1 ms a node.
    assert metadata["step_cost"] == {"fixed_ms": 10.0, "per_node_ms": 0.1} and metadata["plain_step_ms"] == 10.0
    accept = {row["nodes"]: row["expected_accept_length"] for row in summary["sizes"] if row["nodes"]}
    best = max(accept, key=lambda n: (accept[n] / plain_10ms_drafted_plus_a_tenth_per_node(n), -n))
    assert summary["chosen"]["nodes"] == best > 0 and len(paths) == metadata["num_nodes"] == best
    rule = adaptive_drafting(out, dtype=torch.float32)  # the dtype the file was timed in
    assert rule.given_cost == StepCost(0.010, 0.0001) and rule.given_plain == 0.010
    assert metadata["dtype"] == "float32" and adaptive_drafting(out, dtype=torch.bfloat16).given_cost is None  # timed anew


def test_a_tree_file_in_the_heads_folder_is_found_a_stale_one_beside_it_is_not(tmp_path, capsys):
    from medusaforge.decoding.loading import fitted_tree_file

    run_out = tmp_path / "run"  # as train --out lays it out: OUT/heads, beside other files
    heads_dir = MedusaHeads(16, 32, num_heads=2).save(run_out / "heads")
    (run_out / "tree.json").write_text('{"paths": [[0]]}')  # beside the heads, not fitted to them
    assert fitted_tree_file(heads_dir) is None and fitted_tree_file(run_out) is None
    (heads_dir / "tree.json").write_text('{"paths": [[0], [0, 0]]}')
    assert fitted_tree_file(heads_dir) == fitted_tree_file(run_out) == heads_dir / "tree.json"
    assert "(fitted by `medusaforge tree`; --tree FILE overrides it)" in capsys.readouterr().out
    assert fitted_tree_file(run_out, tmp_path / "mine.json") == tmp_path / "mine.json"
    MedusaHeads(16, 32, num_heads=2).save(heads_dir)  # retrained into the same folder: the old tree goes
    assert fitted_tree_file(heads_dir) is None


def test_heads_step_cost_parts_leave_the_cache_as_they_found_it():
    from helpers import import_benchmark, tiny_llama

    heads_step_cost = import_benchmark("heads_step_cost")
    base = tiny_llama(64).eval()
    heads = MedusaHeads(base.config.hidden_size, 64, num_heads=2)
    heads.init_from_base(base.lm_head.weight)
    with torch.no_grad():  # as the script runs: the prefill's inference tensors meet the heads' parameters
        parts = heads_step_cost.step_parts(base, heads, [[0], [1], [0, 0]], torch.randint(0, 64, (12,)))
    assert list(parts) == ["plain", "propose", "verify", "base 1", "base 4", "lm_head 1", "lm_head 4"]
    # The parts share one KV cache holding the 11-token prefix: a part that left entries behind would
    # move where the next verify step starts.
    with torch.no_grad():
        first = parts["verify"]()
        for part in parts.values():
            part()
        again = parts["verify"]()
    assert first[0].start == again[0].start == 11 and first[0].tokens == again[0].tokens
