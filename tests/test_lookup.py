"""The prompt-lookup n-gram index on hand-made token streams."""

import pytest

from medusaforge.drafters.lookup import NgramIndex, lookup_chains


def test_longest_match_wins_over_a_more_recent_shorter_one():
    # [1, 2] occurs at 0-1 (followed by 3 4) and [2] alone more recently at 6 (followed by 9).
    # The suffix [1, 2] matches at 0-1, so the 2-gram continuation [3, 4] wins over [9, ...].
    index = NgramIndex(min_ngram=1, max_ngram=3, tokens=[1, 2, 3, 4, 5, 8, 2, 9, 1, 2])
    n, starts = index.longest_match()
    assert n == 2
    assert starts == [2]
    assert lookup_chains(index, num_tokens=3) == [[3, 4, 5]]


def test_most_recent_match_comes_first_and_distinct_continuations_become_branches():
    # [7, 8] occurs three times before the suffix: followed by 1, then 2, then 2 again (most recent).
    stream = [7, 8, 1, 0, 7, 8, 2, 0, 7, 8, 2, 5, 7, 8]
    index = NgramIndex(min_ngram=2, max_ngram=2, tokens=stream)
    n, starts = index.longest_match()
    assert (n, starts) == (2, [10, 6, 2])
    assert lookup_chains(index, num_tokens=2) == [[2, 5]]
    # The second distinct continuation ([2, 0]) is the next branch; [1, 0] is left out at 2 branches.
    assert lookup_chains(index, num_tokens=2, max_branches=2) == [[2, 5], [2, 0]]
    assert lookup_chains(index, num_tokens=2, max_branches=5) == [[2, 5], [2, 0], [1, 0]]


def test_no_match_gives_no_chain():
    index = NgramIndex(min_ngram=2, max_ngram=3, tokens=[1, 2, 3, 4, 5, 6])
    assert index.longest_match() == (0, [])
    assert lookup_chains(index, num_tokens=4) == []
    # Even 1-grams find nothing when every token is new.
    assert NgramIndex(min_ngram=1, max_ngram=3, tokens=[1, 2, 3]).longest_match() == (0, [])


def test_a_match_that_overlaps_the_end_continues_the_repeating_pattern():
    # Suffix [5, 6] also ended at position 1; what followed is [7, 5, 6] and then the guess itself.
    index = NgramIndex(min_ngram=1, max_ngram=2, tokens=[5, 6, 7, 5, 6])
    assert index.longest_match() == (2, [2])
    assert lookup_chains(index, num_tokens=7) == [[7, 5, 6, 7, 5, 6, 7]]
    # A run of one token: the suffix [4, 4, 4] matched one step earlier, period 1.
    run = NgramIndex(min_ngram=1, max_ngram=3, tokens=[9, 4, 4, 4, 4])
    assert lookup_chains(run, num_tokens=3) == [[4, 4, 4]]


def test_extending_token_by_token_equals_indexing_the_whole_stream():
    stream = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    incremental = NgramIndex(min_ngram=1, max_ngram=3, max_positions=2)
    for length in range(1, len(stream) + 1):
        incremental.extend(stream[length - 1 : length])
        whole = NgramIndex(min_ngram=1, max_ngram=3, max_positions=2, tokens=stream[:length])
        assert incremental.longest_match() == whole.longest_match()
        assert lookup_chains(incremental, 4, 2) == lookup_chains(whole, 4, 2)


def test_only_the_most_recent_positions_are_kept():
    # [1] occurs 5 times before the suffix; with max_positions 2 only the two latest remain.
    index = NgramIndex(min_ngram=1, max_ngram=1, max_positions=2, tokens=[1, 10, 1, 11, 1, 12, 1, 13, 1, 14, 1])
    assert index.longest_match() == (1, [9, 7])


def test_bad_sizes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        NgramIndex(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="max_positions"):
        NgramIndex(max_positions=0)


def test_scale_by_match_drafts_fewer_tokens_after_a_shorter_match():
    import torch

    from medusaforge.drafters.lookup import LookupProposer

    # A 4-gram match (of max 4) drafts all 8 tokens; a 1-gram match drafts ceil(8 * 1 / 4) = 2.
    long_match = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4]
    proposer = LookupProposer(num_tokens=8, max_ngram=4, scale_by_match=True)
    assert proposer.draft(long_match, "cpu").tokens.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    short_match = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 3]
    proposer.reset()
    draft = proposer.draft(short_match, "cpu")
    assert draft.tokens.tolist() == [3, 4, 5] and draft.parents == (-1, 0, 1)
    assert isinstance(draft.tokens, torch.Tensor)
