"""kernel="hedgehog_untied": one learned Hedgehog map for the queries and another for the
keys (``W = [W_k, W_q]``, ``(m, 2d)`` or ``(H, m, 2d)``), in every path, against the
formula and the float64 oracle, with distinct query and key maps so that a path that
featurizes a query with the key map fails. The Hugging Face conversions are in
``tests/integrations/hf/test_hf_transfer.py``."""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive, per_head, projection, randn
from linattn.features import exact_features

FACTOR = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)


def untied(heads, m, d):
    """``[W_k, W_q]`` per head, two different draws."""
    return torch.cat([per_head(heads, m, d), 0.5 * per_head(heads, m, d).flip(0)], dim=-1)


def hh(x, w, scale):
    z = torch.einsum("bhnd,hmd->bhnm", x * scale**0.5, w)
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


def test_formula_sides_and_identity_default():
    x = randn(2, 3, 5, 8)
    w = untied(3, 6, 8)
    scale = 0.3
    q_side = exact_features(x, w, kernel="hedgehog_untied", scale=scale, is_query=True)
    k_side = exact_features(x, w, kernel="hedgehog_untied", scale=scale, is_query=False)
    torch.testing.assert_close(q_side, hh(x, w[..., 8:], scale))
    torch.testing.assert_close(k_side, hh(x, w[..., :8], scale))
    assert linattn.KERNELS["hedgehog_untied"].feature_dim(w, 8) == 12
    with pytest.raises(ValueError, match="pass is_query=True or False"):
        exact_features(x, w, kernel="hedgehog_untied", scale=scale)
    # None: the identity on both sides, as the tied map's.
    torch.testing.assert_close(
        exact_features(x, None, kernel="hedgehog_untied", is_query=True),
        exact_features(x, None, kernel="hedgehog"),
    )


def test_oracle_is_phi_q_times_phi_k():
    q, k, v = (randn(2, 3, 9, 8, seed=s) for s in range(3))
    w = untied(3, 5, 8)
    a = hh(q, w[..., 8:], 8**-0.5) @ hh(k, w[..., :8], 8**-0.5).mT
    want = (a @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(naive(q, k, v, w, kernel="hedgehog_untied"), want)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [None, 0, 3], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", [0, 1], ids=lambda s: f"s{s}")
def test_equal_halves_are_the_tied_map(causal, window, sinks):
    q, k, v = (randn(2, 3, 40, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    lf = FACTOR if (window is not None or sinks) else None
    kw = dict(causal=causal, window=window, sinks=sinks, linear_factor=lf, chunk_size=8)
    tied = linattn.favor_attention(q, k, v, w, kernel="hedgehog", **kw)
    both = linattn.favor_attention(q, k, v, torch.cat([w, w], -1), kernel="hedgehog_untied", **kw)
    torch.testing.assert_close(both, tied, rtol=0, atol=1e-14)


def holed_mask(b, length):
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[1, : length // 3] = True  # left padding
    if b > 2:
        mask[2, length - length // 4 :] = True  # right padding
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length", [1, 63, 200], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("window,sinks", [(None, 0), (0, 0), (5, 0), (64, 1), (None, 2), (300, 0)])
def test_every_path_matches_the_oracle(causal, length, window, sinks):
    q, k, v = (randn(3, 3, length, 8, seed=s) for s in range(3))
    w = untied(3, 8, 8)
    mask = holed_mask(3, length) if length > 3 else None
    lf = FACTOR if (window is not None or sinks) else None
    garbage = torch.full_like(k, float("nan"))
    if mask is not None:
        k = torch.where(mask[:, None, :, None], garbage, k)
        v = torch.where(mask[:, None, :, None], garbage, v)
    kw = dict(
        kernel="hedgehog_untied",
        causal=causal,
        window=window,
        sinks=sinks,
        linear_factor=lf,
    )
    out = linattn.favor_attention(
        q, k, v, w, key_padding_mask=mask, chunk_size=16, block_size=50, **kw
    )
    ref = naive(q, k, v, w, mask=mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window,sinks", [(None, 0), (2, 0), (3, 1)], ids=str)
def test_gradcheck(causal, window, sinks):
    q, k, v = (randn(2, 2, 11, 4, seed=s, requires_grad=True) for s in range(3))
    w = torch.cat([per_head(2, 5, 4), per_head(2, 5, 4).flip(0)], -1).requires_grad_()
    lf = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 8:] = True
    hybrid = window is not None or sinks

    def fn(q, k, v, w, lf):
        return linattn.favor_attention(
            q,
            k,
            v,
            w,
            kernel="hedgehog_untied",
            causal=causal,
            key_padding_mask=mask,
            window=window,
            sinks=sinks,
            linear_factor=lf if hybrid else None,
            chunk_size=3,
            block_size=4,
        )

    assert gradcheck(fn, (q, k, v, w, lf), eps=1e-6, atol=1e-6)
    # Both maps learn: the key and the query halves get their own gradient.
    fn(q, k, v, w, lf).square().sum().backward()
    assert w.grad[..., :4].abs().sum() > 0 and w.grad[..., 4:].abs().sum() > 0


@pytest.mark.parametrize("window,sinks", [(None, 0), (3, 0), (4, 2)], ids=str)
@pytest.mark.parametrize("step", [1, 5])
def test_recurrent_equals_parallel(window, sinks, step):
    q, k, v = (randn(2, 3, 23, 8, seed=s) for s in range(3))
    w = untied(3, 8, 8)
    lf = FACTOR if (window is not None or sinks) else None
    kw = dict(kernel="hedgehog_untied", window=window, sinks=sinks, linear_factor=lf)
    par = linattn.favor_attention(q, k, v, w, causal=True, chunk_size=8, **kw)
    state, outs = None, []
    for s in range(0, 23, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, state=state, **kw
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision(dtype, causal):
    q, k, v = (randn(1, 2, 64, 16, seed=s, dtype=torch.float32) * 4 for s in range(3))
    w = torch.cat([per_head(2, 16, 16), per_head(2, 16, 16).flip(0)], -1).float()
    out = linattn.favor_attention(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        w.to(dtype),
        kernel="hedgehog_untied",
        causal=causal,
        window=8,
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Against the oracle on the same rounded inputs: only the arithmetic's rounding left.
    ref = naive(
        *(t.to(dtype).double() for t in (q, k, v, w)),
        kernel="hedgehog_untied",
        causal=causal,
        window=8,
    )
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=4 * eps, atol=4 * eps)


def test_projection_shape_errors():
    q = randn(2, 3, 10, 8)
    with pytest.raises(ValueError, match=r"\(m, 2\*8\).*key and the query projections"):
        linattn.favor_attention(q, q, q, projection(6, 8), kernel="hedgehog_untied")
    with pytest.raises(ValueError, match=r"\(3, m, 2\*8\)"):
        linattn.favor_attention(q, q, q, per_head(3, 6, 8), kernel="hedgehog_untied")
