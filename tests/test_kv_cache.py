"""The in-place KV cache holds exactly what transformers' concatenating DynamicCache holds."""

import torch
from transformers import DynamicCache

from medusaforge.kv_cache import PreallocatedLayer, cache_kwarg, new_kv_cache

from helpers import tiny_llama


def states(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=generator), torch.randn(batch, 2, length, 4, generator=generator)


def test_writes_land_in_one_buffer_until_it_is_full_then_it_grows_by_half_keeping_every_entry():
    layer = PreallocatedLayer(capacity=6)
    first, second, third = states(3, 4, 0), states(3, 2, 1), states(3, 3, 2)
    layer.update(*first)
    buffer = layer.key_buffer
    keys, values = layer.update(*second)
    assert layer.key_buffer is buffer and keys.data_ptr() == buffer.data_ptr()  # no copy of the cache
    keys, values = layer.update(*third)  # 9 entries > 6: a new buffer of 9 + 4
    assert layer.key_buffer.shape[-2] == 13
    assert torch.equal(keys, torch.cat([first[0], second[0], third[0]], dim=-2))
    assert torch.equal(values, torch.cat([first[1], second[1], third[1]], dim=-2))


def test_crop_and_batch_select_behave_as_in_dynamic_cache():
    theirs = DynamicCache()
    ours_cache = DynamicCache()
    ours_cache.layers = [PreallocatedLayer()]
    for cache in (ours_cache, theirs):
        cache.update(*states(3, 5, 0), layer_idx=0)
        cache.crop(-2)
        cache.update(*states(3, 1, 1), layer_idx=0)
        cache.batch_select_indices(torch.tensor([2, 0]))
        cache.update(*states(2, 2, 2), layer_idx=0)
    assert ours_cache.get_seq_length() == theirs.get_seq_length() == 6
    assert torch.equal(ours_cache.layers[0].keys, theirs.layers[0].keys)
    assert torch.equal(ours_cache.layers[0].values, theirs.layers[0].values)


def test_a_model_decodes_the_same_logits_with_either_cache():
    model = tiny_llama(vocab_size=64)
    tokens = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, cache in (("ours", new_kv_cache(model.config)), ("dynamic", DynamicCache(config=model.config))):
        steps = [model(input_ids=tokens[:, :5], use_cache=True, **{cache_kwarg(model): cache}).logits]
        for t in range(5, 9):
            steps.append(model(input_ids=tokens[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits)
        logits[name] = torch.cat(steps, dim=1)
    assert all(type(layer) is PreallocatedLayer for layer in new_kv_cache(model.config).layers)
    torch.testing.assert_close(logits["ours"], logits["dynamic"], rtol=0, atol=1e-6)


def test_a_cache_filled_under_inference_mode_takes_writes_outside_it():
    layer = PreallocatedLayer(capacity=8)
    first, second = states(1, 3, 0), states(1, 1, 1)
    with torch.inference_mode():
        layer.update(*first)
    with torch.no_grad():
        keys, _ = layer.update(*second)
    assert torch.equal(keys, torch.cat([first[0], second[0]], dim=-2))
