"""The decoding fast paths against their references: the one-token step
(``favor_window_step_one``) against the general step, and a prefill's state built from
the parallel pass (``window_final_state``) against the state of the recurrent one."""

import math

import pytest
import torch

import linattn
import linattn._favor_checks as _favor_checks
import linattn._favor_state as _favor_state
from conftest import gen, randn
from linattn.features import KERNELS, get_feature_map
from linattn.ops.favor.recurrent import empty_window_state
from linattn.ops.favor.window.step import (
    favor_window_step_general,
    favor_window_step_one,
    window_final_state,
)

CAUSAL_KERNELS = [k for k in KERNELS if get_feature_map(k).causal_ok]
HUGE = 10**9


def _weight(kernel, d, dtype=torch.float64):
    fm = get_feature_map(kernel)
    if fm.needs_projection or kernel.startswith("hedgehog"):
        return linattn.draw_projection(6, fm.weight_cols(d), generator=gen(7), dtype=dtype)
    return None


def _mask(b, n, padding):
    """``(b, n)`` True = padding: none, left (row 0: 3 tokens), right (row 1: the last 2),
    or holes (row 0: tokens 1-2, row 1: token n - 3)."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    if padding == "left":
        mask[0, :3] = True
    elif padding == "right":
        mask[1, n - 2 :] = True
    elif padding == "holes":
        mask[0, 1:3] = True
        mask[1, n - 3] = True
    return mask


def _zeroed(x, mask):
    return x.masked_fill(mask[:, None, :, None], 0.0)


def _same_state(a, b, sinks):
    """Two window states equal up to rounding; empty sink slots' contents are not read."""
    for x, y in zip(a[:5], b[:5]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    if sinks:
        sk_a, sv_a, spad_a, seen_a = a[5:9]
        sk_b, sv_b, spad_b, seen_b = b[5:9]
        assert torch.equal(spad_a, spad_b) and torch.equal(seen_a, seen_b)
        full = ~spad_a[:, None, :, None]
        torch.testing.assert_close(sk_a * full, sk_b * full, rtol=0, atol=0)
        torch.testing.assert_close(sv_a * full, sv_b * full, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
@pytest.mark.parametrize("window", [0, 1, 4, HUGE], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", [0, 1, 3], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("padding", ["none", "left", "holes"])
def test_one_token_step_equals_general_step(kernel, window, sinks, padding):
    b, h, n, d = 3, 2, 11, 4
    mask = _mask(b, n, padding)
    q = randn(b, h, n, d, seed=1)
    k, v = (_zeroed(randn(b, h, n, d, seed=s), mask) for s in (2, 3))
    fm = get_feature_map(kernel)
    params = fm.prepare(_weight(kernel, d), q, k, None, d**-0.5)
    lf = torch.tensor([0.7, 2.5], dtype=torch.float64)
    m = fm.feature_dim(params.weight, d)
    state = tuple(
        empty_window_state(b, h, m, d, d, window, dtype=q.dtype, device=q.device, sinks=sinks)
    )
    state = state if sinks else state[:5]
    kw = dict(window=window, linear_factor=lf, sinks=sinks)
    # Token by token: the ring fills (not yet full for the first w tokens, never for a
    # huge window), keys leave it into S or a sink slot; both steps from the same state.
    for t in range(n):
        sl = slice(t, t + 1)
        args = (q[..., sl, :], k[..., sl, :], v[..., sl, :], fm, params)
        out, new = favor_window_step_one(*args, state=state, key_padding_mask=mask[:, sl], **kw)
        ref, ref_new = favor_window_step_general(
            *args, state=state, key_padding_mask=mask[:, sl], **kw
        )
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        _same_state(new, ref_new, sinks)
        state = ref_new


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("window", [None, 4], ids=lambda w: f"w{w}")
def test_one_token_step_without_mask_and_gradients(kernel, window):
    # No key_padding_mask at all, and gradients through the step equal the general's.
    b, h, n, d = 2, 2, 8, 4
    q, k, v = (randn(b, h, n, d, seed=s, requires_grad=True) for s in range(3))
    w = _weight(kernel, d)
    kw = dict(kernel=kernel, window=window, sinks=1, linear_factor=None)
    state, outs = None, []
    for t in range(n):
        sl = slice(t, t + 1)
        o, state = linattn.favor_recurrent(q[..., sl, :], k[..., sl, :], v[..., sl, :], w,
                                           state=state, **kw)  # fmt: skip
        outs.append(o)
    out = torch.cat(outs, dim=-2)
    ref = linattn.favor_attention(q, k, v, w, causal=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    g = randn(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
@pytest.mark.parametrize("window", [3, HUGE], ids=lambda w: f"w{w}")
def test_one_token_step_rows_with_only_exact_keys_at_any_magnitude(magnitude, window):
    # Issue 26: a row with no far key is exact softmax over its near keys and sinks at
    # any score magnitude (float32 scores of 1e4), token by token.
    b, h, n, d = 2, 2, 9, 4
    amp = math.sqrt(magnitude)
    q, k = (randn(b, h, n, d, seed=s, dtype=torch.float32) * amp for s in (1, 2))
    k[..., 0] = k[..., 0].abs() + amp
    q[..., 0] = q[..., 0] - amp * math.sqrt(d)  # every score far below exp's underflow
    v = randn(b, h, n, d, seed=3, dtype=torch.float32)
    w = _weight("hedgehog", d, torch.float32)
    state, outs = None, []
    for t in range(n):
        sl = slice(t, t + 1)
        o, state = linattn.favor_recurrent(q[..., sl, :], k[..., sl, :], v[..., sl, :], w,
                                           kernel="hedgehog", state=state, window=window,
                                           sinks=1)  # fmt: skip
        outs.append(o)
    out = torch.cat(outs, dim=-2).double()
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    exact = ((j <= i) & (i - j < window)) | ((j == 0) & (i >= 0))
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(d)
    ref = torch.softmax(scores.masked_fill(~exact, -math.inf), dim=-1) @ v.double()
    # Rows with no far key: those whose causal keys are all near or the sink.
    rows = (exact | (j > i)).all(-1)
    assert torch.isfinite(out).all()
    tol = 1e-5 + 2e-6 * magnitude
    torch.testing.assert_close(out[..., rows, :], ref[..., rows, :], rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
@pytest.mark.parametrize("window", [None, 3, 13, 20], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_prefill_state_equals_recurrent_state(kernel, window, sinks, padding):
    # L = 13 tokens: window 3 (L > w), 13 (L = w), 20 (L < w), None (sinks only).
    if window is None and not sinks:
        pytest.skip("window=None, sinks=0 is pure linear attention (no window state)")
    b, h, n, d, more = 3, 2, 13, 4, 5
    mask = _mask(b, n + more, padding)
    if padding == "right":
        # Right padding sits at the end of the prompt, before the continuation.
        mask = torch.zeros(b, n + more, dtype=torch.bool)
        mask[1, n - 2 : n] = True
    q, k, v = (randn(b, h, n + more, d, seed=s) for s in range(3))
    w = _weight(kernel, d)
    lf = torch.tensor([0.7, 2.5], dtype=torch.float64)
    kw = dict(kernel=kernel, window=window, sinks=sinks, linear_factor=lf)
    p = slice(0, n)
    out, state = linattn.favor_attention(
        q[..., p, :], k[..., p, :], v[..., p, :], w, causal=True,
        key_padding_mask=mask[:, p], output_final_state=True, **kw,
    )  # fmt: skip
    rec, outs = None, []
    for t in range(n):
        sl = slice(t, t + 1)
        o, rec = linattn.favor_recurrent(q[..., sl, :], k[..., sl, :], v[..., sl, :], w,
                                         state=rec, key_padding_mask=mask[:, sl], **kw)  # fmt: skip
        outs.append(o)
    torch.testing.assert_close(out, torch.cat(outs, dim=-2), rtol=1e-9, atol=1e-12)
    _same_state(tuple(state), tuple(rec), sinks)
    # Continuing from the parallel pass's state equals one call over everything.
    c = slice(n, n + more)
    tail, _ = linattn.favor_recurrent(q[..., c, :], k[..., c, :], v[..., c, :], w,
                                      state=state, key_padding_mask=mask[:, c], **kw)  # fmt: skip
    full = linattn.favor_attention(q, k, v, w, causal=True, key_padding_mask=mask, **kw)
    torch.testing.assert_close(tail, full[..., c, :], rtol=1e-9, atol=1e-12)


def test_prefill_runs_the_parallel_form(monkeypatch):
    # A prefill with a window and no initial state must not take the token-by-token
    # decoding machinery (1.2-1.5x slower at 8k: docs/results/hf_cache.md).
    def refuse(*args, **kwargs):
        raise AssertionError("the decoding step ran for a prefill")

    # Patched where it runs: the stateful path lives in linattn._favor_state.
    monkeypatch.setattr(_favor_state, "favor_recurrent_step", refuse)
    q = randn(2, 2, 9, 4)
    w = _weight("hedgehog", 4)
    kw = dict(kernel="hedgehog", window=3, sinks=1)
    out, state = linattn.favor_attention(q, q, q, w, causal=True, output_final_state=True, **kw)
    out2, state2 = linattn.favor_recurrent(q, q, q, w, **kw)
    torch.testing.assert_close(out, out2)
    assert state.keys.shape == (2, 2, 3, 4) and state2.seen.tolist() == [9, 9]


def test_window_final_state_of_an_empty_prompt_is_the_empty_state():
    fm = get_feature_map("softmax")
    k = randn(2, 2, 0, 4)
    params = fm.prepare(_weight("softmax", 4), k, k, None, 0.5)
    state = window_final_state(k, k, fm, params, window=3, sinks=2)
    ref = empty_window_state(2, 2, 6, 4, 4, 3, dtype=k.dtype, device=k.device, sinks=2)
    _same_state(state, tuple(ref), 2)


def test_a_checked_linear_factor_is_checked_again_only_when_it_changes():
    # The decoding loop passes one factor tensor at every token: its values are checked
    # on the host once (issue 26 item 2's guarantee kept for every change in place).
    q = randn(1, 2, 3, 4)
    w = _weight("hedgehog", 4)
    lf = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kw = dict(kernel="hedgehog", window=2, sinks=1, linear_factor=lf)
    linattn.favor_recurrent(q, q, q, w, **kw)
    assert _favor_checks._factor_checked(lf)
    lf[1] = float("nan")
    assert not _favor_checks._factor_checked(lf)
    with pytest.raises(ValueError, match="linear_factor must be finite"):
        linattn.favor_recurrent(q, q, q, w, **kw)
    lf[1] = -1.0
    with pytest.raises(ValueError, match="linear_factor must be non-negative"):
        linattn.favor_attention(q, q, q, w, causal=True, **kw)
    with torch.inference_mode():
        # Inference tensors keep no version counter: checked at every call.
        inf = torch.tensor([1.0, float("inf")], dtype=torch.float64)
        with pytest.raises(ValueError, match="linear_factor must be finite"):
            linattn.favor_recurrent(q, q, q, w, **{**kw, "linear_factor": inf})
        assert not _favor_checks._factor_checked(inf)


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("window", [None, 3, 20], ids=lambda w: f"w{w}")
def test_state_of_keys_alone_equals_the_prefill_state(kernel, window):
    # A lazy cache folds a prefill's keys and values without its (unread) outputs.
    mask = _mask(3, 13, "holes")
    q, k, v = (randn(3, 2, 13, 4, seed=s) for s in range(3))
    w = _weight(kernel, 4)
    kw = dict(kernel=kernel, window=window, sinks=2, scale=0.3)
    _, ref = linattn.favor_attention(
        q, k, v, w, causal=True, key_padding_mask=mask, output_final_state=True, **kw
    )
    state = _favor_state._favor_state_of(k, v, w, key_padding_mask=mask, **kw)
    _same_state(tuple(state), tuple(ref), 2)


def test_a_prefill_state_does_not_keep_the_prompt_alive():
    # The ring of the last w keys must not be a view of the whole prompt's keys (the
    # FavorCache would hold every prompt key behind its reported bytes).
    q = randn(1, 2, 50, 4)
    w = _weight("hedgehog", 4)
    kw = dict(kernel="hedgehog", window=3, sinks=1)
    _, state = linattn.favor_attention(q, q, q, w, causal=True, output_final_state=True, **kw)
    _, stepped = linattn.favor_recurrent(q[..., :40, :], q[..., :40, :], q[..., :40, :], w,
                                         state=state, **kw)  # fmt: skip
    for s in (state, stepped):
        for t in (s.keys, s.values, s.padding):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
