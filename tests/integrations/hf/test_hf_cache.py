"""Which cache a converted decoder uses: ``generate()`` and ``forward(use_cache=True)``
follow the attention implementation in force (issue 26 item 9); a hand-written decoding
loop gets ``FavorCache`` (issue 25 build item 3); ``set_compiled_decoding`` decodes as
the eager steps do."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import CACHE, ids, left_padded, tiny_llama  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    convert,
    set_compiled_decoding,
)


def test_switching_back_to_exact_attention_generates_as_the_original():
    original = tiny_llama()
    prompt = ids(2, 7)
    expect = original.generate(prompt, max_new_tokens=6, do_sample=False)
    model = convert(copy.deepcopy(original), "favor", num_features=16, window=3, sinks=1)
    converted = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert (model(prompt).logits - original(prompt).logits).abs().max() > 1e-4

    model.set_attn_implementation("sdpa")
    res = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(res.sequences, expect)
    assert not isinstance(res.past_key_values, FavorCache)
    torch.testing.assert_close(model(prompt).logits, original(prompt).logits)
    # A FavorCache cannot serve the exact attention: refused, not silently wrong.
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model(prompt, past_key_values=FavorCache(model), use_cache=True)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model.generate(prompt, max_new_tokens=2, past_key_values=FavorCache(model))

    # And back to linear attention: FavorCache again, the converted model's tokens.
    model.set_attn_implementation("linattn")
    res = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, FavorCache)
    assert torch.equal(res.sequences, converted)


# ----------------------------------------------------------------- forward(use_cache=True)


def returned_cache(out):
    return out.get(CACHE)


def llama(layers=2, seed=0):
    model = tiny_llama(seed)
    if layers == 2:
        return model
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


OPTS = [
    {"num_features": 16},
    {"num_features": 16, "window": 3, "sinks": 1},
    {"kernel": "hedgehog", "window": 4, "sinks": 2},
]
OPT_IDS = ["softmax", "softmax-w3-s1", "hedgehog-w4-s2"]


@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_hand_written_loop_equals_generate_and_the_parallel_forward(opts):
    model = convert(tiny_llama(), "favor", **opts)
    prompt, new = ids(2, 7), 8
    out = model(prompt, use_cache=True)
    cache = returned_cache(out)
    assert isinstance(cache, FavorCache)
    seq, logits, sizes = prompt, [out.logits], []
    for _ in range(new):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        out = model(nxt, use_cache=True, **{CACHE: returned_cache(out)})
        assert returned_cache(out) is cache
        logits.append(out.logits)
        sizes.append(cache.state_bytes())
    # The greedy tokens of generate(), the logits of one parallel forward.
    assert torch.equal(seq[:, :-1], model.generate(prompt, max_new_tokens=new - 1, do_sample=False))
    full = model(seq, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)
    # O(1) in the number of tokens: the state does not grow.
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert cache.get_seq_length() == 7 + new


def test_hand_written_loop_with_left_padding_equals_each_sequence_alone():
    model = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1)
    a, b = ids(1, 9, seed=1), ids(1, 5, seed=2)
    x, mask = left_padded(a, b)
    out = model(x, attention_mask=mask, use_cache=True)
    nxt = torch.tensor([[7], [9]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    step = model(nxt, attention_mask=mask, use_cache=True, **{CACHE: returned_cache(out)})
    for row, p in ((0, a), (1, b)):
        alone = model(torch.cat([p, nxt[row : row + 1]], 1)).logits[0, -1]
        torch.testing.assert_close(step.logits[row, -1], alone, rtol=1e-9, atol=1e-9)


def test_a_plain_forward_keeps_the_parallel_form_and_its_cache_continues():
    model = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1)
    x = ids(2, 11)
    out = model(x[:, :8])  # use_cache not asked for: the config's default (True)
    assert torch.equal(out.logits, model(x[:, :8], use_cache=False).logits)
    cache = returned_cache(out)
    assert isinstance(cache, FavorCache)
    logits = [out.logits]
    for t in range(8, 11):
        out = model(x[:, t : t + 1], **{CACHE: returned_cache(out)})
        logits.append(out.logits)
        if t == 9:
            folded = cache.state_bytes()
    assert cache.state_bytes() == folded
    torch.testing.assert_close(torch.cat(logits, 1), model(x).logits, rtol=1e-9, atol=1e-9)
    # The cache counts every token, the lazy prefill's included.
    assert cache.get_seq_length() == 11


def test_beam_reordering_after_a_lazy_prefill_reorders_its_kept_tokens():
    # Beam search reorders the cache between steps (Cache.reorder_cache): after a lazy
    # prefill the keys and values it kept (not yet folded into the state) follow too.
    model = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1)
    x = ids(2, 9)
    out = model(x[:, :8])
    cache = returned_cache(out)
    assert isinstance(cache, FavorCache)
    assert any(layer.pending is not None for layer in cache.layers)
    order = torch.tensor([1, 0])
    cache.reorder_cache(order)
    step = model(x[order, 8:9], **{CACHE: cache})
    alone = model(x[order]).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], alone, rtol=1e-9, atol=1e-9)


def test_a_dynamic_cache_is_converted_once():
    # One layer: its keys do not depend on the attention, so the exact model's DynamicCache
    # holds exactly the keys and values the converted model computes.
    original = llama(layers=1)
    model = convert(copy.deepcopy(original), "favor", num_features=16, window=2, sinks=1)
    a, b = ids(1, 9, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    filled = transformers.DynamicCache()
    # Positions from the mask, as the converted model derives them.
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    original(x, attention_mask=mask, position_ids=pos, use_cache=True, **{CACHE: filled})
    nxt = torch.tensor([[5], [8]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    out = model(nxt, attention_mask=mask2, use_cache=True, **{CACHE: filled})
    assert isinstance(returned_cache(out), FavorCache)
    for row, p in ((0, a), (1, b)):
        alone = model(torch.cat([p, nxt[row : row + 1]], 1)).logits[0, -1]
        torch.testing.assert_close(out.logits[row, -1], alone, rtol=1e-9, atol=1e-9)
    # The DynamicCache did not see that token: using it again is refused, not wrong.
    with pytest.raises(ValueError, match="already turned into a FavorCache"):
        model(nxt, attention_mask=mask2, use_cache=True, **{CACHE: filled})
    # An empty one is simply replaced (generate() with an explicit DynamicCache).
    res = model.generate(
        a,
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        **{CACHE: transformers.DynamicCache()},
    )
    assert isinstance(res[CACHE], FavorCache)
    assert torch.equal(res.sequences, model.generate(a, max_new_tokens=4, do_sample=False))


def test_other_caches_are_refused():
    model = convert(tiny_llama(), "favor", num_features=16)
    other = transformers.StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="not a StaticCache"):
        model(ids(1, 4), use_cache=True, **{CACHE: other})


def test_the_decoder_stack_alone_gets_a_favor_cache():
    model = convert(tiny_llama(), "favor", num_features=16, window=3)
    x = ids(1, 9)
    out = model.model(x[:, :6], use_cache=True)
    assert isinstance(returned_cache(out), FavorCache)
    step = model.model(x[:, 6:], use_cache=True, **{CACHE: returned_cache(out)})
    full = model.model(x).last_hidden_state
    torch.testing.assert_close(step.last_hidden_state, full[:, 6:], rtol=1e-9, atol=1e-9)


def test_use_cache_false_makes_no_cache():
    model = convert(tiny_llama(), "favor", num_features=16)
    assert returned_cache(model(ids(1, 5), use_cache=False)) is None


def test_a_lazy_cache_keeps_the_unrepeated_keys_of_grouped_query_attention():
    # tiny_llama: 4 query heads share 2 key/value heads; the kept keys are the 2.
    model = convert(tiny_llama(), "favor", num_features=16, window=3)
    cache = returned_cache(model(ids(1, 6)))
    keys, values, *_ = cache.layers[0].pending
    assert keys.shape[1] == values.shape[1] == 2


@pytest.mark.parametrize("far_rope", [True, False])
def test_the_decoding_state_keeps_the_ring_per_key_value_head(far_rope):
    # tiny_llama: 4 query heads, 2 key/value heads. The window ring, its far keys and the
    # sink slots are kept for the 2; the feature-map sums for the 4. Decoding equals the
    # parallel forward either way (the loop test above); here: after a lazy prefill and
    # after an eager one.
    opts = dict(kernel="hedgehog", window=3, sinks=1, far_rope=far_rope)
    model = convert(tiny_llama(), "favor", **opts)
    x = ids(2, 12)
    for first in (model(x[:, :8]), model(x[:, :8], use_cache=True)):
        out, logits = first, [first.logits]
        for t in range(8, 12):
            out = model(x[:, t : t + 1], **{CACHE: returned_cache(out)})
            logits.append(out.logits)
        torch.testing.assert_close(torch.cat(logits, 1), model(x).logits, rtol=1e-9, atol=1e-9)
        state = returned_cache(out).layers[0].state
        assert state.kv.shape[1] == 4
        fields = ["keys", "values", "sink_keys", "sink_values"] + ([] if far_rope else ["far_keys"])
        for field in fields:
            assert getattr(state, field).shape[1] == 2, field
        assert (state.far_keys is None) == far_rope


def test_gradient_checkpointing_in_training_gets_no_cache():
    # The checkpointed layers run twice: a recurrent state would absorb the tokens twice.
    model = convert(tiny_llama(), "favor", num_features=16, window=3)
    model.gradient_checkpointing_enable()
    model.train()
    x = ids(1, 7)
    out = model(x, use_cache=True)
    assert returned_cache(out) is None
    out.logits.sum().backward()
    model.eval()
    torch.testing.assert_close(out.logits.detach(), model(x, use_cache=False).logits)


def test_decoding_reuses_one_checked_linear_factor_until_it_changes():
    from linattn.integrations.hf.state import converted_layers

    model = convert(tiny_llama(), "favor", kernel="hedgehog", window=4, sinks=1)
    state = next(converted_layers(model)).linattn
    with torch.no_grad():
        first = state.linear_factor()
        assert state.linear_factor() is first
        # A change in place is seen (version counter) and refused when not finite.
        state.log_linear_factor[0] = float("nan")
        again = state.linear_factor()
        assert again is not first and torch.isnan(again[0])
        with pytest.raises(ValueError, match="linear_factor must be finite"):
            model(ids(1, 6), use_cache=True)
    # Building a gradient: a fresh factor in the graph.
    assert state.linear_factor().requires_grad


def test_compiled_decoding_generates_as_the_eager_steps(compiled_steps):
    calls = compiled_steps
    opts = dict(kernel="hedgehog", window=3, sinks=1, far_rope=False, far_decay=5.0)
    model = convert(tiny_llama(), "favor", **opts)
    prompt = ids(2, 7)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    eager = model.generate(prompt, **kw)
    assert not calls
    assert set_compiled_decoding(model) is model
    comp = model.generate(prompt, **kw)
    # Every new token after the first (the prefill) in every layer: compiled steps.
    assert len(calls) == 5 * model.config.num_hidden_layers
    assert torch.equal(comp.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(comp.scores), torch.stack(eager.scores))
    set_compiled_decoding(model, False)
    model.generate(prompt, **kw)
    assert len(calls) == 5 * model.config.num_hidden_layers
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_compiled_decoding(model, 1)
    with pytest.raises(ValueError, match="method='favor'"):
        set_compiled_decoding(tiny_llama())
