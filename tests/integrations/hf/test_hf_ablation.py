"""Ablation switches of a FAVOR+-converted model (``attention_parts`` /
``set_attention_parts``): window-only equals exact softmax attention restricted to the
window and the sinks (a float64 oracle registered as its own attention function on the
unconverted model), linear-only equals the model converted without window and sinks, in
the parallel forward and in recurrent decoding through ``FavorCache``."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from hf_models import ids, tiny_bert, tiny_llama  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    attention_parts,
    convert,
    converted_layers,
    linattn_mask,
    set_attention_parts,
)

REF = "linattn_test_window_ref"


def window_ref_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Exact softmax attention over each query's window and the sinks only, written out
    (no linattn code): ``module.ref_window`` / ``module.ref_sinks`` say which keys."""
    window, sinks = module.ref_window, module.ref_sinks
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    b, _, length, _ = query.shape
    real = torch.ones(b, length, dtype=torch.bool)
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)[:, -length:]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    causal = bool(module.is_causal)
    near = torch.zeros(length, length, dtype=torch.bool)
    if window is not None:
        near = (i - window < j) & (j <= i) if causal else (i - j).abs() <= window
    sink = real & (real.long().cumsum(-1) <= sinks)  # [B, L]
    allowed = (near | sink[:, None, None, :]) & real[:, None, None, :]
    if causal:
        allowed = allowed & (j <= i)
    scores = (query @ key.transpose(-2, -1)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return (weights @ value).transpose(1, 2).contiguous(), None


def window_reference(original, window, sinks):
    """``original`` (unconverted) running :func:`window_ref_attention`."""
    AttentionInterface.register(REF, window_ref_attention)
    AttentionMaskInterface.register(REF, linattn_mask)
    ref = copy.deepcopy(original)
    for module in ref.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            module.ref_window, module.ref_sinks = window, sinks
    ref.set_attn_implementation(REF)
    return ref


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


LLAMA_CASES = [
    ({"kernel": "softmax", "num_features": 16, "window": 3, "sinks": 1}),
    ({"kernel": "softmax", "num_features": 16, "window": 4, "sinks": 0}),
    ({"kernel": "hedgehog", "window": 3, "sinks": 2}),
    ({"kernel": "relu", "window": None, "sinks": 1}),
]
CASE_IDS = ["softmax-w3-s1", "softmax-w4", "hedgehog-w3-s2", "relu-sinks-only"]


@pytest.mark.parametrize("opts", LLAMA_CASES, ids=CASE_IDS)
def test_decoder_ablations_equal_their_references(opts):
    original = tiny_llama()
    model = convert(copy.deepcopy(original), "favor", **opts)
    x = ids(2, 13)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0
    pos = positions(mask)
    hybrid = model(x, attention_mask=mask, position_ids=pos).logits

    with attention_parts(model, far=False):
        window_only = model(x, attention_mask=mask, position_ids=pos).logits
    ref = window_reference(original, opts["window"], opts["sinks"])
    expect = ref(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(window_only[0], expect[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(window_only[1, 3:], expect[1, 3:], rtol=1e-9, atol=1e-9)

    with attention_parts(model, near=False):
        linear_only = model(x, attention_mask=mask, position_ids=pos).logits
    plain = {**opts, "window": None, "sinks": 0}
    linear = convert(copy.deepcopy(original), "favor", **plain)
    expect = linear(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(linear_only[0], expect[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(linear_only[1, 3:], expect[1, 3:], rtol=1e-9, atol=1e-9)

    # The parts really differ, and leaving the block restores the hybrid exactly.
    assert (window_only - hybrid).abs().max() > 1e-6
    assert (linear_only - hybrid).abs().max() > 1e-6
    assert torch.equal(model(x, attention_mask=mask, position_ids=pos).logits, hybrid)


def test_encoder_ablations_equal_their_references():
    original = tiny_bert()
    model = convert(copy.deepcopy(original), "favor", num_features=16, window=2, sinks=1)
    x = ids(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    hybrid = model(x, attention_mask=mask).last_hidden_state
    with attention_parts(model, far=False):
        window_only = model(x, attention_mask=mask).last_hidden_state
    expect = window_reference(original, 2, 1)(x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(window_only[0], expect[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(window_only[1, :8], expect[1, :8], rtol=1e-9, atol=1e-9)
    with attention_parts(model, near=False):
        linear_only = model(x, attention_mask=mask).last_hidden_state
    linear = convert(copy.deepcopy(original), "favor", num_features=16)
    expect = linear(x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(linear_only[0], expect[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(linear_only[1, :8], expect[1, :8], rtol=1e-9, atol=1e-9)
    assert (window_only - hybrid).abs().max() > 1e-6
    assert (linear_only - hybrid).abs().max() > 1e-6


@pytest.mark.parametrize(
    "parts", [(True, False), (False, True)], ids=["window-only", "linear-only"]
)
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_recurrent_decoding_follows_the_parts(parts, kernel):
    model = convert(tiny_llama(), "favor", kernel=kernel, num_features=16, window=3, sinks=1)
    near, far = parts
    x = ids(2, 12)
    with attention_parts(model, near=near, far=far):
        full = model(x).logits
        cache = FavorCache(model)
        out = [model(x[:, :5], past_key_values=cache, use_cache=True).logits]
        for t in range(5, 12):
            out.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-9, atol=1e-9)

        prompt = ids(1, 6, seed=3)
        res = model.generate(
            prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True
        )
        assert isinstance(res.past_key_values, FavorCache)
        seq = prompt
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(res.sequences, seq)


def test_a_cache_refuses_other_parts_than_it_was_filled_under():
    model = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1)
    x = ids(1, 8)
    cache = FavorCache(model)
    model(x[:, :6], past_key_values=cache, use_cache=True)
    for near, far in ((True, False), (False, True)):
        with attention_parts(model, near=near, far=far):
            with pytest.raises(ValueError, match="filled with attention parts near=True, far=True"):
                model(x[:, 6:7], past_key_values=cache, use_cache=True)
    # A forward that did not ask for a cache keeps its tokens unfolded: still refused.
    with attention_parts(model, far=False):
        out = model(x[:, :6])
    lazy = out.get("cache", out.get("past_key_values"))
    assert isinstance(lazy, FavorCache)
    with pytest.raises(ValueError, match="filled with attention parts near=True, far=False"):
        model(x[:, 6:7], past_key_values=lazy, use_cache=True)
    # Back under the parts it was filled with, it goes on; a reset cache takes new parts.
    model(x[:, 6:7], past_key_values=cache, use_cache=True)
    cache.reset()
    with attention_parts(model, far=False):
        model(x[:, :3], past_key_values=cache, use_cache=True)
        model(x[:, 3:4], past_key_values=cache, use_cache=True)


def test_set_attention_parts_returns_the_previous_setting_and_restores():
    model = convert(tiny_llama(), "favor", num_features=16, window=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_attention_parts(model, far=False) == (True, True, True)
    assert set_attention_parts(model, near=False) == (True, False, True)
    assert all((m.linattn.near, m.linattn.far) == (False, True) for m in converted_layers(model))
    with pytest.raises(RuntimeError, match="boom"):
        with attention_parts(model, far=False):
            raise RuntimeError("boom")
    assert set_attention_parts(model) == (False, True, True)
    # Nothing of the model's weights or saved state changes.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "make,opts,kwargs,exc,match",
    [
        (tiny_llama, {"window": 3}, {"near": False, "far": False}, ValueError, "no attention"),
        (tiny_llama, {}, {"far": False}, ValueError, "window=None, sinks=0"),
        (tiny_llama, {"window": 0}, {"far": False}, ValueError, "window=0, sinks=0"),
        (tiny_llama, {"window": 3}, {"far": 0}, TypeError, "far must be a bool"),
        (tiny_llama, {"window": 3}, {"near": "yes"}, TypeError, "near must be a bool"),
    ],
    ids=["both-off", "far-off-no-window", "far-off-causal-window-0", "far-int", "near-str"],
)
def test_bad_parts_are_refused(make, opts, kwargs, exc, match):
    model = convert(make(), "favor", num_features=16, **opts)
    with pytest.raises(exc, match=match):
        set_attention_parts(model, **kwargs)
    assert all((m.linattn.near, m.linattn.far) == (True, True) for m in converted_layers(model))


def test_parts_need_a_favor_conversion():
    with pytest.raises(ValueError, match="not converted"):
        set_attention_parts(tiny_llama(), far=False)
    with pytest.raises(ValueError, match="method='favor'"):
        set_attention_parts(convert(tiny_bert(), "linformer", proj_dim=8), near=False)
    # A bidirectional window of 0 keeps each query's own key: window-only is defined.
    model = convert(tiny_bert(), "favor", num_features=16, window=0)
    with attention_parts(model, far=False):
        model(ids(1, 5))
