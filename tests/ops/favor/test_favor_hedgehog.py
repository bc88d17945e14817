"""kernel="hedgehog" (learned softmax features) and per-head projections (H, m, d) in
every pure-linear path, against the float64 oracle and the formula."""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive, per_head, projection, randn

ALL = ["softmax", "softmax_hyp", "softmax_opt", "softmax_trig", "relu", "elu", "hedgehog"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length", [1, 63, 400], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_hedgehog_matches_oracle(causal, length, masked):
    q, k, v = (randn(2, 3, length, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    mask = None
    if masked:
        mask = torch.arange(length)[None].expand(2, -1) >= torch.tensor(
            [[length], [length // 2 + 1]]
        )
    out = linattn.favor_attention(
        q,
        k,
        v,
        w,
        kernel="hedgehog",
        causal=causal,
        key_padding_mask=mask,
        chunk_size=16,
        block_size=50,
    )
    ref = naive(q, k, v, w, kernel="hedgehog", causal=causal, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", ALL)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_per_head_projection_equals_heads_one_by_one(kernel, causal):
    if causal and kernel == "softmax_opt":
        pytest.skip("FAVOR++ is bidirectional only")
    q, k, v = (randn(2, 3, 30, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    out = linattn.favor_attention(
        q, k, v, w, kernel=kernel, causal=causal, chunk_size=8, block_size=7
    )
    for h in range(3):
        one = linattn.favor_attention(
            q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], w[h], kernel=kernel, causal=causal
        )
        torch.testing.assert_close(out[:, h : h + 1], one, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        out, naive(q, k, v, w, kernel=kernel, causal=causal), rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
def test_gradcheck_hedgehog(causal, shared):
    q, k, v = (randn(2, 2, 11, 4, seed=s, requires_grad=True) for s in range(3))
    w = (projection(5, 4) if shared else per_head(2, 5, 4)).requires_grad_()
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 8:] = True

    def fn(q, k, v, w):
        return linattn.favor_attention(
            q,
            k,
            v,
            w,
            kernel="hedgehog",
            causal=causal,
            key_padding_mask=mask,
            chunk_size=3,
            block_size=4,
        )

    assert gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", ["softmax"])
def test_gradcheck_per_head_random_features(kernel):
    q, k, v = (randn(1, 2, 9, 4, seed=s, requires_grad=True) for s in range(3))
    w = per_head(2, 6, 4).requires_grad_()
    for causal in (False, True):

        def fn(q, k, v, w, causal=causal):
            return linattn.favor_attention(
                q, k, v, w, kernel=kernel, causal=causal, chunk_size=4, block_size=4
            )

        assert gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("step", [1, 4])
def test_recurrent_equals_parallel(step):
    q, k, v = (randn(2, 3, 23, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    par = linattn.favor_attention(q, k, v, w, kernel="hedgehog", causal=True, chunk_size=8)
    state, outs = None, []
    for s in range(0, 23, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, kernel="hedgehog", state=state
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-9, atol=1e-9)
    assert state.kv.shape == (2, 3, 16, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision(dtype, causal):
    q, k, v = (randn(1, 2, 64, 16, seed=s, dtype=torch.float32) * 4 for s in range(3))
    w = per_head(2, 16, 16, dtype=torch.float32)
    out = linattn.favor_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype), kernel="hedgehog", causal=causal
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    rounded = linattn.favor_attention(
        *(t.to(dtype).float() for t in (q, k, v)),
        w.to(dtype).float(),
        kernel="hedgehog",
        causal=causal,
    )
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), rounded, rtol=eps, atol=eps)


def test_projection_shape_errors():
    q = randn(2, 3, 10, 8)
    with pytest.raises(ValueError, match=r"\(heads, m, head_dim\) = \(3, m, 8\)"):
        linattn.favor_attention(q, q, q, per_head(4, 6, 8), kernel="hedgehog")
    with pytest.raises(ValueError, match=r"\(m, 8\)"):
        linattn.favor_attention(q, q, q, projection(6, 7), kernel="hedgehog")
    with pytest.raises(ValueError, match="projection must have shape"):
        linattn.favor_attention(q, q, q, torch.ones(1, 3, 6, 8, dtype=torch.float64))
