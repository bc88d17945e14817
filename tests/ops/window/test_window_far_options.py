"""The window hybrid's far-part options (issue 25, build item 2): ``decay`` (far scores
weighed by ``gamma^(i - j)``) and ``far_q``/``far_k`` (the far part scores its own
inputs, e.g. queries and keys before a rotary embedding). Each against the float64 oracle
:func:`favor_naive`, through the block form, the running-maximum form (a key spread
too wide for one stabilizer), the stateful prefill and the decoding step (one token and
pieces), and through autograd; bad input gets a clear error."""

import pytest
import torch

from linattn import FavorState, favor_attention, favor_recurrent
from linattn.features import get_feature_map
from linattn.ops.favor.naive import favor_naive
from linattn.ops.favor.window import far as far_module

B, H, D = 2, 3, 8


def randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def inputs(length, seed=0, far=True):
    q, k, v = (randn(B, H, length, D, seed=seed + i) for i in range(3))
    fq, fk = (randn(B, H, length, D, seed=seed + 10 + i) for i in range(2)) if far else (None,) * 2
    w = randn(H, 8, D, seed=seed + 20) * 0.4
    lf = torch.rand(H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return q, k, v, fq, fk, w, lf


def oracle(q, k, v, w, *, kernel="hedgehog", **kw):
    fm = get_feature_map(kernel)
    params = fm.prepare(w, q, k, None, D**-0.5)
    return favor_naive(q, k, v, fm, params, **kw)


DECAY = torch.tensor([-0.02, -0.2, -0.001], dtype=torch.float64)


@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("decay", [None, DECAY, torch.tensor(-0.05, dtype=torch.float64)])
@pytest.mark.parametrize("window,sinks", [(5, 0), (5, 2), (None, 1), (16, 1)])
def test_causal_hybrid_equals_the_oracle(far, decay, window, sinks):
    if decay is None and not far:
        pytest.skip("the plain hybrid (tested elsewhere)")
    q, k, v, fq, fk, w, lf = inputs(150, far=far)
    kw = dict(window=window, sinks=sinks, linear_factor=lf, decay=decay, far_q=fq, far_k=fk)
    out = favor_attention(q, k, v, w, kernel="hedgehog", causal=True, **kw)
    ref = oracle(q, k, v, w, causal=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_decay_and_far_inputs_change_the_result():
    # Not a no-op: each option moves the output away from the plain hybrid.
    q, k, v, fq, fk, w, lf = inputs(80)
    kw = dict(kernel="hedgehog", causal=True, window=4, sinks=1, linear_factor=lf)
    plain = favor_attention(q, k, v, w, **kw)
    for extra in (dict(decay=DECAY), dict(far_q=fq, far_k=fk)):
        assert (favor_attention(q, k, v, w, **kw, **extra) - plain).abs().max() > 1e-3
    # far_q = q, far_k = k is the plain hybrid.
    same = favor_attention(q, k, v, w, **kw, far_q=q, far_k=k)
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-13)


def test_bidirectional_far_inputs_equal_the_oracle():
    q, k, v, fq, fk, w, lf = inputs(120)
    kw = dict(window=6, sinks=1, linear_factor=lf, far_q=fq, far_k=fk)
    out = favor_attention(q, k, v, w, kernel="hedgehog", causal=False, **kw)
    torch.testing.assert_close(out, oracle(q, k, v, w, causal=False, **kw), rtol=1e-10, atol=1e-12)


def test_running_maximum_form_with_decay(monkeypatch):
    # A spread of key log-scales too wide for one stabilizer takes the running-maximum
    # scan (far_left); forced here by a tiny spread limit. Padding too.
    calls = []
    real = far_module.far_blocks

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is None)
        return out

    monkeypatch.setattr("linattn.ops.favor.window.hybrid.far_blocks", spy)
    monkeypatch.setattr("linattn.ops.favor.window.hybrid.spread_limit", lambda dtype: 1e-3)
    q, k, v, fq, fk, w, lf = inputs(130)
    mask = torch.zeros(B, 130, dtype=torch.bool)
    mask[1, :7] = True
    kw = dict(window=5, sinks=1, linear_factor=lf, decay=DECAY, far_q=fq, far_k=fk)
    out = favor_attention(q, k, v, w, kernel="hedgehog", causal=True, key_padding_mask=mask, **kw)
    ref = oracle(q, k, v, w, causal=True, key_padding_mask=mask, **kw)
    real_rows = ~mask[:, None, :, None]
    torch.testing.assert_close(out * real_rows, ref * real_rows, rtol=1e-10, atol=1e-12)
    assert calls == [True]


@pytest.mark.parametrize("pieces", [(1,), (3, 1, 7), (40, 1)])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("window,sinks", [(6, 0), (6, 2), (None, 1)])
def test_decoding_equals_the_parallel_form(pieces, far, window, sinks):
    q, k, v, fq, fk, w, lf = inputs(70, seed=3, far=far)
    kw = dict(kernel="hedgehog", window=window, sinks=sinks, linear_factor=lf, decay=DECAY)
    ref = favor_attention(q, k, v, w, causal=True, far_q=fq, far_k=fk, **kw)

    def part(x, sl):
        return None if x is None else x[:, :, sl]

    for prefill in (0, 23):
        state, outs, pos = None, [], 0
        if prefill:
            sl = slice(0, prefill)
            out, state = favor_attention(
                *(part(t, sl) for t in (q, k, v)),
                w,
                causal=True,
                far_q=part(fq, sl),
                far_k=part(fk, sl),
                output_final_state=True,
                **kw,
            )
            outs.append(out)
            pos = prefill
        i = 0
        while pos < q.shape[-2]:
            sl = slice(pos, min(q.shape[-2], pos + pieces[i % len(pieces)]))
            out, state = favor_recurrent(
                *(part(t, sl) for t in (q, k, v)),
                w,
                state=state,
                far_q=part(fq, sl),
                far_k=part(fk, sl),
                **kw,
            )
            outs.append(out)
            pos, i = sl.stop, i + 1
        torch.testing.assert_close(torch.cat(outs, -2), ref, rtol=1e-10, atol=1e-12)
        assert isinstance(state, FavorState)
        assert (state.far_keys is not None) == far
        if far:
            assert state.far_keys.shape == state.keys.shape


def test_decay_state_stays_bounded_over_a_long_decode():
    # The stabilizer falls by -ln gamma per token: no overflow or underflow of the sums.
    _, _, _, _, _, w, lf = inputs(1, far=False)
    state = None
    dec = torch.tensor(-0.5, dtype=torch.float64)
    for t in range(3000):
        x = randn(B, H, 1, D, seed=t)
        out, state = favor_recurrent(
            x, x, x, w, state=state, kernel="hedgehog", window=4, linear_factor=lf, decay=dec
        )
    assert torch.isfinite(out).all() and torch.isfinite(state.kv).all()
    assert torch.isfinite(state.stab).all()


def test_gradients_flow_to_the_far_inputs_and_match_the_oracle():
    q, k, v, fq, fk, w, lf = inputs(60)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, fq, fk, w)]
    kw = dict(window=5, sinks=1, linear_factor=lf, decay=DECAY, causal=True)

    def grads(fn):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*xs)
        (out * randn(*out.shape, seed=99)).sum().backward()
        return [t.grad for t in xs]

    g = grads(
        lambda q, k, v, fq, fk, w: favor_attention(
            q, k, v, w, kernel="hedgehog", far_q=fq, far_k=fk, **kw
        )
    )
    r = grads(lambda q, k, v, fq, fk, w: oracle(q, k, v, w, far_q=fq, far_k=fk, **kw))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert g[3].abs().sum() > 0 and g[4].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(decay=torch.tensor(0.1)), ValueError, "decay must be finite and <= 0"),
        (dict(decay=torch.tensor(float("nan"))), ValueError, "decay must be finite"),
        (dict(decay=torch.zeros(5)), ValueError, r"shape \(heads,\)"),
        (dict(decay=torch.tensor(-0.1), causal=False), ValueError, "causal=True"),
        (dict(decay=torch.tensor(-0.1), window=None, sinks=0), ValueError, "window or sinks"),
        (dict(far_q=torch.zeros(2, 3, 9, 8)), ValueError, "far_q must have q's shape"),
        (dict(far_k=torch.zeros(2, 3, 12, 8), window=None, sinks=0), ValueError, "window"),
        (dict(far_k=torch.zeros(2, 3, 12, 8, dtype=torch.float64)), ValueError, "dtype"),
        (dict(decay=-0.1), TypeError, "decay"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    q = torch.zeros(2, 3, 12, 8)
    kw = dict(kernel="hedgehog", causal=True, window=3, sinks=0)
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        favor_attention(q, q, q, torch.zeros(3, 8, 8), **kw)


def test_a_state_must_keep_its_far_keys():
    q, k, v, fq, fk, w, lf = inputs(20)
    kw = dict(kernel="hedgehog", window=4, linear_factor=lf)
    _, st = favor_attention(q, k, v, w, causal=True, output_final_state=True, **kw)
    with pytest.raises(ValueError, match="no far_keys"):
        favor_recurrent(
            q[:, :, :1],
            k[:, :, :1],
            v[:, :, :1],
            w,
            state=st,
            far_q=fq[:, :, :1],
            far_k=fk[:, :, :1],
            **kw,
        )
    _, st = favor_attention(
        q, k, v, w, causal=True, output_final_state=True, far_q=fq, far_k=fk, **kw
    )
    with pytest.raises(ValueError, match="carries far_keys"):
        favor_recurrent(q[:, :, :1], k[:, :, :1], v[:, :, :1], w, state=st, **kw)
    with pytest.raises(ValueError, match="go together"):
        favor_recurrent(
            q[:, :, :1], k[:, :, :1], v[:, :, :1], w, state=st, far_k=fk[:, :, :1], **kw
        )


def test_decay_is_a_fixed_setting_and_empty_pieces_check_it():
    q, k, v, _, _, w, lf = inputs(30, far=False)
    dec = DECAY.clone().requires_grad_()
    kw = dict(kernel="hedgehog", causal=True, window=4, linear_factor=lf)
    out = favor_attention(q, k, v, w, decay=dec, **kw)
    assert not out.requires_grad  # nothing else asked for a gradient: none to the decay
    _, st = favor_attention(q, k, v, w, decay=DECAY, output_final_state=True, **kw)
    empty = q[:, :, :0]
    for bad in (torch.tensor(5.0), torch.zeros(7)):
        with pytest.raises(ValueError, match="decay"):
            favor_recurrent(
                empty,
                empty,
                empty,
                w,
                state=st,
                kernel="hedgehog",
                window=4,
                linear_factor=lf,
                decay=bad,
            )
