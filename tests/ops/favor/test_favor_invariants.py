"""Causal prefix consistency, padding invariance, recurrent = parallel, half precision."""

import pytest
import torch

import linattn
from conftest import PADDING_CONTENTS, padded, projection, randn
from linattn.features import get_feature_map


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "relu"])
def test_causal_prefix_consistency(kernel):
    q, k, v = (randn(2, 2, 200, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    full = linattn.favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=32)
    for n in (1, 31, 64, 150):
        part = linattn.favor_attention(
            q[..., :n, :],
            k[..., :n, :],
            v[..., :n, :],
            w,
            kernel=kernel,
            causal=True,
            chunk_size=32,
        )
        torch.testing.assert_close(part, full[..., :n, :], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adversarial_future_keys_do_not_leak(dtype):
    # Keys after position p get enormous norms (and values); outputs up to p must not
    # change. A sequence-wide key stabilizer would underflow every earlier term.
    q, k, v = (randn(1, 2, 256, 16, seed=s, dtype=dtype) for s in range(3))
    w = projection(32, 16, dtype=dtype)
    base = linattn.favor_attention(q, k, v, w, causal=True, chunk_size=64)
    for p in (10, 63, 64, 100):
        k2, v2 = k.clone(), v.clone()
        k2[..., p + 1 :, :] *= 60.0
        v2[..., p + 1 :, :] = 1e6
        out = linattn.favor_attention(q, k2, v2, w, causal=True, chunk_size=64)
        assert torch.isfinite(out[..., : p + 1, :]).all()
        torch.testing.assert_close(
            out[..., : p + 1, :], base[..., : p + 1, :], rtol=1e-5, atol=1e-5
        )


# Causal with left padding is test_left_padding_causal_matches_unpadded below.
@pytest.mark.parametrize(
    "causal,side,kernel",
    [
        (False, "right", "softmax"),
        (False, "left", "softmax"),
        (True, "right", "softmax"),
        (False, "right", "softmax_opt"),
        (False, "left", "softmax_opt"),
    ],
    ids=["bidir-right", "bidir-left", "causal-right", "favor++-right", "favor++-left"],
)
def test_padding_invariance(causal, side, kernel):
    # FAVOR++'s A comes from query and key statistics: padded positions must not move it.
    b, length, pad = 3, 40, 13
    q, k, v = (randn(b, 2, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, causal=causal, kernel=kernel)
    junk = [randn(b, 2, pad, 8, seed=10 + s) * 50 for s in range(3)]
    if side == "right":
        qp, kp, vp = (torch.cat([t, j], dim=-2) for t, j in zip((q, k, v), junk))
        mask = torch.arange(length + pad)[None].expand(b, -1) >= length
        sl = slice(0, length)
    else:
        qp, kp, vp = (torch.cat([j, t], dim=-2) for t, j in zip((q, k, v), junk))
        mask = torch.arange(length + pad)[None].expand(b, -1) < pad
        sl = slice(pad, pad + length)
    out = linattn.favor_attention(
        qp, kp, vp, w, causal=causal, key_padding_mask=mask, kernel=kernel
    )
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-10, atol=1e-10)


def test_left_padding_causal_matches_unpadded():
    # Causal with left padding: real tokens see only real tokens before them.
    length, pad = 30, 7
    q, k, v = (randn(1, 2, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, causal=True)
    junk = [randn(1, 2, pad, 8, seed=20 + s) * 30 for s in range(3)]
    qp, kp, vp = (torch.cat([j, t], dim=-2) for t, j in zip((q, k, v), junk))
    mask = torch.arange(length + pad)[None] < pad
    out = linattn.favor_attention(qp, kp, vp, w, causal=True, key_padding_mask=mask, chunk_size=8)
    torch.testing.assert_close(out[..., pad:, :], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "softmax_trig", "elu"])
@pytest.mark.parametrize("step", [1, 5])
def test_recurrent_equals_parallel(kernel, step):
    q, k, v = (randn(2, 3, 47, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    par = linattn.favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=16)
    state, outs = None, []
    for s in range(0, 47, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, kernel=kernel, state=state
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-9, atol=1e-9)
    m = linattn.KERNELS[kernel].feature_dim(w, 8)
    assert state.kv.shape == (2, 3, m, 9) and state.stab.shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision_large_norms(dtype, causal):
    q, k, v = (randn(1, 2, 128, 32, seed=s, dtype=torch.float32) for s in range(3))
    q, k = q * 6.0, k * 6.0  # |x~|^2 / 2 ~ 100: exp would overflow without stabilizers
    w = projection(64, 32, dtype=torch.float32)
    ref = linattn.favor_attention(q, k, v, w, causal=causal)
    out = linattn.favor_attention(q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype), causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Computation in float32: equal to float32 on the same rounded inputs up to the
    # output's rounding.
    rounded = linattn.favor_attention(
        *(t.to(dtype).float() for t in (q, k, v)), w.to(dtype).float(), causal=causal
    )
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), rounded, rtol=eps, atol=eps)
    # And close to the float32 result: the inputs' rounding moves logits by ~|w||x| eps.
    tol = 0.2 if dtype == torch.bfloat16 else 0.05
    assert (out.float() - ref).abs().mean() < tol * ref.abs().mean()


KERNELS = ["softmax", "softmax_hyp", "softmax_opt", "softmax_trig", "relu", "elu"]


CAUSAL_KERNELS = [k for k in KERNELS if get_feature_map(k).causal_ok]


# ------------------------------------------------------------------ padding contents
@pytest.mark.parametrize("content", list(PADDING_CONTENTS), ids=list(PADDING_CONTENTS))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_favor_bidirectional_padding_contents_do_not_matter(kernel, content, side):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, kernel=kernel)
    qp, kp, vp, mask, sl = padded(q, k, v, 4, PADDING_CONTENTS[content], side)
    out = linattn.favor_attention(qp, kp, vp, w, kernel=kernel, key_padding_mask=mask)
    assert torch.isfinite(out[..., sl, :]).all()
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("content", list(PADDING_CONTENTS), ids=list(PADDING_CONTENTS))
@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
def test_favor_causal_and_recurrent_padding_contents_do_not_matter(kernel, content):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, kernel=kernel, causal=True)
    # Causal: left padding keeps the real tokens' prefixes.
    qp, kp, vp, mask, sl = padded(q, k, v, 4, PADDING_CONTENTS[content], "left")
    out = linattn.favor_attention(
        qp, kp, vp, w, kernel=kernel, causal=True, key_padding_mask=mask, chunk_size=4
    )
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-9, atol=1e-9)
    state, outs = None, []
    for i in range(qp.shape[-2]):
        o, state = linattn.favor_recurrent(
            qp[..., i : i + 1, :],
            kp[..., i : i + 1, :],
            vp[..., i : i + 1, :],
            w,
            state=state,
            kernel=kernel,
            key_padding_mask=mask[:, i : i + 1],
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -2)[..., sl, :], ref, rtol=1e-9, atol=1e-9)


def test_issue_repro_huge_padded_key_softmax():
    q, k, v = (randn(1, 1, 4, 8, seed=s, dtype=torch.float32) for s in range(3))
    k[..., 3, :] = 1e30
    w = projection(16, 8, dtype=torch.float32)
    mask = torch.tensor([[0, 0, 0, 1]]).bool()
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask)
    ref = linattn.favor_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], w)
    torch.testing.assert_close(out[..., :3, :], ref[..., :3, :])


def test_padding_contents_do_not_reach_gradients():
    q, k, v = (randn(2, 2, 7, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    _, kp, vp, mask, sl = padded(q, k, v, 3, float("nan"), "right")
    # Queries at padded positions stay finite: a NaN query poisons its own output row and,
    # through it, the backward pass, exactly as in exact attention (SDPA).
    qp = padded(q, k, v, 3, 0.5, "right")[0]
    for t in (qp, kp, vp):
        t.requires_grad_()
    for causal in (False, True):
        out = linattn.favor_attention(qp, kp, vp, w, causal=causal, key_padding_mask=mask)
        gk, gv = torch.autograd.grad(out[..., sl, :].sum(), (kp, vp))
        assert torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert (gk[..., 7:, :] == 0).all() and (gv[..., 7:, :] == 0).all()


def test_favor_nan_in_real_key_propagates():
    q, k, v = (randn(1, 1, 5, 8, seed=s) for s in range(3))
    k[0, 0, 2, 0] = float("nan")
    w = projection(16, 8)
    for causal in (False, True):
        out = linattn.favor_attention(q, k, v, w, causal=causal)
        rows = slice(2, None) if causal else slice(None)
        assert out[..., rows, :].isnan().all()
