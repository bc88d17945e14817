"""Packed variable-length sequences (``cu_seqlens``, issue 27 step 2): N sequences back
to back in q, k, v of shape (1, H, T, d) give what each sequence gives alone, outputs and
gradients, in float64, including sequences of length 1 and 0. The modules' and models'
``cu_seqlens`` are tested in ``tests/nn/test_mha.py`` and ``tests/models/test_models.py``."""

import pytest
import torch

import linattn
from conftest import PACKED_LENGTHS, PACKED_TOL, cu_seqlens_of, projection, randn, spans_of

H, D, DV = 2, 4, 3


def _packed(lengths=PACKED_LENGTHS, seed=0):
    t = sum(lengths)
    q = randn(1, H, t, D, seed=seed, requires_grad=True)
    k = randn(1, H, t, D, seed=seed + 1, requires_grad=True)
    v = randn(1, H, t, DV, seed=seed + 2, requires_grad=True)
    return q, k, v


def _check(fn, lengths=PACKED_LENGTHS, seed=0):
    """fn(q, k, v, cu_seqlens=...) packed against fn on each sequence alone: outputs and
    gradients of q, k, v."""
    q, k, v = _packed(lengths, seed)
    g = randn(1, H, sum(lengths), DV, seed=seed + 3)
    out = fn(q, k, v, cu_seqlens=cu_seqlens_of(lengths))
    (out * g).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    parts = [fn(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in spans_of(lengths) if e > s]
    want = torch.cat(parts, dim=-2)
    (want * g).sum().backward()
    torch.testing.assert_close(out, want, **PACKED_TOL)
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, **PACKED_TOL)
    return out


FORMS = {
    "bidir": dict(),
    "causal": dict(causal=True),
    "window-bidir": dict(window=2),
    "window-causal": dict(causal=True, window=2),
    "sinks-causal": dict(causal=True, window=1, sinks=2),
    "sinks-bidir": dict(sinks=1),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_favor_attention_packed_equals_each_alone(form, kernel):
    w = projection(8, D) if kernel == "softmax" else randn(5, D, seed=4) * 0.5
    lf = None if kernel == "softmax" else torch.tensor([0.5, 3.0], dtype=torch.float64)
    kw = dict(FORMS[form], kernel=kernel)
    if lf is not None and (kw.get("window") is not None or kw.get("sinks")):
        kw["linear_factor"] = lf
    _check(lambda q, k, v, **c: linattn.favor_attention(q, k, v, w, **kw, **c))


def test_data_dependent_features_are_per_sequence():
    # FAVOR++'s A is computed from each sequence's own queries and keys.
    w = projection(8, D)
    _check(lambda q, k, v, **c: linattn.favor_attention(q, k, v, w, kernel="softmax_opt", **c))


def test_single_sequence_and_all_length_one():
    w = projection(8, D)
    for lengths in ([7], [1, 1, 1]):
        _check(
            lambda q, k, v, **c: linattn.favor_attention(q, k, v, w, causal=True, **c),
            lengths=lengths,
        )


def test_linformer_packed_equals_each_alone():
    e, f = randn(3, 10, seed=6), randn(3, 10, seed=7)
    _check(lambda q, k, v, **c: linattn.linformer_attention(q, k, v, e, f, **c))


@pytest.mark.parametrize("hybrid", [(None, 0), (2, 0), (2, 1)], ids=["linear", "w2", "w2-s1"])
def test_packed_states_are_per_sequence(hybrid):
    window, sinks = hybrid
    w = projection(8, D)
    kw = dict(window=window, sinks=sinks)
    q, k, v = _packed()
    out, state = linattn.favor_attention(
        q,
        k,
        v,
        w,
        causal=True,
        cu_seqlens=cu_seqlens_of(PACKED_LENGTHS),
        output_final_state=True,
        **kw,
    )
    assert state.kv.shape[0] == len(PACKED_LENGTHS)
    # Continue every sequence by a packed piece of other lengths, from the packed state.
    more = [2, 0, 0, 3, 1]
    q2, k2, v2 = _packed(more, seed=10)
    out2, state2 = linattn.favor_attention(
        q2,
        k2,
        v2,
        w,
        causal=True,
        cu_seqlens=cu_seqlens_of(more),
        initial_state=state,
        output_final_state=True,
        **kw,
    )
    only = linattn.favor_attention(
        q2, k2, v2, w, causal=True, cu_seqlens=cu_seqlens_of(more), initial_state=state, **kw
    )
    torch.testing.assert_close(only, out2, rtol=0, atol=0)
    # Each sequence alone, in one call over its two pieces.
    got1, got2 = dict(zip(range(5), spans_of(PACKED_LENGTHS))), dict(zip(range(5), spans_of(more)))
    for i in range(len(PACKED_LENGTHS)):
        (a, b), (c, d) = got1[i], got2[i]
        if b - a + d - c == 0:
            continue
        qi = torch.cat([q[:, :, a:b], q2[:, :, c:d]], -2)
        ki = torch.cat([k[:, :, a:b], k2[:, :, c:d]], -2)
        vi = torch.cat([v[:, :, a:b], v2[:, :, c:d]], -2)
        alone, st = linattn.favor_attention(
            qi, ki, vi, w, causal=True, output_final_state=True, **kw
        )
        torch.testing.assert_close(out[:, :, a:b], alone[:, :, : b - a], **PACKED_TOL)
        torch.testing.assert_close(out2[:, :, c:d], alone[:, :, b - a :], **PACKED_TOL)
        # The final states agree with the state of the sequence run alone.
        row = state2.kv[i : i + 1] * torch.exp(state2.stab[i : i + 1] - st.stab)[..., None, None]
        torch.testing.assert_close(row, st.kv, **PACKED_TOL)
    # The empty sequence (index 2, no tokens in either piece) keeps the empty state.
    assert state2.kv[2].abs().max() == 0


def test_favor_recurrent_packed():
    w = projection(8, D)
    q, k, v = _packed()
    _, state = linattn.favor_attention(
        q,
        k,
        v,
        w,
        causal=True,
        cu_seqlens=cu_seqlens_of(PACKED_LENGTHS),
        output_final_state=True,
        window=2,
    )
    step = [1, 1, 0, 1, 1]
    qs, ks, vs = _packed(step, seed=20)
    out, new = linattn.favor_recurrent(
        qs, ks, vs, w, state=state, window=2, cu_seqlens=cu_seqlens_of(step)
    )
    assert out.shape == (1, H, 4, DV) and new.kv.shape[0] == 5
    j = 0
    for i, (s, e) in enumerate(spans_of(PACKED_LENGTHS)):
        if not step[i]:
            continue
        row = linattn.favor_attention(
            torch.cat([q[:, :, s:e], qs[:, :, j : j + 1]], -2),
            torch.cat([k[:, :, s:e], ks[:, :, j : j + 1]], -2),
            torch.cat([v[:, :, s:e], vs[:, :, j : j + 1]], -2),
            w,
            causal=True,
            window=2,
        )
        torch.testing.assert_close(out[:, :, j], row[:, :, -1], **PACKED_TOL)
        j += 1


def test_all_sequences_empty():
    w = projection(8, D)
    q = randn(1, H, 0, D)
    cu = torch.zeros(3, dtype=torch.int32)
    assert linattn.favor_attention(q, q, q, w, cu_seqlens=cu).shape == (1, H, 0, D)
    out, st = linattn.favor_attention(
        q, q, q, w, causal=True, cu_seqlens=cu, output_final_state=True, window=2, sinks=1
    )
    # The ring holds min(window, tokens seen) slots: none after no token.
    assert out.shape == (1, H, 0, D) and st.keys.shape == (2, H, 0, D)


T = sum(PACKED_LENGTHS)


@pytest.mark.parametrize(
    "cu,kw,exc,match",
    [
        (
            cu_seqlens_of(PACKED_LENGTHS).long(),
            {},
            TypeError,
            r"cu_seqlens must have dtype torch.int32",
        ),
        ([0, 16], {}, TypeError, r"cu_seqlens must be an int32 tensor"),
        (
            cu_seqlens_of(PACKED_LENGTHS)[None],
            {},
            ValueError,
            r"cu_seqlens must have shape \(N \+ 1,\)",
        ),
        (torch.zeros(1, dtype=torch.int32), {}, ValueError, r"N >= 1 sequences, got \(1\)"),
        (
            torch.tensor([1, 5, 16], dtype=torch.int32),
            {},
            ValueError,
            r"cu_seqlens must start at 0, got 1",
        ),
        (
            torch.tensor([0, 9, 5, 16], dtype=torch.int32),
            {},
            ValueError,
            r"non-decreasing, got cu_seqlens\[2\] = 5 < cu_seqlens\[1\] = 9",
        ),
        (
            torch.tensor([0, 5, 15], dtype=torch.int32),
            {},
            ValueError,
            r"cu_seqlens must end at T = 16.*got 15",
        ),
        (
            cu_seqlens_of(PACKED_LENGTHS),
            {"key_padding_mask": torch.zeros(1, T, dtype=torch.bool)},
            ValueError,
            r"cu_seqlens and key_padding_mask cannot be combined",
        ),
    ],
    ids=["int64", "list", "2d", "no-sequence", "start", "decreasing", "end", "mask"],
)
def test_cu_seqlens_errors(cu, kw, exc, match):
    q = randn(1, H, T, D)
    w = projection(8, D)
    with pytest.raises(exc, match=match):
        linattn.favor_attention(q, q, q, w, cu_seqlens=cu, **kw)
    with pytest.raises(exc, match=match):
        linattn.linformer_attention(q, q, q, randn(3, 20), cu_seqlens=cu, **kw)


def test_cu_seqlens_shape_errors():
    w = projection(8, D)
    q = randn(2, H, T, D)
    with pytest.raises(ValueError, match=r"q must have shape \(1, H, T, d\).*got \(2, 2, 16, 4\)"):
        linattn.favor_attention(q, q, q, w, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS))
    q1 = randn(1, H, T, D)
    with pytest.raises(ValueError, match=r"same length T"):
        linattn.favor_attention(
            q1, q1[:, :, :9], q1[:, :, :9], w, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS)
        )
    with pytest.raises(ValueError, match=r"cu_seqlens needs compressed=False"):
        linattn.linformer_attention(
            q1, q1, q1, compressed=True, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS)
        )
    _, st = linattn.favor_attention(
        q1[:, :, :4], q1[:, :, :4], q1[:, :, :4], w, causal=True, output_final_state=True
    )
    with pytest.raises(
        ValueError, match=r"initial_state.kv must have shape \(B, H, M, dv \+ 1\) = \(5,"
    ):
        linattn.favor_attention(
            q1, q1, q1, w, causal=True, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS), initial_state=st
        )
