"""The far part of a converted decoder on un-rotated queries and keys (``far_rope=False``)
and with a decay (``far_decay``), issue 25 build item 2: ``unrotate`` inverts the model's
rotary embedding; the layer equals the float64 oracle fed the queries and keys before the
rotation; decoding (a hand-written loop, ``generate()``, a left-padded batch, a converted
``DynamicCache``) equals the parallel forward; ``set_far_decay``, save/load, ablations
and bad options."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from hf_models import CACHE, ids, left_padded, tiny_bert, tiny_llama  # noqa: E402
from linattn.features import get_feature_map  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    attention_parts,
    convert,
    load_converted,
    save_converted,
    set_far_decay,
)
from linattn.integrations.hf.rotary import unrotate, unrotate_pair  # noqa: E402
from linattn.integrations.hf.state import converted_layers  # noqa: E402
from linattn.ops.favor.naive import favor_naive  # noqa: E402
from linattn.ops.favor.slots import slots_reference  # noqa: E402

FAR = {"kernel": "hedgehog", "window": 4, "sinks": 1}


def returned_cache(out):
    return getattr(out, CACHE, None) or out.past_key_values


def rotary_of(model):
    return model.model.rotary_emb


def perturbed(model):
    # Away from the identity start: maps and factors that tell the options apart.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in converted_layers(model):
            st = layer.linattn
            st.projection.add_(torch.randn(st.projection.shape, generator=g, dtype=torch.float64))
    return model


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0}])
def test_unrotate_inverts_the_rotary_embedding(rope):
    model = tiny_llama()
    if rope is not None:
        cfg = copy.deepcopy(model.config)
        cfg.rope_parameters = {**cfg.rope_parameters, **rope}
        model = transformers.LlamaForCausalLM(cfg).double()
    rotary = rotary_of(model)
    x = torch.randn(2, 4, 11, 8, dtype=torch.float64)
    pos = torch.tensor([list(range(11)), [0] * 3 + list(range(8))])
    cos, sin = rotary(x, pos)
    xr, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert (xr - x).abs().max() > 1e-2
    torch.testing.assert_close(unrotate(rotary, xr, pos), x, rtol=1e-10, atol=1e-12)
    # Queries and keys (another head count) through one set of tables: as each alone.
    kr = apply_rotary_pos_emb(x[:, :2] * 0.5, x[:, :2], cos, sin)[0]
    uq, uk = unrotate_pair(rotary, xr, kr, pos)
    assert torch.equal(uq, unrotate(rotary, xr, pos))
    assert torch.equal(uk, unrotate(rotary, kr, pos))
    # The autograd form (no in-place writes) gives the same, and the adjoint rotation.
    leaf = xr.clone().requires_grad_()
    back = unrotate(rotary, leaf, pos)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(x)
    (back * g).sum().backward()
    # The inverse of a scaled rotation R s is R^T / s: its adjoint is R / s.
    gr, _ = apply_rotary_pos_emb(g, g, *(t / (cos * cos + sin * sin) for t in (cos, sin)))
    torch.testing.assert_close(leaf.grad, gr, rtol=1e-10, atol=1e-12)


def test_unrotate_partial_rotary():
    # Partial rotary (only the first r < d dims rotated, as GPT-NeoX-style models do):
    # the rotated dims are restored, the others pass through untouched.
    full = rotary_of(tiny_llama())

    class PartialRotary(torch.nn.Module):
        def forward(self, x, pos):
            cos, sin = full(x, pos)  # (B, L, 8) = [f, f] halves of 4
            return (torch.cat([t[..., :2], t[..., :2]], -1) for t in (cos, sin))

    rotary = PartialRotary()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    pos = torch.arange(3, 12).expand(2, 9)
    cos, sin = rotary(x, pos)
    head, _ = apply_rotary_pos_emb(x[..., :4], x[..., :4], cos, sin)
    xr = torch.cat([head, x[..., 4:]], -1)
    assert (xr - x)[..., :4].abs().max() > 1e-2
    back = unrotate(rotary, xr, pos)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-12)
    assert torch.equal(back[..., 4:], x[..., 4:])


def _attention_inputs(model, x):
    """Layer 0's ``q, k`` before and after the rotation and ``v`` (heads repeated)."""
    attn = model.model.layers[0].self_attn
    got = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o)),
        attn.v_proj.register_forward_hook(lambda m, a, o: got.__setitem__("v", o)),
    ]
    try:
        model(x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    b, n = x.shape
    d = attn.head_dim
    q, k, v = (got[s].view(b, n, -1, d).transpose(1, 2) for s in "qkv")
    cos, sin = rotary_of(model)(q, torch.arange(n)[None])
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, kr, v = (t.repeat_interleave(rep, 1) for t in (k, kr, v))
    return q, k, qr, kr, v, attn


@pytest.mark.parametrize("far_decay", [None, 7.0])
def test_layer_equals_the_oracle_on_the_queries_and_keys_before_the_rotation(far_decay):
    model = perturbed(convert(tiny_llama(), "favor", **FAR, far_rope=False, far_decay=far_decay))
    x = ids(2, 40)
    q, k, qr, kr, v, attn = _attention_inputs(model, x)
    st = attn.linattn
    out = st(qr, kr, v, key_padding_mask=None, causal=True, scale=attn.scaling)
    fm = get_feature_map("hedgehog")
    params = fm.prepare(st.projection.double(), qr, kr, None, attn.scaling)
    decay = None if far_decay is None else torch.tensor(-1 / far_decay, dtype=torch.float64)
    kw = dict(causal=True, window=4, sinks=1, linear_factor=st.linear_factor().double())
    ref = favor_naive(qr, kr, v, fm, params, **kw, decay=decay, far_q=q, far_k=k)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    # Not the rotated inputs' hybrid.
    rot = favor_naive(qr, kr, v, fm, params, **kw, decay=decay)
    assert (out - rot).abs().max() > 1e-4


OPTS = [
    {"far_rope": False},
    {"far_decay": 6.0},
    {"far_rope": False, "far_decay": 3.0},
    {"far_rope": False, "far_decay": 3.0, "slots": 3, "slot_interval": 2},
    {"far_rope": False, "slots": 2, "slot_rule": "mass"},
]


@pytest.mark.parametrize(
    "opts", OPTS, ids=["no-rope", "decay", "no-rope-decay", "slots-no-rope-decay", "slots-mass"]
)
def test_decoding_equals_the_parallel_forward(opts):
    model = perturbed(convert(tiny_llama(), "favor", **FAR, **opts))
    prompt, new = ids(2, 9), 8
    out = model(prompt, use_cache=True)
    cache = returned_cache(out)
    assert isinstance(cache, FavorCache)
    seq, logits = prompt, [out.logits]
    for _ in range(new):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        out = model(nxt, use_cache=True, **{CACHE: returned_cache(out)})
        logits.append(out.logits)
    full = model(seq, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)
    assert torch.equal(seq[:, :-1], model.generate(prompt, max_new_tokens=new - 1, do_sample=False))
    # Against the conversion without the far options: they are in force.
    base = {k: v for k, v in opts.items() if k not in ("far_rope", "far_decay")}
    plain = perturbed(convert(tiny_llama(), "favor", **FAR, **base))
    assert (plain(seq).logits - full).abs().max() > 1e-6


def test_left_padded_batch_equals_each_sequence_alone():
    model = perturbed(convert(tiny_llama(), "favor", **FAR, far_rope=False, far_decay=4.0))
    a, b = ids(1, 13, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    out = model(x, attention_mask=mask, use_cache=True)
    for row, p in ((0, a), (1, b)):
        alone = model(p).logits[0, -1]
        torch.testing.assert_close(out.logits[row, -1], alone, rtol=1e-9, atol=1e-9)
    nxt = torch.tensor([[7], [9]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    step = model(nxt, attention_mask=mask, use_cache=True, **{CACHE: returned_cache(out)})
    for row, p in ((0, a), (1, b)):
        alone = model(torch.cat([p, nxt[row : row + 1]], 1)).logits[0, -1]
        torch.testing.assert_close(step.logits[row, -1], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("parts", [{}, {"near": False}], ids=["hybrid", "linear-only"])
def test_a_dynamic_cache_is_folded_with_its_positions(parts):
    torch.manual_seed(0)
    cfg = tiny_llama().config
    cfg.num_hidden_layers = 1
    original = transformers.LlamaForCausalLM(cfg).double().eval()
    model = perturbed(convert(copy.deepcopy(original), "favor", **FAR, far_rope=False))
    x = ids(1, 12)
    filled = transformers.DynamicCache()
    original(x, use_cache=True, **{CACHE: filled})
    nxt = torch.tensor([[5]])
    with attention_parts(model, **parts):
        out = model(nxt, use_cache=True, **{CACHE: filled})
        alone = model(torch.cat([x, nxt], 1)).logits[0, -1]
    torch.testing.assert_close(out.logits[0, -1], alone, rtol=1e-9, atol=1e-9)


def test_save_load_and_set_far_decay(tmp_path):
    model = perturbed(convert(tiny_llama(), "favor", **FAR, far_rope=False, far_decay=5.0))
    x = ids(2, 20)
    ref = model(x).logits
    save_converted(model, tmp_path / "m")
    back = load_converted(tmp_path / "m")
    st = next(iter(converted_layers(back))).linattn
    assert (st.far_rope, st.far_decay) == (False, 5.0)
    torch.testing.assert_close(back(x).logits, ref, rtol=1e-9, atol=1e-9)
    # The decay holds no parameters: changed (and recorded) on the loaded model.
    set_far_decay(back, None)
    assert (back(x).logits - ref).abs().max() > 1e-6
    assert back.config.linattn_conversion["options"]["far_decay"] is None
    set_far_decay(back, 5.0)
    torch.testing.assert_close(back(x).logits, ref, rtol=1e-9, atol=1e-9)
    assert "far_rope=False, far_decay=5" in repr(st)


def test_ablations_with_the_far_options():
    model = perturbed(convert(tiny_llama(), "favor", **FAR, far_rope=False, far_decay=5.0))
    x = ids(1, 20)
    hybrid = model(x).logits
    with attention_parts(model, far=False):
        window_only = model(x).logits
    plain = perturbed(convert(tiny_llama(), "favor", **FAR))
    with attention_parts(plain, far=False):
        torch.testing.assert_close(plain(x).logits, window_only, rtol=1e-9, atol=1e-9)
    with attention_parts(model, near=False):
        linear = model(x).logits
    assert (linear - hybrid).abs().max() > 1e-4
    assert torch.isfinite(linear).all()


def test_bad_far_options_are_refused():
    with pytest.raises(ValueError, match="far_decay must be a finite number"):
        convert(tiny_llama(), "favor", **FAR, far_decay=0)
    with pytest.raises(TypeError, match="far_decay must be None or a number"):
        convert(tiny_llama(), "favor", **FAR, far_decay="long")
    with pytest.raises(TypeError, match="far_rope must be a bool"):
        convert(tiny_llama(), "favor", **FAR, far_rope=0)
    with pytest.raises(ValueError, match="causal decoders"):
        convert(tiny_bert(), "favor", num_features=16, window=3, far_decay=10.0)
    bert = convert(tiny_bert(), "favor", num_features=16, window=3)
    with pytest.raises(ValueError, match="bidirectional"):
        set_far_decay(bert, 5.0)
    # A key/value cache the model kept itself does not say where its keys sit.
    model = convert(tiny_llama(), "favor", **FAR, far_rope=False)
    layer = next(iter(converted_layers(model))).linattn
    q = torch.zeros(1, 4, 1, 8, dtype=torch.float64)
    k = torch.zeros(1, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="decode through a FavorCache"):
        layer(q, k, k, key_padding_mask=None, causal=True, scale=1.0)


def test_linear_only_ablation_decodes_as_its_parallel_forward():
    # near=False with far_rope=False: every key un-rotated, the kept ones (a lazy prefill
    # of grouped-query keys, a converted DynamicCache) as well.
    model = perturbed(convert(tiny_llama(), "favor", **FAR, far_rope=False))
    x = ids(2, 14)
    with attention_parts(model, near=False):
        out = model(x[:, :10], use_cache=True)
        logits = [out.logits]
        for t in range(10, 14):
            out = model(x[:, t : t + 1], use_cache=True, **{CACHE: returned_cache(out)})
            logits.append(out.logits)
        full = model(x, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


def test_far_options_need_a_window_or_sinks():
    with pytest.raises(ValueError, match="need a window or sinks"):
        convert(tiny_llama(), "favor", kernel="hedgehog", far_rope=False)
    with pytest.raises(ValueError, match="need a window or sinks"):
        convert(tiny_llama(), "favor", kernel="hedgehog", far_decay=5.0)
    model = convert(tiny_llama(), "favor", kernel="hedgehog")
    with pytest.raises(ValueError, match="no window or sinks"):
        set_far_decay(model, 5.0)


@pytest.mark.parametrize("rule", ["error", "mass"])
def test_slot_layer_equals_the_reference_on_the_queries_and_keys_before_the_rotation(rule):
    opts = dict(far_rope=False, far_decay=6.0, slots=3, slot_interval=2, slot_rule=rule)
    model = perturbed(convert(tiny_llama(), "favor", **FAR, **opts))
    x = ids(2, 30)
    q, k, qr, kr, v, attn = _attention_inputs(model, x)
    st = attn.linattn
    out = st(qr, kr, v, key_padding_mask=None, causal=True, scale=attn.scaling)
    fm = get_feature_map("hedgehog")
    params = fm.prepare(st.projection.double(), qr, kr, None, attn.scaling)
    ref, _ = slots_reference(
        qr, kr, v, fm, params, window=4, slots=3, sinks=1, interval=2, rule=rule,
        linear_factor=st.linear_factor().double(),
        decay=torch.tensor(-1 / 6.0, dtype=torch.float64), far_q=q, far_k=k,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_slots_fold_a_dynamic_cache_with_un_rotated_far_keys():
    torch.manual_seed(0)
    cfg = tiny_llama().config
    cfg.num_hidden_layers = 1
    original = transformers.LlamaForCausalLM(cfg).double().eval()
    opts = dict(far_rope=False, far_decay=5.0, slots=2, slot_interval=2)
    model = perturbed(convert(copy.deepcopy(original), "favor", **FAR, **opts))
    x = ids(1, 15)
    filled = transformers.DynamicCache()
    original(x, use_cache=True, **{CACHE: filled})
    nxt = torch.tensor([[5]])
    out = model(nxt, use_cache=True, **{CACHE: filled})
    alone = model(torch.cat([x, nxt], 1)).logits[0, -1]
    torch.testing.assert_close(out.logits[0, -1], alone, rtol=1e-9, atol=1e-9)
