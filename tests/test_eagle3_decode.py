"""EAGLE-3 decoding: greedy output identical to generate() on tiny Llama and Qwen2 bases with the
draft forced right and forced wrong; the draft's KV cache after acceptance equals one built token
by token; sampling with speculative sampling is lossless."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medusaforge.decoding.decoder import speculative_generate
from medusaforge.decoding.loading import hf_greedy
from medusaforge.decoding.verify import new_cache, prefill, verify_step
from medusaforge.drafters.eagle3 import DraftKVCache, Eagle3Draft, draft_config_from_base
from medusaforge.decoding.loading import load_eagle3_proposer
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.interop.eagle3_layout import export_eagle3

VOCAB, HIDDEN, LAYERS, CYCLE = 256, 32, 4, 16


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models: on a shared 2-core host, several intra-op threads per matmul make these tests
    ~30x slower (seen: 17 s vs 0.55 s for one decode), so they run on one thread, then restore it.
    The slow SmolLM2 test keeps the host's setting."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
FEATURES = (1, 2, 3)
PROMPTS = [[5, 9, 3, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 17, 42]]


def tiny_base(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(LlamaConfig(**fields)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**fields))
    return model.float().eval()


def random_draft(base, seed: int = 1) -> Eagle3Draft:
    torch.manual_seed(seed)
    return Eagle3Draft(draft_config_from_base(base.config, VOCAB, FEATURES), base.get_input_embeddings()).eval()


def cycle_base(kind: str) -> torch.nn.Module:
    """A base whose greedy next token after token u < 16 is u + 1 (mod 16): its layers add nothing
    (o_proj, down_proj zero), the first 16 embeddings are orthonormal, lm_head row u+1 reads token u."""
    base = tiny_base(kind)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.linalg.qr(torch.randn(HIDDEN, CYCLE))[0].T  # [16, H] orthonormal rows
        base.model.embed_tokens.weight[:CYCLE] = basis
        base.lm_head.weight.zero_()
        base.lm_head.weight[(torch.arange(CYCLE) + 1) % CYCLE] = 3.0 * basis
    return base


def cycle_draft(base, right: bool, draft_vocab: int = VOCAB) -> Eagle3Draft:
    """A draft that adds nothing to its input either, so its output hidden is fc(features) = the
    embedding of the token u at the verified position, at every depth. Forced right, its top-3 are
    u+2, u+3, u+4: exactly the base's tokens at depth 1, 2 and 3 (rank d-1 at depth d), so long
    paths are accepted only when the tree grows past the top-1 chain. Forced wrong: u+7, u+8, u+9.
    With draft_vocab < VOCAB the draft predicts a scattered subset of tokens (the cycle's among them)
    through d2t / t2d."""
    torch.manual_seed(1)
    draft = Eagle3Draft(draft_config_from_base(base.config, draft_vocab, FEATURES), base.get_input_embeddings()).eval()
    target_of = torch.arange(VOCAB)  # draft id -> target id
    if draft_vocab < VOCAB:
        others = CYCLE + torch.randperm(VOCAB - CYCLE)[: draft_vocab - CYCLE]
        target_of = torch.cat([torch.sort(others).values, torch.arange(CYCLE)])  # cycle tokens last: d2t != 0
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[target_of] = True
        draft.set_vocab(target_of - torch.arange(draft_vocab), t2d)
    draft_id = {int(t): d for d, t in enumerate(target_of.tolist())}
    embed = base.model.embed_tokens.weight[:CYCLE]
    shift = 2 if right else 7
    with torch.no_grad():
        draft.midlayer.self_attn.o_proj.weight.zero_()
        draft.midlayer.mlp.down_proj.weight.zero_()
        draft.fc.weight.zero_()
        draft.fc.weight[:, :HIDDEN] = torch.eye(HIDDEN)  # the first feature layer: still the embedding here
        draft.lm_head.weight.zero_()
        for rank, weight in enumerate((3.0, 2.99, 2.98)):  # near ties: the tree keeps all three ranks
            rows = [draft_id[(u + shift + rank) % CYCLE] for u in range(CYCLE)]
            draft.lm_head.weight[rows] += weight * embed
    return draft


def decode(base, proposer, prompt, max_new_tokens=24, **sampling):
    return speculative_generate(base, proposer, torch.tensor(prompt), max_new_tokens, **sampling)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_equals_generate_with_a_random_draft(kind):
    base = tiny_base(kind)
    proposer = Eagle3Proposer(random_draft(base), DynamicTree(topk=3, depth=4, num_nodes=10))
    for prompt in PROMPTS:
        result = decode(base, proposer, prompt)
        assert result.tokens == hf_greedy(base, torch.tensor(prompt), 24, [])
        assert max(result.drafted) == 10


@pytest.mark.parametrize("kind,draft_vocab", [("llama", VOCAB), ("qwen2", VOCAB), ("llama", 40)])
@pytest.mark.parametrize("right", [True, False])
def test_greedy_equals_generate_with_the_draft_forced_right_or_wrong(kind, draft_vocab, right):
    base = cycle_base(kind)
    proposer = Eagle3Proposer(cycle_draft(base, right, draft_vocab), DynamicTree(topk=3, depth=4, num_nodes=21))
    prompt = [3, 4, 5]
    result = decode(base, proposer, prompt, max_new_tokens=30)
    expected = hf_greedy(base, torch.tensor(prompt), 30, [])
    assert expected[:3] == [6, 7, 8]  # the base really is the cycle
    assert result.tokens == expected
    if right:
        # depth 1-3 right on every step (rank 0, 1, 2), depth 4 wrong: 3 accepted + the base's token
        assert result.accepted[:-1] == [3] * (len(result.accepted) - 1)
    else:
        assert result.accepted == [0] * len(result.accepted)


def reference_cache(draft, base, text: list[int], length: int) -> DraftKVCache:
    """The draft cache over positions 0..length-1 built one position at a time from a plain base
    forward over the text: entry p reads the base features at p and the token at p+1."""
    with torch.inference_mode():
        hidden_states = base(torch.tensor([text]), output_hidden_states=True).hidden_states
        fused = draft.fuse(draft.select_features(hidden_states))
        cache = None
        for p in range(length):
            _, cache = draft.step(torch.tensor([[text[p + 1]]]), fused[:, p : p + 1], torch.tensor([[p]]), cache)
    return cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_draft_cache_after_acceptance_equals_one_built_token_by_token(kind):
    base = cycle_base(kind)
    with torch.no_grad():  # give the draft real keys and values (cycle_draft zeroes only outputs)
        for layer in base.model.layers:
            layer.mlp.down_proj.weight.normal_(std=0.02)
    draft = cycle_draft(base, right=True)
    proposer = Eagle3Proposer(draft, DynamicTree(topk=3, depth=4, num_nodes=20))
    cache = new_cache(base)
    prompt = torch.tensor([3, 4, 5, 6])
    verified = prefill(base, cache, prompt, proposer.feature_layers)
    proposer.update(verified)
    text = verified.tokens + [verified.next_token]
    accepted = []
    for _ in range(4):
        draft_tree = proposer.propose(text, verified)
        verified = verify_step(base, cache, draft_tree, proposer.feature_layers)
        proposer.update(verified)
        accepted.append(verified.accepted)
        text += verified.tokens[1:] + [verified.next_token]
    assert max(accepted) >= 2  # tree entries were added and thrown away on the accepted path
    assert proposer.committed < len(text) - 1  # the last step's features are queued, not yet read
    proposer.catch_up()
    assert proposer.committed == len(proposer.cache) == len(text) - 1
    expected = reference_cache(draft, base, text, len(text) - 1)
    torch.testing.assert_close(proposer.cache.keys, expected.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proposer.cache.values, expected.values, atol=1e-5, rtol=1e-5)


def test_tree_is_best_first_and_sized_as_asked():
    base = tiny_base("llama")
    proposer = Eagle3Proposer(random_draft(base), DynamicTree(topk=4, depth=3, num_nodes=12))
    cache = new_cache(base)
    verified = prefill(base, cache, torch.tensor(PROMPTS[1]), proposer.feature_layers)
    proposer.update(verified)
    tree = proposer.propose(verified.tokens + [verified.next_token], verified)
    assert tree.num_nodes == 13 and int(tree.tokens[0]) == verified.next_token
    assert all(parent < node for node, parent in enumerate(tree.parents) if node)
    depths = [0]
    for parent in tree.parents[1:]:
        depths.append(depths[parent] + 1)
    assert max(depths) <= 3 and depths.count(1) <= 4
    with pytest.raises(ValueError, match="topk must be at least 1"):
        DynamicTree(topk=0)


def test_loads_an_exported_folder(tmp_path):
    base = cycle_base("llama")
    draft = cycle_draft(base, right=True)
    export_eagle3(draft, tmp_path / "eagle3", base_num_layers=LAYERS)
    proposer = load_eagle3_proposer(tmp_path / "eagle3", base, DynamicTree(topk=3, depth=4, num_nodes=20))
    result = decode(base, proposer, [3, 4, 5], max_new_tokens=30)
    assert result.tokens == hf_greedy(base, torch.tensor([3, 4, 5]), 30, [])
    assert sum(result.accepted) >= 2 * len(result.accepted)


def soft_cycle_base(kind: str) -> torch.nn.Module:
    """The cycle base made random: after token u < 16 it samples u+1 (~0.69) or u+2 (~0.31) at
    temperature 1; the other 254 tokens share ~0.2%."""
    base = cycle_base(kind)
    basis = base.model.embed_tokens.weight[:CYCLE].clone()
    with torch.no_grad():
        base.lm_head.weight.zero_()
        base.lm_head.weight[(torch.arange(CYCLE) + 1) % CYCLE] = 2.0 * basis
        base.lm_head.weight[(torch.arange(CYCLE) + 2) % CYCLE] += 1.85 * basis
    return base


def assert_sampled_like(expected: dict[tuple, float], counts: dict[tuple, int], samples: int) -> None:
    """Every sequence above 2% probability is sampled at its exact rate, within 5 standard errors."""
    for key, p in expected.items():
        if p > 0.02:
            tolerance = 5 * (p * (1 - p) / samples) ** 0.5
            assert abs(counts.get(key, 0) / samples - p) <= tolerance, (key, counts.get(key, 0) / samples, p)


def exact_three_token_probabilities(base, prompt: list[int], floor: float = 1e-3) -> dict[tuple, float]:
    """p(x1) p(x2 | x1) p(x3 | x1, x2) from plain base forwards, for sequences above `floor`."""
    with torch.inference_mode():
        first = torch.softmax(base(torch.tensor([prompt])).logits[0, -1].float(), -1)
        out = {}
        for x1 in torch.nonzero(first > floor).flatten().tolist():
            second = torch.softmax(base(torch.tensor([prompt + [x1]])).logits[0, -1].float(), -1)
            for x2 in torch.nonzero(first[x1] * second > floor).flatten().tolist():
                third = torch.softmax(base(torch.tensor([prompt + [x1, x2]])).logits[0, -1].float(), -1)
                for x3 in torch.nonzero(first[x1] * second[x2] * third > floor).flatten().tolist():
                    out[(x1, x2, x3)] = float(first[x1] * second[x2] * third[x3])
    return out


def test_speculative_sampling_is_lossless_through_the_decoder():
    base = soft_cycle_base("llama")
    proposer = Eagle3Proposer(cycle_draft(base, right=True), DynamicTree(topk=3, depth=3, num_nodes=12))
    prompt, samples = [3, 4, 5], 1500
    expected = exact_three_token_probabilities(base, prompt)
    generator = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    accepted = 0
    for _ in range(samples):
        result = decode(base, proposer, prompt, max_new_tokens=3, temperature=1.0, speculative=True, generator=generator)
        key = tuple(result.tokens)
        counts[key] = counts.get(key, 0) + 1
        accepted += sum(result.accepted)
    assert accepted > samples // 2  # drafts were accepted, so the rejection rule itself was exercised
    assert_sampled_like(expected, counts, samples)


def test_eval_generate_and_export_take_an_eagle3_drafter(tmp_path, capsys):
    import json

    from medusaforge.cli import main
    from medusaforge.models import load_base_model
    from tests.helpers import save_tiny_model, write_jsonl

    model_dir = save_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    draft = Eagle3Draft(draft_config_from_base(base.config, 64, (0, 1, 1)), base.get_input_embeddings())
    draft.save(tmp_path / "run" / "draft")  # as train --method eagle3 leaves it
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"turns": ["What is the capital of France?"]}])
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(model_dir), "--drafter", str(tmp_path / "run"), "--prompts", str(prompts),
          "--max-new-tokens", "12", "--dtype", "fp32", "--warmup-tokens", "2", "--json", str(out),
          "--eagle-topk", "2", "--eagle-depth", "3", "--eagle-nodes", "6"])
    result = json.loads(out.read_text())
    assert result["drafter"] == "eagle3" and result["identical"] is True and result["num_identical"] == 2
    assert result["tree"] == {"topk": 2, "depth": 3, "num_nodes": 6} and len(result["per_head_acceptance"]) == 3

    main(["generate", "--model", str(model_dir), "--drafter", str(tmp_path / "run" / "draft"), "--prompt", "Hello",
          "--max-new-tokens", "6", "--dtype", "fp32", "--temperature", "0.8"])
    assert "verify steps" in capsys.readouterr().out

    main(["export", "--heads", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--model", str(model_dir),
          "--dtype", "bf16", "--eval-json", str(out)])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["torch_dtype"] == "bfloat16"
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 1]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 0, 0]
    assert "accept_length" in (tmp_path / "export" / "README.md").read_text()


def test_a_bf16_draft_keeps_float32_rotary_frequencies():
    from medusaforge.drafters.eagle3_proposer import prepare_draft

    base = tiny_base("llama").to(torch.bfloat16)
    draft = prepare_draft(random_draft(tiny_base("llama")), base)
    assert draft.fc.weight.dtype == torch.bfloat16
    reference = type(draft.rotary_emb)(draft.config)
    assert draft.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(draft.rotary_emb.inv_freq, reference.inv_freq)


def test_tree_search_chooses_an_eagle_tree_that_generate_and_eval_read(tmp_path, monkeypatch):
    import json

    from medusaforge.cli import main
    from medusaforge.decoding import eagle_tree_search
    from medusaforge.decoding.loading import load_eagle_tree
    from medusaforge.models import load_base_model
    from tests.helpers import save_tiny_model, write_jsonl

    model_dir = save_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    Eagle3Draft(draft_config_from_base(base.config, 64, (0, 1, 1)), base.get_input_embeddings()).save(tmp_path / "run" / "draft")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"prompt": "The capital of France?"}])
    out = tmp_path / "tree.json"
    real_time_steps, real_expected_accept = eagle_tree_search.time_steps, eagle_tree_search.expected_accept

    def step_costs_by_formula(draft, trees, base, prefix, rounds):
        # The real steps still run; their seconds are replaced by a formula, so the choice does not
        # hang on the load of the host: plain steps 10 ms, drafted ones 10 ms + 0.5 ms per node.
        timings = real_time_steps(draft, trees, base, prefix, rounds)
        assert all(len(times) == rounds for times in timings.values())
        return {kind: [0.010 + 0.0005 * kind[2]] * rounds for kind in timings}

    def accept_by_formula(draft, tree, *args):
        # The real calibration decode still runs; an untrained draft accepts nothing, so its figures
        # are replaced by ones a trained draft might reach: the 2-node tree has the most tokens per second.
        measured = real_expected_accept(draft, tree, *args)
        assert set(measured) == {1, 2, 4} and all(value >= 1.0 for value in measured.values())
        return {1: 1.4, 2: 1.6, 4: 1.7}

    monkeypatch.setattr(eagle_tree_search, "time_steps", step_costs_by_formula)
    monkeypatch.setattr(eagle_tree_search, "expected_accept", accept_by_formula)
    main(["tree", "--model", str(model_dir), "--drafter", str(tmp_path / "run"), "--prompts", str(prompts),
          "--calibration-tokens", "8", "--sizes", "1", "2", "4", "--repeats", "2", "--eagle-topks", "2",
          "--eagle-depths", "2", "3", "--dtype", "fp32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(row["topk"], row["depth"]) for row in saved["search"]["rows"]] == [(2, 2), (2, 3)]
    # 1.4 / 10.5 ms, 1.6 / 11 ms, 1.7 / 12 ms: 2 nodes win, at the first depth tried (a tie breaks to it)
    assert load_eagle_tree(out) == DynamicTree(2, 2, 2)
    # adaptive drafting reads the chosen tree's fitted step cost: the formula's line, fitted back
    assert saved["step_cost"]["fixed_ms"] == pytest.approx(10.0) and saved["step_cost"]["per_node_ms"] == pytest.approx(0.5)
    assert saved["plain_step_ms"] == pytest.approx(10.0)
    # eval decodes with the chosen tree on every step (adaptive drafting off: the untrained draft
    # itself would not pay) and stays identical.
    main(["eval", "--model", str(model_dir), "--drafter", str(tmp_path / "run"), "--prompts", str(prompts),
          "--max-new-tokens", "8", "--dtype", "fp32", "--warmup-tokens", "2", "--json", str(tmp_path / "eval.json"),
          "--tree", str(out), "--adaptive", "false"])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["tree"] == saved["eagle"]
    assert result["identical"] is True and result["num_identical"] == 2
    assert result["plain_steps"] == 0 and result["mean_draft_nodes"] >= 1
    # A forced choice reads back as a DynamicTree.
    (tmp_path / "forced.json").write_text(json.dumps({"eagle": {"topk": 2, "depth": 3, "num_nodes": 4}}))
    assert load_eagle_tree(tmp_path / "forced.json") == DynamicTree(2, 3, 4)
    (tmp_path / "medusa.json").write_text(json.dumps({"paths": [[0]]}))
    with pytest.raises(ValueError, match="not an EAGLE-3 tree file"):
        load_eagle_tree(tmp_path / "medusa.json")


@pytest.mark.slow
def test_smollm2_eagle3_greedy_is_identical_to_generate():
    """The real SmolLM2-135M-Instruct in fp32 with a draft fitted for a few steps to the base's own
    continuation of one prompt: multi-token acceptance happens, and the output equals generate()."""
    from medusaforge.data.prompts import encode_prompt
    from medusaforge.drafters.eagle3_proposer import prepare_draft
    from medusaforge.models import load_base_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    base = load_base_model("smollm2-135m-instruct", dtype=torch.float32)
    eos = [tokenizer.eos_token_id]
    prompts = ["Write a haiku about the sea.", "List three uses of a paper clip."]
    encoded = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    expected = [hf_greedy(base, ids, 40, eos) for ids in encoded]

    draft = Eagle3Draft(draft_config_from_base(base.config, base.config.vocab_size), base.get_input_embeddings())
    sequence = torch.cat([encoded[0], torch.tensor(expected[0])])[None]
    with torch.no_grad():
        fused_input = draft.select_features(base(sequence, output_hidden_states=True).hidden_states)
    optimizer = torch.optim.Adam(draft.parameters(), lr=3e-3)
    start, steps = len(encoded[0]) - 2, 3
    for _ in range(40):  # step k at position i predicts token i + 2 + k (the draft docstring's alignment)
        hiddens = draft.unroll(sequence, draft.fuse(fused_input), steps)
        loss = sum(
            F.cross_entropy(draft.logits(h[0, start : sequence.shape[1] - 2 - k]), sequence[0, start + 2 + k :])
            for k, h in enumerate(hiddens)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    proposer = Eagle3Proposer(prepare_draft(draft, base), DynamicTree(topk=4, depth=4, num_nodes=12))
    accepted = []
    for ids, reference in zip(encoded, expected):
        result = speculative_generate(base, proposer, ids, 40, eos)
        assert result.tokens == reference
        accepted += result.accepted
    assert max(accepted) >= 2


def test_adaptive_drafting_skips_a_wrong_draft_and_stays_identical():
    from medusaforge.decoding.adaptive import AdaptiveDrafting

    base = cycle_base("llama")
    proposer = Eagle3Proposer(cycle_draft(base, right=False), DynamicTree(topk=3, depth=4, num_nodes=21))
    result = decode(base, proposer, [3, 4, 5], max_new_tokens=40, adaptive=AdaptiveDrafting(window=4, probe_every=3))
    assert result.tokens == hf_greedy(base, torch.tensor([3, 4, 5]), 40, [])
    assert 0 in result.drafted  # plain steps queue the verified features; the next draft reads them
    proposer.catch_up()
    assert proposer.committed == 3 + len(result.tokens) - 1


@pytest.mark.parametrize("right", [True, False])
def test_eagle3_with_lookup_is_lossless_and_names_each_steps_source(right):
    from medusaforge.decoding.decoder import eagle3_generate
    from medusaforge.drafters.lookup import LookupProposer

    base = cycle_base("llama")
    proposer = Eagle3Proposer(cycle_draft(base, right), DynamicTree(topk=3, depth=3, num_nodes=9))
    # The cycle repeats every 16 tokens, so after one lap lookup's chains match the text so far.
    prompt = list(range(3, 16)) + [0, 1, 2, 3, 4]
    result = eagle3_generate(base, proposer, torch.tensor(prompt), 40, lookup=LookupProposer(num_tokens=6))
    assert result.tokens == hf_greedy(base, torch.tensor(prompt), 40, [])
    assert len(result.sources) == result.num_steps
    assert "lookup" in result.sources or "both" in result.sources  # a lookup chain was the accepted path
    if not right:
        assert "eagle3" not in result.sources  # a wrong draft never supplies the accepted path


def test_eagle3_with_lookup_samples_the_base_distribution():
    from medusaforge.decoding.decoder import eagle3_generate
    from medusaforge.drafters.lookup import LookupProposer

    base = soft_cycle_base("llama")
    proposer = Eagle3Proposer(cycle_draft(base, right=True), DynamicTree(topk=3, depth=3, num_nodes=12))
    # [3, 4, 5, 3, 4, 5]: lookup's 3-gram match proposes 3 4 5 again, a chain the draft never drafts.
    prompt, samples = [3, 4, 5, 3, 4, 5], 1500
    expected = exact_three_token_probabilities(base, prompt)
    generator = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    for _ in range(samples):
        result = eagle3_generate(base, proposer, torch.tensor(prompt), 3, temperature=1.0, generator=generator,
                                 lookup=LookupProposer(num_tokens=3))
        counts[tuple(result.tokens)] = counts.get(tuple(result.tokens), 0) + 1
    assert_sampled_like(expected, counts, samples)
