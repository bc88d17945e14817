"""linattn.ExactAttention: a drop-in for nn.MultiheadAttention with the linear modules'
parameter names; step() with a key/value cache equals the parallel causal forward."""

import pytest
import torch
from torch import nn

from linattn import ExactAttention, PerformerAttention


def _mha_pair(batch_first, seed=0):
    torch.manual_seed(seed)
    ours = ExactAttention(24, 3, batch_first=batch_first).double()
    mha = nn.MultiheadAttention(24, 3, batch_first=batch_first).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, mha


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding"])
def test_equals_multihead_attention(batch_first, padded):
    ours, mha = _mha_pair(batch_first)
    g = torch.Generator().manual_seed(1)
    b, lq, lk = 2, 7, 11
    shape = (lambda n: (b, n, 24)) if batch_first else (lambda n: (n, b, 24))
    q = torch.randn(shape(lq), generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(shape(lk), generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.zeros(b, lk, dtype=torch.bool)
        mask[0, 8:] = True
        mask[1, :3] = True
    out, w = ours(q, kv, kv, key_padding_mask=mask)
    ref, _ = mha(q, kv, kv, key_padding_mask=mask, need_weights=False)
    assert w is None
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (g1,) = torch.autograd.grad(out.square().sum(), q)
    (g2,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_causal_equals_multihead_attention_with_a_causal_mask():
    ours, mha = _mha_pair(True)
    ours.causal = True
    x = torch.randn(2, 13, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = nn.Transformer.generate_square_subsequent_mask(13, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], mha(x, x, x, attn_mask=mask)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_step_with_cache_equals_parallel_causal(rotary):
    torch.manual_seed(3)
    m = ExactAttention(16, 2, causal=True, rotary=rotary, batch_first=True).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    full = m(x)[0]
    out, cache = m.step(x[:, :5], None, 0)
    outs = [out]
    for t, n in ((5, 1), (6, 4), (10, 9)):
        out, cache = m.step(x[:, t : t + n], cache, t)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache[0].shape == (2, 2, 19, 8)


def test_fully_padded_row_is_zero_not_nan():
    m = ExactAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    out = m(x, key_padding_mask=mask)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(5, -1))


def test_parameter_names_match_performer_attention():
    exact = dict(ExactAttention(16, 2).named_parameters())
    favor = dict(PerformerAttention(16, 2).named_parameters())
    assert {n: p.shape for n, p in exact.items()} == {n: p.shape for n, p in favor.items()}


@pytest.mark.parametrize(
    "kwargs,call,match",
    [
        ({}, {"need_weights": True}, "need_weights"),
        ({}, {"attn_mask": torch.zeros(4, 4)}, "attn_mask"),
        ({"rotary": True, "num_heads": 4}, {}, "even head_dim"),
        ({}, {"key_padding_mask": torch.zeros(2, 3, dtype=torch.bool)}, "key_padding_mask"),
    ],
    ids=["need-weights", "attn-mask", "odd-rotary", "mask-shape"],
)
def test_errors_name_the_argument(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        kw = {"num_heads": 2, **kwargs}
        m = ExactAttention(12, kw.pop("num_heads"), batch_first=True, **kw)
        m(torch.randn(2, 4, 12), **call)
