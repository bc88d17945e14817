"""A prefill's decoding state from the parallel pass's own features
(``favor_window(..., final_state=True)``, the far part's block sums) against the state
built from the keys and values alone (``window_final_state``, its reference), in float64:
with sinks, padding, a decay, far inputs, lengths that split a block and prompts shorter
than the window; the fused form is taken exactly when no gradient is to be built and the
far part ran by blocks."""

import pytest
import torch

from conftest import gen, randn
from linattn import draw_projection, favor_attention, favor_recurrent
from linattn.features import get_feature_map
from linattn.ops.favor.window import far as far_module
from linattn.ops.favor.window.hybrid import favor_window
from linattn.ops.favor.window.step import window_final_state

B, H, D = 2, 3, 8

CASES = [
    # (length, window, sinks, ln gamma, far inputs, padding)
    (100, 4, 0, None, False, None),
    (128, 64, 1, -0.01, True, None),
    (130, 64, 2, None, False, "left"),
    (200, None, 1, -0.05, True, "holes"),
    (257, 32, 1, -0.002, True, None),
    (96, 40, 3, None, True, "left"),
    # Every key older than the window is a sink: an empty far state.
    (10, 4, 6, -0.1, False, None),
]


def _mask(length, padding):
    if padding is None:
        return None
    mask = torch.zeros(B, length, dtype=torch.bool)
    if padding == "left":
        mask[0, :5] = True
    else:
        mask[0, 1:3] = True
        mask[1, length - 70] = True
    return mask


def _inputs(length, far):
    q, k, v = (randn(B, H, length, D, seed=s) for s in (1, 2, 3))
    fq, fk = (randn(B, H, length, D, seed=s) if far else None for s in (4, 5))
    w = randn(H, 8, D, seed=6) * 0.4
    return q, k, v, fq, fk, w


def _unstabilized(kv, stab):
    return kv * torch.exp(stab)[..., None, None]


@pytest.fixture
def fused(monkeypatch):
    """A list that grows by one entry for each decoding state's far sums taken from the
    far part's blocks (:func:`~linattn.ops.favor.window.far.final_sums`)."""
    calls = []
    real = far_module.final_sums

    def counting(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(far_module, "final_sums", counting)
    return calls


@pytest.mark.parametrize("case", CASES, ids=[f"L{c[0]}-w{c[1]}-s{c[2]}" for c in CASES])
def test_the_far_sums_of_the_parallel_pass_equal_the_reference(case, fused):
    length, window, sinks, ld, far, padding = case
    q, k, v, fq, fk, w = _inputs(length, far)
    mask = _mask(length, padding)
    fm = get_feature_map("hedgehog")
    params = fm.prepare(w, q, k, mask, D**-0.5)
    decay = None if ld is None else torch.tensor(ld, dtype=torch.float64)
    kw = dict(key_padding_mask=mask, sinks=sinks, decay=decay)
    with torch.no_grad():
        out, sums = favor_window(
            q, k, v, fm, params, window=window, causal=True, far_q=fq, far_k=fk,
            final_state=True, **kw,
        )  # fmt: skip
        plain = favor_window(q, k, v, fm, params, window=window, causal=True, far_q=fq,
                             far_k=fk, **kw)  # fmt: skip
        ref = window_final_state(k, v, fm, params, window=window or 0, far_k=fk, **kw)
    assert fused and sums is not None
    assert torch.equal(out, plain)
    kv, stab = sums
    assert kv.shape == ref[0].shape and stab.shape == ref[1].shape
    # The same sums under the same stabilizer (each key's largest log-weight).
    torch.testing.assert_close(kv, ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stab, ref[1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        _unstabilized(kv, stab), _unstabilized(ref[0], ref[1]), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("case", CASES[1:4], ids=["decay-far", "sinks-left", "holes"])
def test_a_prefill_state_continues_as_the_recurrent_one(case, fused):
    # favor_recurrent's prefill takes the fused far sums without a gradient to build; the
    # decoding that follows equals the parallel hybrid over the whole text.
    length, window, sinks, ld, far, padding = case
    q, k, v, fq, fk, w = _inputs(length + 6, far)
    mask = _mask(length + 6, padding)
    decay = None if ld is None else torch.tensor(ld, dtype=torch.float64)
    opts = dict(kernel="hedgehog", window=window, sinks=sinks, decay=decay)

    def part(t, sl):
        return None if t is None else t[..., sl, :]

    pre = slice(0, length)
    with torch.no_grad():
        out, state = favor_recurrent(
            q[..., pre, :], k[..., pre, :], v[..., pre, :], w, far_q=part(fq, pre),
            far_k=part(fk, pre), key_padding_mask=None if mask is None else mask[:, pre], **opts,
        )  # fmt: skip
        assert len(fused) == 1
        outs = [out]
        for t in range(length, length + 6):
            sl = slice(t, t + 1)
            out, state = favor_recurrent(
                q[..., sl, :], k[..., sl, :], v[..., sl, :], w, state=state,
                far_q=part(fq, sl), far_k=part(fk, sl),
                key_padding_mask=None if mask is None else mask[:, sl], **opts,
            )  # fmt: skip
            outs.append(out)
        full = favor_attention(
            q, k, v, w, causal=True, far_q=fq, far_k=fk, key_padding_mask=mask, **opts
        )
    got = torch.cat(outs, -2)
    if mask is not None:
        # Padded queries' outputs are not defined.
        got, full = (t.masked_fill(mask[:, None, :, None], 0.0) for t in (got, full))
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_with_a_gradient_to_build_the_state_comes_from_the_keys(fused):
    # The fused sums are not differentiable: a prefill that builds a gradient computes
    # its state from the keys and values, and the state carries the gradient.
    q, k, v, _, _, w = _inputs(100, False)
    w.requires_grad_(True)
    _, state = favor_recurrent(q, k, v, w, kernel="hedgehog", window=8, sinks=1)
    assert not fused
    assert state.kv.requires_grad
    state.kv.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_a_wide_spread_of_key_scales_falls_back_to_the_reference(fused):
    # Keys whose log-scales spread past one stabilizer's range: the far part takes its
    # running-maximum form, and the state its reference.
    q, k, v, _, _, _ = _inputs(100, False)
    k = k.clone()
    k[:, :, 10] *= 30.0
    proj = draw_projection(16, D, generator=gen(3), dtype=torch.float64)
    with torch.no_grad():
        _, state = favor_recurrent(q, k, v, proj, window=8)
    assert not fused
    ref = favor_recurrent(q, k, v, proj.requires_grad_(), window=8)[1]
    torch.testing.assert_close(state.kv, ref.kv.detach(), rtol=1e-12, atol=0)


def test_final_state_needs_causal():
    q, k, v, _, _, w = _inputs(20, False)
    fm = get_feature_map("hedgehog")
    params = fm.prepare(w, q, k, None, D**-0.5)
    with pytest.raises(ValueError, match="final_state needs causal=True"):
        favor_window(q, k, v, fm, params, window=4, causal=False, final_state=True)
