"""Grouped-query decoding (``favor_recurrent`` with ``H_kv < H`` key/value heads): the
outputs equal the parallel hybrid on the keys and values repeated to the query heads
(float64), token by token, several tokens at a time, eagerly and through the compiled
step, with every hybrid option; the state keeps its window ring, far ring and sink slots
once per key/value head (the repeated run's every g-th head), and bad inputs are refused
by name."""

import pytest
import torch

from conftest import randn
from linattn import favor_attention, favor_recurrent
from linattn._favor_state import _favor_state_of

B, H, HKV, D = 2, 6, 2, 8
G = H // HKV
DECAY = torch.tensor(-0.05, dtype=torch.float64)

OPTIONS = [
    dict(window=4, sinks=0),
    dict(window=4, sinks=2),
    dict(window=6, sinks=1, decay=DECAY, far=True),
    dict(window=None, sinks=1),
    dict(window=0, sinks=0),
]
IDS = ["window", "window+sinks", "decay+far", "sinks-only", "window-0"]


def inputs(length, dtype=torch.float64):
    q, fq = randn(B, H, length, D, seed=1), randn(B, H, length, D, seed=2)
    k, v, fk = (randn(B, HKV, length, D, seed=s) for s in (3, 4, 5))
    w = randn(H, 8, D, seed=6) * 0.4
    lf = torch.linspace(0.5, 2.0, H, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, fq, fk, w, lf))


def repeated(*ts):
    return tuple(None if t is None else t.repeat_interleave(G, dim=1) for t in ts)


def run(kw, length, pieces, *, grouped, compile_step=False, mask=None, dtype=torch.float64):
    """Decode ``length`` tokens in ``pieces`` (lengths; the first one is the prefill)."""
    kw = dict(kw)
    far = kw.pop("far", False)
    q, k, v, fq, fk, w, lf = inputs(length, dtype)
    if not grouped:
        k, v, fk = repeated(k, v, fk)
    opts = dict(kernel="hedgehog", linear_factor=lf, **kw)
    state, outs, t = None, [], 0
    for n in pieces:
        sl = slice(t, t + n)
        out, state = favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, state=state,
            far_q=fq[..., sl, :] if far else None, far_k=fk[..., sl, :] if far else None,
            key_padding_mask=None if mask is None else mask[:, sl],
            compile_step=compile_step if t else False, **opts,
        )  # fmt: skip
        outs.append(out)
        t += n
    assert t == length
    return torch.cat(outs, -2), state


def parallel(kw, length, mask=None):
    kw = dict(kw)
    far = kw.pop("far", False)
    q, k, v, fq, fk, w, lf = inputs(length)
    k, v, fk = repeated(k, v, fk)
    return favor_attention(
        q, k, v, w, causal=True, kernel="hedgehog", linear_factor=lf, key_padding_mask=mask,
        far_q=fq if far else None, far_k=fk if far else None, **kw,
    )  # fmt: skip


PIECES = [7, 1, 1, 1, 3, 1, 2, 1, 1]


@pytest.mark.parametrize("kw", OPTIONS, ids=IDS)
def test_grouped_decoding_equals_the_repeated_heads(kw):
    length = sum(PIECES)
    out, state = run(kw, length, PIECES, grouped=True)
    torch.testing.assert_close(out, parallel(kw, length), rtol=1e-10, atol=1e-12)
    ref_out, ref = run(kw, length, PIECES, grouped=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    # The feature-map sums per query head, the rings per key/value head.
    torch.testing.assert_close(state.kv, ref.kv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.stab, ref.stab)
    for field in ("keys", "values", "sink_keys", "sink_values", "far_keys"):
        a, b = getattr(state, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.shape[1] == HKV, field
            # Not a view of a repeated tensor (which would keep G times the memory): at
            # most the ring and the step's new token.
            slots = (a.shape[-2] + 1) * B * HKV * D
            assert a.untyped_storage().nbytes() <= slots * a.element_size(), field
            torch.testing.assert_close(a, b[:, ::G], rtol=0, atol=0)


@pytest.mark.parametrize("kw", OPTIONS[:4], ids=IDS[:4])
def test_grouped_compiled_steps_equal_the_eager_ones(kw, compiled_steps):
    length = 20
    pieces = [8] + [1] * 12
    eager, s_eager = run(kw, length, pieces, grouped=True)
    assert not compiled_steps
    comp, s_comp = run(kw, length, pieces, grouped=True, compile_step=True)
    assert len(compiled_steps) == 12
    torch.testing.assert_close(comp, eager, rtol=1e-10, atol=1e-12)
    for a, b in zip(s_comp, s_eager):
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grouped_decoding_with_left_padding():
    kw = dict(window=3, sinks=1)
    mask = torch.zeros(B, sum(PIECES), dtype=torch.bool)
    mask[0, :4] = True
    out, _ = run(kw, sum(PIECES), PIECES, grouped=True, mask=mask)
    full = parallel(kw, sum(PIECES), mask=mask)
    torch.testing.assert_close(out[0, :, 4:], full[0, :, 4:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1], full[1], rtol=1e-10, atol=1e-12)


def test_grouped_float32_is_close_to_float64():
    kw = dict(window=4, sinks=1, decay=DECAY, far=True)
    out32, _ = run(kw, 20, [8] + [1] * 12, grouped=True, dtype=torch.float32)
    out64, _ = run(kw, 20, [8] + [1] * 12, grouped=True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_without_a_window_grouped_inputs_are_repeated():
    # Plain causal FAVOR+ keeps no ring: grouped k, v give the repeated result.
    q, k, v, _, _, w, _ = inputs(10)
    out, state = favor_recurrent(q, k, v, w, kernel="hedgehog")
    ref, _ = favor_recurrent(q, *repeated(k, v), w, kernel="hedgehog")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert state.keys is None and state.kv.shape[1] == H


def test_the_state_from_keys_alone_is_the_grouped_prefill_state():
    q, k, v, _, fk, w, _ = inputs(12)
    opts = dict(kernel="hedgehog", window=4, sinks=1, decay=DECAY)
    _, state = favor_recurrent(q, k, v, w, far_q=q, far_k=fk, **opts)
    alone = _favor_state_of(k, v, w, key_padding_mask=None, scale=None, far_k=fk, heads=H, **opts)
    for a, b in zip(alone, state):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_packed_sequences_with_grouped_inputs():
    q, k, v, _, _, w, _ = inputs(10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    opts = dict(kernel="hedgehog", window=3, sinks=1, cu_seqlens=cu)
    out, state = favor_recurrent(q[:1], k[:1], v[:1], w, **opts)
    ref, _ = favor_recurrent(q[:1], *repeated(k[:1], v[:1]), w, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Packed: the state is kept per query head.
    assert state.keys.shape[:2] == (2, H)


def test_bad_grouped_inputs_are_refused_by_name():
    q, k, v, fq, fk, w, _ = inputs(6)
    opts = dict(kernel="hedgehog", window=3)
    with pytest.raises(ValueError, match="multiple of k's and v's 4 key/value heads"):
        favor_recurrent(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), w, **opts)
    with pytest.raises(ValueError, match="q's 6 heads must be a multiple"):
        favor_recurrent(q, k[:, :0], v[:, :0], w, **opts)
    with pytest.raises(ValueError, match="k and v must have the same number of heads"):
        favor_recurrent(q, k, v.repeat_interleave(G, 1), w, **opts)
    with pytest.raises(ValueError, match="far_k must have k's shape"):
        favor_recurrent(q, k, v, w, far_q=fq, far_k=fk.repeat_interleave(G, 1), **opts)
    # A state of the repeated heads does not continue a grouped call, nor the reverse.
    _, rep_state = favor_recurrent(q, *repeated(k, v), w, **opts)
    _, grp_state = favor_recurrent(q, k, v, w, **opts)
    with pytest.raises(ValueError, match="key/value heads"):
        favor_recurrent(q[..., :1, :], k[..., :1, :], v[..., :1, :], w, state=rep_state, **opts)
    with pytest.raises(ValueError, match="key/value heads"):
        favor_recurrent(
            q[..., :1, :], *repeated(k[..., :1, :], v[..., :1, :]), w, state=grp_state, **opts
        )
