"""The cost fit, the tree-size choice and the adaptive drafting rule on hand-made numbers."""

import pytest

from medusaforge.decoding.adaptive import AdaptiveDrafting, accepted_if_truncated, candidate_sizes, expected_accept_by_size
from medusaforge.decoding.cost import StepCost, choose_draft_size, fit_step_cost
from medusaforge.decoding.tree_search import choose_tree


def test_fit_recovers_a_line_through_exact_points():
    cost = fit_step_cost([1, 2, 4, 8], [0.101, 0.102, 0.104, 0.108])
    assert cost.fixed == pytest.approx(0.100) and cost.per_node == pytest.approx(0.001)
    assert cost(16) == pytest.approx(0.116)


def test_fit_ignores_wild_single_timings():
    # three interleaved rounds of 10 + 1 ms/node; two samples hit by a burst of load (+60 ms)
    sizes = [1, 4, 8, 16] * 3
    seconds = [0.010 + 0.001 * n for n in sizes]
    seconds[0] += 0.060  # the 157 ms 1-node sample of issue 14
    seconds[6] += 0.060
    cost = fit_step_cost(sizes, seconds)
    assert cost.fixed == pytest.approx(0.010, abs=1e-9) and cost.per_node == pytest.approx(0.001, abs=1e-9)


def test_fit_never_fits_a_negative_slope_and_needs_two_sizes():
    assert fit_step_cost([1, 2], [0.2, 0.1]).per_node == 0.0
    with pytest.raises(ValueError, match="two different"):
        fit_step_cost([4, 4], [0.1, 0.1])


def test_choice_takes_the_most_tokens_per_second_and_no_drafting_unless_beaten():
    cost = StepCost(fixed=0.100, per_node=0.010)  # 4 nodes: 140 ms, 16 nodes: 260 ms
    # tokens/s: plain 1/0.1 = 10; 4 nodes 1.6/0.14 = 11.4; 16 nodes 2.5/0.26 = 9.6
    assert choose_draft_size({4: 1.6, 16: 2.5}, cost, plain_seconds=0.100) == 4
    # issue 14's AVX2 host: a plain step far cheaper than any tree step -> no drafting
    assert choose_draft_size({4: 1.6, 16: 2.5}, cost, plain_seconds=0.093 / 1.5) == 0
    # a tie with plain decoding is not a win
    assert choose_draft_size({4: 1.4}, cost, plain_seconds=0.100) == 0


def test_a_fitted_step_cheaper_than_a_plain_step_is_not_believed():
    # This host's `tree` fit after a busy minute: 55.4 ms + 1.43 ms per node, a plain step 60.5 ms.
    cost, plain = StepCost(fixed=0.0554, per_node=0.00143), 0.0605
    # Taken at its word, a 1-node draft that is never accepted (1.0 token per step) costs 56.8 ms
    # and "beats" the plain step; floored at 60.5 + 1.43 = 61.9 ms it does not.
    assert choose_draft_size({1: 1.0}, cost, plain) == 0
    # One that pays still wins: 6 nodes at 60.5 + 8.6 = 69.1 ms, 1.83 tokens: 26.5 tok/s against 16.5.
    assert choose_draft_size({1: 1.0, 6: 1.83}, cost, plain) == 6
    # At 61.9 ms, 1.12 tokens per step is 18.1 tok/s, above plain's 16.53; 1.02 is 16.48, below it.
    assert choose_draft_size({1: 1.12}, cost, plain) == 1 and choose_draft_size({1: 1.02}, cost, plain) == 0


def test_choose_tree_fits_drafted_sizes_and_times_plain_on_its_own():
    timings = {0: [0.093, 0.094, 0.300], 1: [0.157, 0.100], 4: [0.097, 0.112], 8: [0.113, 0.118]}
    size, cost, plain = choose_tree({1: 1.5, 4: 2.05, 8: 2.2}, timings)
    assert plain == pytest.approx(0.094)  # the median of the plain steps alone, the 300 ms burst ignored
    # By hand, through the six drafted timings only (plain's would pull the line down):
    #   slopes between sizes, sorted: -.02, -.015, -.0062857, -.0055714, -.001, .00025 | .0015,
    #   .0018571, .0025714, .004, .004, .00525 -> median (.00025 + .0015) / 2 = .000875 s per node;
    #   y - .000875 n: .156125, .099125, .0935, .1085, .106, .111 -> median (.106 + .1085) / 2 = .10725 s.
    assert cost.per_node == pytest.approx(0.000875) and cost.fixed == pytest.approx(0.10725)
    # tokens/s: 1 node 1.5 / .108125 = 13.9; 4 nodes 2.05 / .11075 = 18.5; 8 nodes 2.2 / .11425 = 19.3;
    # plain 1 / .094 = 10.6 -> 8 nodes
    assert size == 8
    assert choose_tree({4: 1.05}, timings)[0] == 0  # a tree that accepts almost nothing: plain wins


def test_accepted_if_truncated_counts_the_path_prefix_inside_the_cut():
    nodes = [0, 1, 3, 6]  # three candidates accepted, node indices increasing along the path
    assert [accepted_if_truncated(nodes, size) for size in (0, 1, 2, 3, 5, 6, 10)] == [0, 1, 1, 2, 2, 3, 3]


def test_expected_accept_by_size_uses_only_steps_that_drafted_that_many():
    history = [(7, [0, 1, 3]), (7, [0]), (2, [0, 2]), (0, [0])]
    expected = expected_accept_by_size(history, [0, 1, 2, 4, 7])
    assert expected[0] == 1.0
    assert expected[1] == pytest.approx(1 + 1 / 3)  # steps drafting >= 1: accepted 1, 0, 0
    assert expected[2] == pytest.approx(1 + 2 / 3)  # [0,1,3] -> 1, [0] -> 0, [0,2] -> 1
    assert expected[4] == pytest.approx(1 + 2 / 2)  # only the two 7-node steps
    assert candidate_sizes(7) == [0, 1, 2, 4, 7] and candidate_sizes(0) == [0]


def run_rule(rule, accepted_per_step, full=7, seconds=lambda n: 0.1 + 0.01 * n, steps=40):
    """Drive the rule as the decoder does; accepted_per_step(step) -> accepted node indices at full size."""
    sizes = []
    for step in range(steps):
        size = rule.next_size()
        drafted = full if size is None else size
        nodes = [n for n in accepted_per_step(step) if n <= drafted]
        rule.record(drafted, nodes, seconds(drafted))
        sizes.append(drafted)
    return sizes


def test_rule_keeps_drafting_while_it_pays():
    rule = AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1)
    sizes = run_rule(rule, lambda step: [0, 1, 3, 7])  # the last node is needed: 4 tokens / 0.17 s
    assert sizes == [7] * 40
    # the same acceptance without its last node: nodes 5..7 do not pay, the first 4 are kept
    sizes = run_rule(AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1), lambda step: [0, 1, 2, 4])
    assert all(size == (7 if (i + 1) % 8 == 0 or i == 0 else 4) for i, size in enumerate(sizes))


def test_rule_stops_drafting_when_nothing_is_accepted_and_backs_off_its_probes():
    rule = AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1)
    sizes = run_rule(rule, lambda step: [0], steps=200)
    # step 1 drafts (nothing known yet); each probe that finds nothing doubles the wait: 8, 16, 32,
    # 64, then 64 again (the cap) -> probes at steps 8, 24, 56, 120, 184
    probes = [i + 1 for i, size in enumerate(sizes) if size == 7]
    assert probes == [1, 8, 24, 56, 120, 184]
    assert sizes.count(0) == 200 - len(probes)


def test_a_probe_that_pays_brings_probing_back_to_every_8th_step():
    rule = AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1)
    # nothing accepted until step 56's probe (index 55), all 7 nodes accepted from then on
    sizes = run_rule(rule, lambda step: [0] if step < 55 else [0, 1, 2, 3, 4, 5, 6, 7], steps=80)
    assert [i + 1 for i, size in enumerate(sizes[:55]) if size == 7] == [1, 8, 24]
    assert sizes[55:] == [7] * 25


def test_rule_shrinks_to_the_nodes_that_are_accepted():
    # only node 1 is ever accepted: one candidate node gives 2 tokens for 0.11 s, the best rate
    rule = AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1)
    sizes = run_rule(rule, lambda step: [0, 1])
    assert sizes[1:7] == [1] * 6


def test_rule_starts_drafting_again_when_acceptance_comes_back():
    rule = AdaptiveDrafting(StepCost(0.1, 0.01), plain_seconds=0.1)
    sizes = run_rule(rule, lambda step: [0] if step < 20 else [0, 1, 2, 4])
    assert sizes[18] == 0 and sizes[-1] == 7


def test_rule_times_plain_steps_itself_without_a_given_cost():
    rule = AdaptiveDrafting()
    # a plain step costs 0.1 s, a 7-node draft 0.8 s: drafting never pays at 1 accepted token
    sizes = run_rule(rule, lambda step: [0, 1], seconds=lambda n: 0.1 + 0.1 * n)
    assert 0 in sizes[:16] and sizes[-4:].count(7) <= 1 and sizes.count(0) > 20


def test_rule_stops_a_drafter_whose_fixed_cost_does_not_pay():
    # An EAGLE-like drafter: running it costs 30 ms whatever the cut, a plain step 30 ms, and 1 of
    # 16 nodes is accepted (1.6 tokens per 66 ms against 1 per 30 ms). A line through every size,
    # plain included, puts the plain step near 49 ms and would keep drafting.
    def seconds(n):
        return 0.030 if n == 0 else 0.060 + 0.0004 * n

    sizes = run_rule(AdaptiveDrafting(), lambda step: [0, 1] if step % 5 < 3 else [0], full=16, seconds=seconds)
    assert sizes[-8:].count(0) >= 7


def test_only_a_probe_turns_drafting_back_on():
    # Own timings. A 7-node draft costs 0.8 s and accepts 1 node (2 tokens: 2.5 tok/s), a plain step
    # 0.1 s, except on steps 30-45, when the host is busy and a plain step takes 1 s (1 tok/s): a rule
    # that re-decided on plain steps would start drafting there, a step after the slow timings came in.
    step_number = iter(range(1, 1000))

    def seconds(n):
        step = next(step_number)
        return 0.1 + 0.1 * n if n else (1.0 if 30 <= step <= 45 else 0.1)

    sizes = run_rule(AdaptiveDrafting(), lambda step: [0, 1], seconds=seconds, steps=60)
    # steps 1-6 alternate drafting and plain (three plain timings), then the probes at 8, 24 and 56
    assert [i + 1 for i, size in enumerate(sizes) if size] == [1, 3, 5, 8, 24, 56]
