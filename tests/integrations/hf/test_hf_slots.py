"""Exact key-value slots in a converted decoder (``convert(..., slots=G)``, issue 25 build
item 2): the layer against the token-by-token reference in float64; a budget covering the
sequence is the original model; decoding through ``FavorCache`` (``generate()``, a
hand-written loop, a converted ``DynamicCache``) equals the parallel forward; the
``slots=False`` ablation is the plain window hybrid; save/load; bad input."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import CACHE, ids, left_padded, tiny_bert, tiny_llama  # noqa: E402
from linattn.features import get_feature_map  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    attention_parts,
    convert,
    load_converted,
    save_converted,
    set_attention_parts,
    set_compiled_decoding,
    set_slots,
)
from linattn.integrations.hf.state import FavorLayerState, converted_layers  # noqa: E402
from linattn.ops.favor.slots import SlotState, slots_reference  # noqa: E402

B, H, D = 2, 3, 8


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("rule", ["error", "mass", "union"])
@pytest.mark.parametrize(
    "kernel,window,slots,sinks,interval",
    [("softmax", 3, 2, 1, None), ("softmax", 2, 4, 0, 1), ("hedgehog", 4, 3, 2, 3)],
)
def test_layer_equals_the_reference(kernel, window, slots, sinks, interval, rule):
    state = FavorLayerState(
        D,
        num_heads=H,
        kernel=kernel,
        num_features=8,
        window=window,
        sinks=sinks,
        slots=slots,
        slot_rule=rule,
        slot_interval=interval,
        seed=3,
    ).double()
    if kernel == "hedgehog":
        with torch.no_grad():  # away from the identity start, and a per-head factor
            state.projection.add_(randn(*state.projection.shape, seed=9) * 0.3)
            state.log_linear_factor.copy_(torch.tensor([0.1, 1.0, 2.0]))
    q, k, v = (randn(B, H, 21, D, seed=s) * 0.8 for s in range(3))
    scale = D**-0.5
    out = state(q, k, v, key_padding_mask=None, causal=True, scale=scale)
    fm = get_feature_map(kernel)
    params = fm.prepare(state.projection, q, k, None, scale)
    lf = state.linear_factor()
    ref, _ = slots_reference(
        q, k, v, fm, params, window=window, slots=slots, sinks=sinks, interval=interval,
        rule=rule, linear_factor=lf,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # The slots change the outputs (the far keys are scored differently).
    state.use_slots = False
    plain = state(q, k, v, key_padding_mask=None, causal=True, scale=scale)
    assert (plain - out).abs().max() > 1e-6


def test_a_budget_covering_the_sequence_is_the_original_model():
    original = tiny_llama()
    prompt = ids(2, 19)
    model = convert(copy.deepcopy(original), "favor", num_features=16, window=2, slots=32)
    torch.testing.assert_close(model(prompt).logits, original(prompt).logits)
    # Without slots the same conversion is not exact.
    plain = convert(copy.deepcopy(original), "favor", num_features=16, window=2)
    assert (plain(prompt).logits - original(prompt).logits).abs().max() > 1e-4


OPTS = [
    {"num_features": 16, "window": 3, "sinks": 1, "slots": 2},
    {"num_features": 16, "window": 2, "slots": 3, "slot_interval": 1, "slot_rule": "mass"},
    {"kernel": "hedgehog", "window": 4, "sinks": 2, "slots": 2, "slot_interval": 3},
]
OPT_IDS = ["softmax-w3-s1-g2", "softmax-w2-g3-i1-mass", "hedgehog-w4-s2-g2-i3"]


@pytest.mark.parametrize("opts", OPTS, ids=OPT_IDS)
def test_decoding_equals_the_parallel_forward(opts):
    model = convert(tiny_llama(), "favor", **opts)
    prompt, new = ids(2, 9), 10
    out = model(prompt, use_cache=True)
    cache = out.get(CACHE)
    assert isinstance(cache, FavorCache)
    seq, logits = prompt, [out.logits]
    for _ in range(new):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        step = model(nxt, **{CACHE: cache}, use_cache=True)
        cache = step.get(CACHE)
        logits.append(step.logits)
    assert all(isinstance(layer.state, SlotState) for layer in cache.layers)
    full = model(seq).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-10)
    # generate() goes the same way.
    gen = model.generate(prompt, max_new_tokens=new, do_sample=False)
    assert torch.equal(gen, seq)
    # The state does not grow with the context: at most s + w + I - 1 + G keys per head.
    layer = cache.layers[0].state
    held = layer.sink_k.shape[2] + layer.local_k.shape[2] + layer.cache_k.shape[2]
    w, s, g = opts["window"], opts.get("sinks", 0), opts["slots"]
    assert held <= s + w + opts.get("slot_interval", w) - 1 + g


def test_compiled_decisions_in_a_converted_decoder(compiled_decisions):
    # set_compiled_decoding: the slot decisions on a full cache are compiled, in the
    # prefill and in decoding; the same logits and generate() tokens.
    opts = {"kernel": "hedgehog", "window": 3, "sinks": 1, "slots": 2, "slot_rule": "union"}
    model = convert(tiny_llama(), "favor", **opts)
    prompt = ids(1, 20)
    want = model(prompt).logits
    gen_want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    set_compiled_decoding(model)
    with torch.no_grad():  # (a forward that builds a gradient decides eagerly)
        got = model(prompt).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert compiled_decisions
    taken = len(compiled_decisions)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), gen_want)
    assert len(compiled_decisions) > taken


def one_layer_llama():
    model = tiny_llama()
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def test_a_dynamic_cache_is_folded_with_the_error_rule_and_refused_with_the_mass_rules():
    # One layer: its keys do not depend on the attention, so the exact model's DynamicCache
    # holds exactly the keys and values the converted model computes.
    original = one_layer_llama()
    prompt, more = ids(1, 11), ids(1, 3, seed=1)
    for rule in ("error", "mass", "union"):
        model = convert(
            copy.deepcopy(original), "favor", num_features=16, window=3, slots=2, slot_rule=rule
        )
        dyn = transformers.DynamicCache()
        original(prompt, **{CACHE: dyn}, use_cache=True)
        if rule != "error":
            with pytest.raises(ValueError, match=f"slot_rule='{rule}'"):
                model(more, **{CACHE: dyn}, use_cache=True)
            continue
        got = model(more, **{CACHE: dyn}, use_cache=True).logits
        want = model(torch.cat([prompt, more], 1)).logits[:, -3:]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_slot_ablation_is_the_plain_hybrid_and_a_cache_keeps_its_parts():
    prompt = ids(2, 17)
    model = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1, slots=2)
    plain = convert(tiny_llama(), "favor", num_features=16, window=3, sinks=1)
    with attention_parts(model, slots=False):
        torch.testing.assert_close(model(prompt).logits, plain(prompt).logits)
    # Far part off: the slots stay exact, the evicted keys weigh 0.
    with attention_parts(model, far=False):
        no_far = model(prompt).logits
    with attention_parts(model, far=False, slots=False):
        window_only = model(prompt).logits
    assert (no_far - window_only).abs().max() > 1e-6
    assert set_attention_parts(model, slots=False) == (True, True, True)
    assert all(not m.linattn.use_slots for m in converted_layers(model))
    set_attention_parts(model)
    cache = FavorCache(model)
    model(prompt, **{CACHE: cache}, use_cache=True)
    with attention_parts(model, slots=False):
        with pytest.raises(ValueError, match="slots=off"):
            model(ids(2, 1), **{CACHE: cache}, use_cache=True)


def test_save_and_load_keep_the_slots(tmp_path):
    model = convert(tiny_llama(), "favor", num_features=16, window=3, slots=2, slot_interval=2)
    save_converted(model, tmp_path)
    loaded = load_converted(tmp_path).eval()
    state = next(converted_layers(loaded)).linattn
    assert (state.slots, state.slot_rule, state.slot_interval) == (2, "error", 2)
    prompt = ids(1, 15)
    torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits)


def test_bad_slot_options_are_refused():
    with pytest.raises(ValueError, match="needs a window >= 1"):
        convert(tiny_llama(), "favor", num_features=16, slots=4)
    with pytest.raises(ValueError, match="slots must be an int >= 0"):
        convert(tiny_llama(), "favor", num_features=16, window=2, slots=-1)
    with pytest.raises(ValueError, match="slot_rule"):
        convert(tiny_llama(), "favor", num_features=16, window=2, slots=1, slot_rule="lru")
    with pytest.raises(ValueError, match="slot_interval"):
        convert(tiny_llama(), "favor", num_features=16, window=2, slots=1, slot_interval=0)
    with pytest.raises(ValueError, match="causal decoders"):
        convert(tiny_bert(), "favor", num_features=16, window=2, slots=1)
    model = convert(tiny_llama(), "favor", num_features=16, window=2, slots=1)
    x, mask = left_padded(ids(1, 5), ids(1, 8, seed=1))
    with pytest.raises(ValueError, match="unpadded sequences only"):
        model(x, attention_mask=mask)


def test_set_slots_equals_converting_with_them(tmp_path):
    prompt = ids(2, 14)
    direct = convert(tiny_llama(), "favor", num_features=16, window=3, slots=2, slot_rule="mass")
    later = set_slots(convert(tiny_llama(), "favor", num_features=16, window=3), 2, rule="mass")
    torch.testing.assert_close(later(prompt).logits, direct(prompt).logits)
    save_converted(later, tmp_path)
    assert next(converted_layers(load_converted(tmp_path))).linattn.slots == 2
    # Bad options change nothing.
    with pytest.raises(ValueError, match="slot_interval"):
        set_slots(later, 4, interval=0)
    assert all(m.linattn.slots == 2 for m in converted_layers(later))
    with pytest.raises(ValueError, match="needs a window"):
        set_slots(convert(tiny_llama(), "favor", num_features=16), 2)
    with pytest.raises(ValueError, match="bidirectional"):
        set_slots(convert(tiny_bert(), "favor", num_features=16, window=2), 2)
    # 0 switches them off: the plain hybrid again.
    plain = convert(tiny_llama(), "favor", num_features=16, window=3)
    torch.testing.assert_close(set_slots(later, 0)(prompt).logits, plain(prompt).logits)


@pytest.mark.parametrize(
    "new",
    [{"slots": 3}, {"slots": 1}, {"slots": 2, "rule": "mass"}, {"slots": 2, "interval": 1}],
    ids=["more-slots", "fewer-slots", "mass-rule", "interval-1"],
)
def test_a_cache_filled_under_other_slot_options_is_refused(new):
    model = convert(tiny_llama(), "favor", num_features=16, window=3, slots=2)
    prompt, nxt = ids(1, 12), ids(1, 1, seed=7)
    cache = model(prompt, use_cache=True).get(CACHE)
    new = dict(new)
    set_slots(model, new.pop("slots"), **new)
    with pytest.raises(ValueError, match=r"filled with .*slots=2 \(error rule, interval None\)"):
        model(nxt, **{CACHE: cache}, use_cache=True)
    # Back to the options it was filled under, it goes on as the parallel forward.
    set_slots(model, 2)
    got = model(nxt, **{CACHE: cache}, use_cache=True).logits
    want = model(torch.cat([prompt, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
