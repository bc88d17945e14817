"""The window hybrid's block-pair fast paths (``ops/favor/window/band.py``, ``far.py``)
against their plain
references, float64: the far block sums against an n x n mask, the exact band against
``band_attention`` (unfold + autograd), the far part against the running-maximum form
(bidirectional) and the prefix-maximum causal scan (causal); forward, gradients (incl.
the projection and the log-scales of the trigonometric map) and gradcheck."""

import pytest
import torch
from torch.autograd import gradcheck

from conftest import projection, randn
from linattn.features import get_feature_map
from linattn.ops.favor.window import (
    band_attention,
    band_blocks,
    far_block_sums,
    far_block_sums_reference,
    far_blocks,
    far_left,
    far_running_max,
    far_sums,
)


@pytest.mark.parametrize(
    "n,reach", [(1, 0), (2, 0), (5, 1), (9, 2), (7, 6), (4, 9)], ids=lambda x: str(x)
)
def test_far_block_sums_equal_the_reference(n, reach):
    g = torch.Generator().manual_seed(n * 10 + reach)
    u = torch.randn(2, 3, n, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(
        far_block_sums(u, reach), far_block_sums_reference(u, reach), rtol=1e-12, atol=1e-12
    )
    # Block t sees none of the blocks within reach, every other one.
    if n > reach + 1:
        out = far_block_sums(u, reach).detach()
        torch.testing.assert_close(out[:, :, 0], u.detach()[:, :, reach + 1 :].sum(2))
    torch.autograd.gradcheck(lambda x: far_block_sums(x, reach), (u,))
    w = torch.randn(2, 3, n, 4, 5, dtype=torch.float64, generator=g)
    (gu,) = torch.autograd.grad((far_block_sums(u, reach) * w).sum(), u)
    (gr,) = torch.autograd.grad((far_block_sums_reference(u, reach) * w).sum(), u)
    torch.testing.assert_close(gu, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "window,sinks", [(0, 0), (2, 0), (5, 0), (None, 1), (3, 2)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_favor_plus_plus_hybrid_equals_the_oracle(window, sinks, pad):
    # FAVOR++ moves a per-feature shift from the keys to the queries: the hybrid's queries
    # keep their norm term and must still take the query's side of it.
    import linattn
    from linattn.features import get_feature_map
    from linattn.ops.favor import favor_naive

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 23, 8, dtype=torch.float64, generator=g) for _ in range(3))
    w = linattn.draw_projection(16, 8, dtype=torch.float64, generator=g)
    mask = None
    if pad:
        mask = torch.zeros(2, 23, dtype=torch.bool)
        mask[0, 19:] = True
        mask[1, :4] = True
    fm = get_feature_map("softmax_opt")
    params = fm.prepare(w, q, k, mask, 8**-0.5)
    got = linattn.favor_attention(
        q, k, v, w, kernel="softmax_opt", window=window, sinks=sinks, key_padding_mask=mask
    )
    want = favor_naive(q, k, v, fm, params, window=window, sinks=sinks, key_padding_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "n,reach", [(1, 0), (2, 0), (3, 1), (6, 1), (9, 2), (4, 5)], ids=lambda x: str(x)
)
def test_one_sided_far_sums_and_their_adjoint(n, reach):
    g = torch.Generator().manual_seed(n + 7 * reach)
    u = torch.randn(n, 2, 3, 4, dtype=torch.float64, generator=g)
    w = torch.randn(n, 2, 3, 4, dtype=torch.float64, generator=g)
    idx = torch.arange(n)
    rel = idx[None, :] - idx[:, None]  # [t, s]: s - t
    masks = {"left": rel < -reach, "right": rel > reach, "both": rel.abs() > reach}
    for side, mask in masks.items():
        ref = torch.einsum("ts,s...->t...", mask.double(), u)
        torch.testing.assert_close(far_sums(u, reach, side), ref, rtol=1e-12, atol=1e-12)
    # <left(u), w> = <u, right(w)>: the causal backward uses "right" for "left".
    torch.testing.assert_close(
        (far_sums(u, reach, "left") * w).sum(), (u * far_sums(w, reach, "right")).sum()
    )


def holes(b, length, seed=0):
    """keep: (B, L) bool with left padding, right padding and a hole (row 0 full)."""
    keep = torch.ones(b, length, dtype=torch.bool)
    if b > 1:
        keep[1, : length // 3] = False
    if b > 2:
        keep[2, length - length // 4 :] = False
        keep[2, length // 2 : length // 2 + 3] = False
    return keep


BAND = [
    (False, -1),
    (False, 0),
    (False, 2),
    (False, 9),
    (False, 40),
    (True, 0),
    (True, 1),
    (True, 3),
    (True, 9),
    (True, 40),
]


@pytest.mark.parametrize("causal,window", BAND, ids=lambda x: str(x))
@pytest.mark.parametrize("length", [1, 13, 37], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("block", [1, 4, 16], ids=lambda b: f"C{b}")
def test_band_blocks_equal_band_attention(causal, window, length, block):
    q, k, v = (randn(3, 2, length, 5, seed=s, requires_grad=True) for s in range(3))
    keep = holes(3, length)
    nd, mx = band_blocks(q, k, v, keep, window, causal, 0.7, block)
    ref_nd, ref_mx = band_attention(q, k, v, keep, window, causal, 0.7, block=block)
    torch.testing.assert_close(mx, ref_mx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nd, ref_nd, rtol=1e-12, atol=1e-12)
    g = randn(*nd.shape, seed=8)
    if nd.requires_grad:
        grads = torch.autograd.grad(nd, (q, k, v), g)
        ref = torch.autograd.grad(ref_nd, (q, k, v), g)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_band_blocks_gradcheck(causal):
    q, k, v = (randn(2, 2, 11, 3, seed=s, requires_grad=True) for s in range(3))
    keep = holes(2, 11)

    def fn(q, k, v):
        # exp(mx) nd is the true sum; mx alone is a stabilizer (no gradient).
        nd, mx = band_blocks(q, k, v, keep, 3, causal, 0.9, 4)
        return nd * torch.exp(torch.where(torch.isfinite(mx), mx, 0.0)).unsqueeze(-1)

    assert gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def far_sum(q, k, v, keep, kernel, w, window, causal, block, spread=600.0):
    """The far part's true sum exp(g) nd, by far_blocks."""
    fm = get_feature_map(kernel)
    params = fm.prepare(w, q, k, None, 0.6)
    res = far_blocks(q, k, v, keep, fm, params, window, block, spread, causal=causal)
    if res is None:
        return None
    nd, rq, top = res
    return nd * torch.exp(rq + top.unsqueeze(-1)).unsqueeze(-1)


def far_sum_reference(q, k, v, keep, kernel, w, window, causal):
    fm = get_feature_map(kernel)
    params = fm.prepare(w, q, k, None, 0.6)
    if causal:
        keep_f = None if keep is None else keep.to(q.dtype)
        nd, g, _, _ = far_left(q, k, v, keep_f, fm, params, -window, 4)
        lc = fm.log_const(params)
        g = g - 2 * lc
    else:
        nd, g = far_running_max(q, k, v, keep, fm, params, window)
    return nd * torch.exp(g).unsqueeze(-1)


FAR = [
    (False, -1),
    (False, 0),
    (False, 3),
    (False, 17),
    (True, 0),
    (True, 1),
    (True, 4),
    (True, 17),
]


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "softmax_trig", "hedgehog", "relu"])
@pytest.mark.parametrize("causal,window", FAR, ids=lambda x: str(x))
@pytest.mark.parametrize("length,block", [(1, 4), (23, 4), (40, 16), (40, 1)], ids=lambda x: str(x))
def test_far_blocks_equal_the_reference(kernel, causal, window, length, block, monkeypatch):
    # The reference with its running maxima (not its own one-stabilizer branch).
    monkeypatch.setattr("linattn.ops.favor.window.far.SPREAD_FLOAT64", -1.0)
    q, k, v = (randn(3, 2, length, 6, seed=s, requires_grad=True) for s in range(3))
    w = torch.stack([projection(8, 6, seed=1), projection(8, 6, seed=2)]).requires_grad_()
    keep = holes(3, length)
    out = far_sum(q, k, v, keep, kernel, w, window, causal, block)
    ref = far_sum_reference(q, k, v, keep, kernel, w, window, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = randn(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v, w), g, allow_unused=True)
    refs = torch.autograd.grad(ref, (q, k, v, w), g, allow_unused=True)
    for a, b in zip(grads, refs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_trig", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_far_blocks_gradcheck(kernel, causal):
    q, k, v = (randn(2, 2, 10, 3, seed=s, requires_grad=True) for s in range(3))
    w = torch.stack([projection(4, 3, seed=1), projection(4, 3, seed=2)]).requires_grad_()
    keep = holes(2, 10)

    def fn(q, k, v, w):
        return far_sum(q, k, v, keep, kernel, w, 2, causal, 3)

    assert gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-7)


def test_far_blocks_decline_a_spread_too_wide_for_one_stabilizer():
    q, k, v = (randn(1, 2, 20, 4, seed=s) for s in range(3))
    w = projection(8, 4)
    assert far_sum(q, k, v, None, "softmax", w, 2, False, 4, spread=600.0) is not None
    assert far_sum(q, k, v, None, "softmax", w, 2, False, 4, spread=0.0) is None
    assert far_sum(q, k, v, None, "softmax", w, 2, True, 4, spread=0.0) is None


@pytest.mark.parametrize("length", [1, 4, 9], ids=lambda n: f"L{n}")
def test_inputs_are_left_unchanged(length):
    # One block (C >= L): the block-major copies must still be copies, never views.
    q, k, v = (randn(2, 2, length, 3, seed=s, requires_grad=True) for s in range(3))
    before = [t.detach().clone() for t in (q, k, v)]
    w = projection(4, 3)
    nd, _ = band_blocks(q, k, v, None, 2, False, 0.5, 16)
    out = far_sum(q, k, v, None, "softmax", w, 0, False, 16)
    (nd.sum() + out.sum()).backward()
    for t, b in zip((q, k, v), before):
        assert torch.equal(t.detach(), b)
