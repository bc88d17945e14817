"""The causal op contract (issue 27 step 2): ``favor_attention(..., causal=True,
initial_state=s, output_final_state=True)`` returns ``(out, FavorState)``; prefilling in
pieces of any size equals one call (float64), with and without window and sinks, and
the state continues by further pieces or by ``favor_recurrent`` steps."""

import pytest
import torch

import linattn
from conftest import projection, randn

B, H, L, D, DV = 2, 2, 13, 4, 3
TOL = dict(rtol=1e-10, atol=1e-12)

KERNELS = {
    "softmax": lambda: projection(8, D),
    "softmax_hyp": lambda: projection(6, D),
    "hedgehog": lambda: randn(5, D, seed=7) * 0.5,
    "relu": lambda: projection(8, D),
}
# (window, sinks): pure linear, window 3, window + sinks, sinks alone.
HYBRIDS = [(None, 0), (3, 0), (3, 2), (None, 1)]


def _ids(h):
    return f"w{h[0]}-s{h[1]}"


def _qkv(requires_grad=False, seed=0):
    q = randn(B, H, L, D, seed=seed, requires_grad=requires_grad)
    k = randn(B, H, L, D, seed=seed + 1, requires_grad=requires_grad)
    v = randn(B, H, L, DV, seed=seed + 2, requires_grad=requires_grad)
    return q, k, v


def _pieces(q, k, v, w, size, mask=None, **kw):
    outs, state = [], None
    for s in range(0, L, size):
        part = slice(s, s + size)
        m = None if mask is None else mask[:, part]
        out, state = linattn.favor_attention(
            q[..., part, :],
            k[..., part, :],
            v[..., part, :],
            w,
            causal=True,
            key_padding_mask=m,
            initial_state=state,
            output_final_state=True,
            **kw,
        )
        outs.append(out)
    return torch.cat(outs, dim=-2), state


@pytest.mark.parametrize("hybrid", HYBRIDS, ids=_ids)
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("size", [1, 5, 8, L], ids=lambda s: f"piece{s}")
def test_prefill_in_pieces_equals_one_call(kernel, hybrid, size):
    window, sinks = hybrid
    q, k, v = _qkv()
    w = KERNELS[kernel]()
    kw = dict(kernel=kernel, window=window, sinks=sinks)
    one = linattn.favor_attention(q, k, v, w, causal=True, **kw)
    out, state = _pieces(q, k, v, w, size, **kw)
    torch.testing.assert_close(out, one, **TOL)
    assert isinstance(state, linattn.FavorState)
    # The state of one call with output_final_state (no initial state) is the same.
    out1, state1 = linattn.favor_attention(q, k, v, w, causal=True, output_final_state=True, **kw)
    torch.testing.assert_close(out1, one, **TOL)
    for f in linattn.FavorState._fields:
        a, b = getattr(state, f), getattr(state1, f)
        assert (a is None) == (b is None), f
        if a is not None and a.is_floating_point():
            # kv is stored under stab: compare the unstabilized sums.
            if f == "kv":
                a = a * torch.exp(state.stab - state1.stab)[..., None, None]
            if f != "stab":
                torch.testing.assert_close(a, b, **TOL)
        elif a is not None:
            assert torch.equal(a, b), f


@pytest.mark.parametrize("hybrid", HYBRIDS, ids=_ids)
def test_prefill_then_decode_equals_one_call(hybrid):
    window, sinks = hybrid
    q, k, v = _qkv(seed=3)
    w = projection(8, D)
    kw = dict(window=window, sinks=sinks)
    one = linattn.favor_attention(q, k, v, w, causal=True, **kw)
    head, state = linattn.favor_attention(
        q[..., :7, :], k[..., :7, :], v[..., :7, :], w, causal=True, output_final_state=True, **kw
    )
    outs = [head]
    for t in range(7, L):
        step = slice(t, t + 1)
        o, state = linattn.favor_recurrent(
            q[..., step, :], k[..., step, :], v[..., step, :], w, state=state, **kw
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -2), one, **TOL)
    # And the reverse: decoding steps, then a prefill piece continues their state.
    _, state = linattn.favor_recurrent(q[..., :4, :], k[..., :4, :], v[..., :4, :], w, **kw)
    rest = linattn.favor_attention(
        q[..., 4:, :], k[..., 4:, :], v[..., 4:, :], w, causal=True, initial_state=state, **kw
    )
    torch.testing.assert_close(rest, one[..., 4:, :], **TOL)


@pytest.mark.parametrize("hybrid", HYBRIDS, ids=_ids)
def test_pieces_with_left_padding(hybrid):
    window, sinks = hybrid
    q, k, v = _qkv(seed=5)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, :4] = True
    w = projection(8, D)
    kw = dict(window=window, sinks=sinks)
    one = linattn.favor_attention(q, k, v, w, causal=True, key_padding_mask=mask, **kw)
    out, _ = _pieces(q, k, v, w, 3, mask=mask, **kw)
    torch.testing.assert_close(out, one, **TOL)


@pytest.mark.parametrize("hybrid", HYBRIDS, ids=_ids)
def test_pieces_gradients_equal_one_call(hybrid):
    window, sinks = hybrid
    w = projection(8, D)
    kw = dict(window=window, sinks=sinks)
    q, k, v = _qkv(requires_grad=True, seed=9)
    g = randn(B, H, L, DV, seed=11)
    (linattn.favor_attention(q, k, v, w, causal=True, **kw) * g).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out, _ = _pieces(q, k, v, w, 4, **kw)
    (out * g).sum().backward()
    for t, ref in zip((q, k, v), want):
        torch.testing.assert_close(t.grad, ref, rtol=1e-9, atol=1e-11)


def test_learned_factor_and_projection_gradients_through_pieces():
    # hedgehog with a window weights the far part by linear_factor: both get gradients.
    q, k, v = _qkv(seed=2)
    w = (randn(5, D, seed=7) * 0.5).requires_grad_()
    lf = torch.tensor([0.7, 2.0], dtype=torch.float64, requires_grad=True)
    kw = dict(kernel="hedgehog", window=2, sinks=1, linear_factor=lf)
    linattn.favor_attention(q, k, v, w, causal=True, **kw).sum().backward()
    want = [w.grad.clone(), lf.grad.clone()]
    w.grad = lf.grad = None
    _pieces(q, k, v, w, 3, **kw)[0].sum().backward()
    torch.testing.assert_close(w.grad, want[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lf.grad, want[1], rtol=1e-9, atol=1e-11)


def test_float32_pieces_and_state_dtype():
    q, k, v = (t.float() for t in _qkv())
    w = projection(8, D).float()
    one = linattn.favor_attention(q, k, v, w, causal=True, window=2)
    out, state = _pieces(q, k, v, w, 4, window=2)
    assert out.dtype == torch.float32 and state.kv.dtype == torch.float32
    torch.testing.assert_close(out, one, rtol=1e-4, atol=1e-5)


def test_leading_dims_are_folded_into_heads():
    # (B, H1, H2, L, d): the state's heads are H1 * H2, as favor_attention folds them.
    q = randn(2, 2, 3, L, D)
    w = projection(8, D)
    one = linattn.favor_attention(q, q, q, w, causal=True)
    a, st = linattn.favor_attention(
        q[..., :6, :], q[..., :6, :], q[..., :6, :], w, causal=True, output_final_state=True
    )
    assert st.kv.shape[:2] == (2, 6)
    # output_final_state decides the return: an initial_state alone gives the output.
    b = linattn.favor_attention(
        q[..., 6:, :], q[..., 6:, :], q[..., 6:, :], w, causal=True, initial_state=st
    )
    assert isinstance(b, torch.Tensor)
    torch.testing.assert_close(torch.cat([a, b], -2), one, **TOL)


def test_contract_errors():
    q, k, v = _qkv()
    w = projection(8, D)
    _, st = linattn.favor_attention(q, k, v, w, causal=True, output_final_state=True)
    with pytest.raises(ValueError, match=r"initial_state / output_final_state need causal=True"):
        linattn.favor_attention(q, k, v, w, initial_state=st)
    with pytest.raises(ValueError, match=r"need causal=True"):
        linattn.favor_attention(q, k, v, w, output_final_state=True)
    with pytest.raises(TypeError, match=r"output_final_state must be a bool"):
        linattn.favor_attention(q, k, v, w, causal=True, output_final_state=1)
    with pytest.raises(TypeError, match=r"initial_state must be a FavorState"):
        linattn.favor_attention(q, k, v, w, causal=True, initial_state=(st.kv, st.stab))
    with pytest.raises(ValueError, match=r"initial_state.keys must have shape \(2, 2, 3, 4\)"):
        linattn.favor_attention(q, k, v, w, causal=True, window=3, initial_state=st)
    _, stw = linattn.favor_attention(q, k, v, w, causal=True, window=3, output_final_state=True)
    with pytest.raises(ValueError, match=r"initial_state carries a window's keys"):
        linattn.favor_attention(q, k, v, w, causal=True, initial_state=stw)
    with pytest.raises(ValueError, match=r"initial_state.kv must have shape"):
        linattn.favor_attention(q[:1], k[:1], v[:1], w, causal=True, initial_state=st)


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("size", [1, 5], ids=lambda s: f"piece{s}")
def test_window_longer_than_everything(size, sinks):
    # w > L: exact attention. The state's ring must not depend on a piece's length (a
    # window clamped to each piece would change the state's shape between pieces).
    q, k, v = _qkv(seed=13)
    w = projection(8, D)
    one = linattn.favor_attention(q, k, v, w, causal=True, window=40, sinks=sinks)
    out, _ = _pieces(q, k, v, w, size, window=40, sinks=sinks)
    torch.testing.assert_close(out, one, **TOL)


@pytest.mark.parametrize("hybrid", HYBRIDS, ids=_ids)
def test_an_empty_piece_passes_the_state_on(hybrid):
    # Prefill in pieces of any size: a piece of no tokens (with or without a padding mask
    # of length 0) returns an empty output and the state unchanged, checked as any piece.
    window, sinks = hybrid
    q, k, v = _qkv()
    w = KERNELS["softmax"]()
    kw = dict(window=window, sinks=sinks)
    _, st = linattn.favor_attention(q, k, v, w, causal=True, output_final_state=True, **kw)
    e, ev = q[..., :0, :], v[..., :0, :]
    for mask in (None, torch.zeros(B, 0, dtype=torch.bool)):
        out, st2 = linattn.favor_attention(
            e,
            e,
            ev,
            w,
            causal=True,
            key_padding_mask=mask,
            initial_state=st,
            output_final_state=True,
            **kw,
        )
        assert out.shape == (B, H, 0, DV) and out.dtype == q.dtype
        out3, st3 = linattn.favor_recurrent(e, e, ev, w, state=st, key_padding_mask=mask, **kw)
        assert out3.shape == (B, H, 0, DV)
        for a, b, c in zip(st, st2, st3, strict=True):
            if a is None:
                assert b is None and c is None
            else:
                assert torch.equal(a, b) and torch.equal(a, c)
    # ... and continuing from it equals continuing from the state itself.
    x = randn(B, H, 2, D, seed=9)
    xv = randn(B, H, 2, DV, seed=10)
    ref, _ = linattn.favor_recurrent(x, x, xv, w, state=st, **kw)
    out, _ = linattn.favor_recurrent(x, x, xv, w, state=st2, **kw)
    torch.testing.assert_close(out, ref, **TOL)
    # The state is checked all the same; without a state an empty piece is refused.
    with pytest.raises(ValueError, match="initial_state"):
        linattn.favor_attention(
            e,
            e,
            ev,
            w,
            causal=True,
            initial_state=st,
            output_final_state=True,
            window=7 if window is None else window + 1,
            sinks=sinks + 1,
        )
    with pytest.raises(ValueError, match="at least one key"):
        linattn.favor_attention(e, e, ev, w, causal=True, output_final_state=True, **kw)
