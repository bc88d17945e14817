"""Every FAVOR path against the float64 oracle that materializes phi(Q) phi(K)^T."""

import math

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive, projection, randn
from linattn.features import get_feature_map

KERNELS = ["softmax", "softmax_hyp", "softmax_opt", "softmax_trig", "relu", "elu"]
CAUSAL_KERNELS = [k for k in KERNELS if k != "softmax_opt"]


def _mask(b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] >= lengths[:, None]
    mask[0] = torch.flip(mask[0], [0])  # one left-padded row
    return mask


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("length", [1, 63, 1000], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_bidirectional_matches_oracle(kernel, length, masked):
    q, k, v = (randn(2, 3, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = _mask(2, length) if masked else None
    out = linattn.favor_attention(q, k, v, w, kernel=kernel, key_padding_mask=mask, block_size=50)
    torch.testing.assert_close(
        out, naive(q, k, v, w, kernel=kernel, mask=mask), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
@pytest.mark.parametrize("length", [1, 63, 1000], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("chunk", [1, 16, 64, 100], ids=lambda c: f"chunk{c}")
def test_causal_matches_oracle(kernel, length, chunk):
    q, k, v = (randn(2, 2, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = _mask(2, length, seed=1)
    out = linattn.favor_attention(
        q, k, v, w, kernel=kernel, causal=True, key_padding_mask=mask, chunk_size=chunk
    )
    ref = naive(q, k, v, w, kernel=kernel, causal=True, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cross_attention_and_value_dim(kernel):
    q = randn(2, 4, 17, 8, seed=0)
    k, v = randn(2, 4, 40, 8, seed=1), randn(2, 4, 40, 5, seed=2)
    w = projection(12, 8)
    out = linattn.favor_attention(q, k, v, w, kernel=kernel, scale=0.2)
    assert out.shape == (2, 4, 17, 5)
    torch.testing.assert_close(out, naive(q, k, v, w, kernel=kernel, scale=0.2))


@pytest.mark.parametrize("shape", [(9, 8), (3, 9, 8), (2, 3, 4, 9, 8)], ids=str)
def test_leading_dims(shape):
    q, k, v = (randn(*shape, seed=s) for s in range(3))
    w = projection(16, 8)
    out = linattn.favor_attention(q, k, v, w, causal=True)
    ref = linattn.favor_attention(*(t.reshape(-1, 1, 9, 8) for t in (q, k, v)), w, causal=True)
    assert out.shape == shape
    torch.testing.assert_close(out, ref.reshape(shape))


@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradcheck(kernel, causal):
    q, k, v = (randn(2, 2, 11, 4, seed=s, requires_grad=True) for s in range(3))
    w = projection(6, 4).requires_grad_()
    mask = _mask(2, 11, seed=2)

    def fn(q, k, v, w):
        return linattn.favor_attention(
            q,
            k,
            v,
            w,
            kernel=kernel,
            causal=causal,
            key_padding_mask=mask,
            chunk_size=3,
            block_size=4,
        )

    assert gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-6)


def test_favor_plus_plus_gradients_match_oracle():
    # FAVOR++'s A is a data-dependent constant (no gradient), in both implementations.
    q, k, v = (randn(2, 2, 30, 4, seed=s, requires_grad=True) for s in range(3))
    w = projection(8, 4)
    mask = _mask(2, 30)
    out = linattn.favor_attention(
        q, k, v, w, kernel="softmax_opt", key_padding_mask=mask, block_size=7
    )
    g = randn(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = naive(q, k, v, w, kernel="softmax_opt", mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_float32_gradients_close_to_float64(causal):
    q, k, v = (randn(1, 2, 300, 16, seed=s) for s in range(3))
    w = projection(32, 16)
    grads = {}
    for dt in (torch.float32, torch.float64):
        ins = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = linattn.favor_attention(*ins, w.to(dt), causal=causal)
        grads[dt] = torch.autograd.grad(out.square().sum(), ins)
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_fully_masked_rows_are_zero():
    q, k, v = (randn(2, 2, 10, 4, seed=s) for s in range(3))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1] = True
    w = projection(8, 4)
    for causal in (False, True):
        out = linattn.favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask)
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros_like(out[1]))


# ------------------------------------------------------------------ double backward
@pytest.mark.parametrize(
    "path", ["bidirectional", "causal", "recurrent", "window-bidirectional", "window-causal"]
)
def test_double_backward_raises_instead_of_silently_dropping_the_graph(path):
    q, k, v = (randn(1, 2, 5, 8, seed=s, requires_grad=True) for s in range(3))
    w = projection(16, 8)
    if path == "recurrent":
        out, _ = linattn.favor_recurrent(q, k, v, w)
    elif path.startswith("window"):
        out = linattn.favor_attention(q, k, v, w, causal=path.endswith("causal"), window=1)
    else:
        out = linattn.favor_attention(q, k, v, w, causal=path == "causal")
    # First-order gradients with create_graph=True are still right ...
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (g_ref,) = torch.autograd.grad(out.pow(2).sum(), q, retain_graph=True)
    torch.testing.assert_close(g, g_ref)
    # ... but differentiating them again raises instead of returning a wrong answer.
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.pow(2).sum(), q)


# ------------------------------------------------------------------ FAVOR++ precision
def _log_domain_favor(q, k, v, w, params, mask=None):
    # The oracle in log space (float64): weights logsumexp_m(lq_im + lk_jm) never overflow.
    xs_q, xs_k = (t * math.sqrt(params.scale) for t in (q, k))
    a, b = params.opt_a[..., None, None], params.opt_b[..., None, None]

    def logf(xs):
        return a * (w * w).sum(-1) + b * (xs @ w.T) - 0.5 * (xs * xs).sum(-1, keepdim=True)

    lw = torch.logsumexp(logf(xs_q)[..., :, None, :] + logf(xs_k)[..., None, :, :], -1)
    if mask is not None:
        lw = lw.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.softmax(lw, -1) @ v


@pytest.mark.parametrize("scale_up", [1.0, 4.0, 8.0, 16.0, 30.0])
def test_favor_plus_plus_float32_matches_float64_oracle_at_large_scales(scale_up):
    q, k, v = (randn(2, 2, 20, 16, seed=s) for s in range(3))
    q, k = q * scale_up, k * scale_up
    w = projection(64, 16)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 15:] = True
    fm = get_feature_map("softmax_opt")
    params = fm.prepare(w, q, k, mask, 16**-0.5)
    ref = _log_domain_favor(q, k, v, w, params, mask)
    out64 = linattn.favor_attention(q, k, v, w, kernel="softmax_opt", key_padding_mask=mask)
    torch.testing.assert_close(out64, ref, rtol=1e-9, atol=1e-9)
    out32 = linattn.favor_attention(
        q.float(), k.float(), v.float(), w.float(), kernel="softmax_opt", key_padding_mask=mask
    )
    torch.testing.assert_close(out32.double(), ref, rtol=1e-3, atol=1e-3)
