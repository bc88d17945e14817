"""Every FAVOR path against the float64 oracle that materializes phi(Q) phi(K)^T."""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive, projection, randn

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
