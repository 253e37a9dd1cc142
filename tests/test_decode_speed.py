"""benchmarks/decode_speed.py's pure parts: method order, ratio spread over repeats, token-count notes."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_speed.py"
spec = importlib.util.spec_from_file_location("decode_speed", SCRIPT)
decode_speed = importlib.util.module_from_spec(spec)
sys.modules["decode_speed"] = decode_speed  # dataclasses look their module up while the script runs
spec.loader.exec_module(decode_speed)

GREEDY = decode_speed.GREEDY


def test_order_rotates_so_every_method_leads_once_per_cycle():
    names = [GREEDY, "a", "b"]
    assert decode_speed.rotated(names, 0) == [GREEDY, "a", "b"]
    assert decode_speed.rotated(names, 1) == ["a", "b", GREEDY]
    assert decode_speed.rotated(names, 2) == ["b", GREEDY, "a"]
    assert decode_speed.rotated(names, 4) == ["a", "b", GREEDY]  # wraps around
    assert decode_speed.rotated([], 3) == []


def test_time_methods_rotates_per_round_and_compares_first_outputs_with_greedy():
    calls = []

    def method(name, outputs):
        def run(prompt, max_new_tokens):
            calls.append(name)
            return outputs[prompt]
        return run

    methods = {
        GREEDY: method(GREEDY, {0: [1, 2, 3], 1: [4, 5]}),
        "a": method("a", {0: [1, 2, 3], 1: [4, 5]}),
        "b": method("b", {0: [1, 2, 3], 1: [4]}),  # stops one token early on prompt 1
    }
    tokens, seconds, per_prompt, identical = decode_speed.time_methods(methods, [0, 1], max_new_tokens=8, repeats=2)
    # 2 prompts x 2 repeats = 4 rounds, each starting one method later than the one before
    assert calls == [GREEDY, "a", "b", "a", "b", GREEDY, "b", GREEDY, "a", GREEDY, "a", "b"]
    assert tokens == {GREEDY: [5, 5], "a": [5, 5], "b": [4, 4]}
    assert all(len(s) == 2 and all(t > 0 for t in s) for s in seconds.values())
    assert per_prompt == {GREEDY: [3, 2], "a": [3, 2], "b": [3, 1]}
    assert identical == {GREEDY: 2, "a": 2, "b": 1}


def test_ratio_spread_is_median_and_range_of_per_repeat_ratios():
    tokens = {GREEDY: [100, 100, 100], "m": [100, 100, 100]}
    seconds = {GREEDY: [10.0, 10.0, 10.0], "m": [5.0, 8.0, 4.0]}  # 20, 12.5, 25 tok/s against 10
    spread = decode_speed.ratio_spread(tokens, seconds, GREEDY)
    assert (spread["m"].median, spread["m"].low, spread["m"].high) == (2.0, 1.25, 2.5)
    assert str(spread["m"]) == "2.00x (1.25-2.50)"
    assert (spread[GREEDY].median, spread[GREEDY].low, spread[GREEDY].high) == (1.0, 1.0, 1.0)


def test_ratio_spread_pairs_each_repeat_with_the_reference_of_the_same_repeat():
    # Repeat 1 ran under load that slowed both methods twice over: paired, every ratio stays 2.0.
    tokens = {GREEDY: [100, 100], "m": [100, 100]}
    seconds = {GREEDY: [10.0, 20.0], "m": [5.0, 10.0]}
    spread = decode_speed.ratio_spread(tokens, seconds, GREEDY)["m"]
    assert (spread.median, spread.low, spread.high) == (2.0, 2.0, 2.0)
    # fewer tokens in the same time is slower: 50 tokens in 5 s against 100 in 10 s is 1.0x
    tokens = {GREEDY: [100], "m": [50]}
    seconds = {GREEDY: [10.0], "m": [5.0]}
    assert decode_speed.ratio_spread(tokens, seconds, GREEDY)["m"].median == 1.0


def test_token_count_notes_name_methods_whose_counts_differ():
    per_prompt = {GREEDY: [10, 20, 30], "same": [10, 20, 30], "short": [10, 15, 30], "shuffled": [15, 15, 30]}
    notes = decode_speed.token_count_notes(per_prompt, GREEDY)
    assert notes == [
        f"short: 55 tokens against {GREEDY}'s 60 (-8.3%), different counts on 1 of 3 prompts: its tok/s is over different text",
        f"shuffled: 60 tokens against {GREEDY}'s 60 (+0.0%), different counts on 2 of 3 prompts: its tok/s is over different text",
    ]
    assert decode_speed.token_count_notes({GREEDY: [5, 6], "same": [5, 6]}, GREEDY) == []


def test_cpu_capability_reports_native_bf16_from_the_flags():
    assert decode_speed.cpu_capability({"avx2", "avx512f", "avx512_bf16"}) == (
        "cpu: avx2 yes  avx512_bf16 yes  amx_bf16 no  -> native bf16: yes")
    assert decode_speed.cpu_capability({"avx2", "amx_bf16", "amx_tile"}).endswith("amx_bf16 yes  -> native bf16: yes")
    assert decode_speed.cpu_capability({"avx2"}) == "cpu: avx2 yes  avx512_bf16 no  amx_bf16 no  -> native bf16: no"
    assert "unknown" in decode_speed.cpu_capability(None)


def test_report_shows_spread_token_notes_and_drafting_over_plain(capsys):
    plain, drafted = f"{decode_speed.PLAIN} (plain steps)", "medusa default tree (16 nodes)"
    methods = dict.fromkeys([GREEDY, plain, drafted])
    steps = {plain: ([], [0, 0], [0, 0]), drafted: ([], [1, 0], [4, 4])}
    tokens = {GREEDY: [100, 100], plain: [100, 100], drafted: [90, 90]}
    seconds = {GREEDY: [10.0, 10.0], plain: [12.5, 10.0], drafted: [5.0, 6.0]}  # plain 0.80x / 1.00x greedy
    per_prompt = {GREEDY: [50, 50], plain: [50, 50], drafted: [50, 40]}
    decode_speed.print_report(methods, steps, tokens, seconds, per_prompt, {GREEDY: 2, plain: 2, drafted: 1}, 2, 2)
    out = capsys.readouterr().out
    assert "median of 2 repeats (min-max over repeats)" in out
    assert "0.90x (0.80-1.00)" in out  # plain row: median of 0.80 and 1.00
    assert "1.65x (1.50-1.80)" in out  # drafted: 18 and 15 tok/s against 10
    assert f"{drafted}: 90 tokens against {GREEDY}'s 100 (-10.0%), different counts on 1 of 2 prompts" in out
    # over our plain decoding: 18/8 = 2.25 and 15/10 = 1.5 -> median 1.875
    assert "drafting rows over it: medusa default tree 1.88x (1.50-2.25)" in out


def test_report_with_one_repeat_says_there_is_no_spread(capsys):
    methods = dict.fromkeys([GREEDY, "m"])
    decode_speed.print_report(methods, {}, {GREEDY: [100], "m": [100]}, {GREEDY: [10.0], "m": [8.0]},
                              {GREEDY: [100], "m": [100]}, {GREEDY: 1, "m": 1}, 1, 1)
    out = capsys.readouterr().out
    assert "one repeat, no spread" in out and "|              1.25x |" in out and "(1.25-1.25)" not in out
    assert "every method emitted the same count on every prompt" in out


def test_eagle_tree_shapes_zip_the_flags_and_widen_single_values():
    shapes = decode_speed.zip_tree_shapes([4], [2, 1], [8, 4])
    assert [(t.topk, t.depth, t.num_nodes) for t in shapes] == [(4, 2, 8), (4, 1, 4)]
    assert [(t.topk, t.depth, t.num_nodes) for t in decode_speed.zip_tree_shapes([8], [3], [8])] == [(8, 3, 8)]
    with pytest.raises(ValueError, match="same number of values"):
        decode_speed.zip_tree_shapes([4, 8], [2, 1, 3], [8])
