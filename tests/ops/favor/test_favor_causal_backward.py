"""The hand-written backward of the causal FAVOR scan (``ops/favor/causal.py``).

The forward runs fused and in place without autograd and the backward is written out by
hand (chunk states recomputed per segment, a reverse recurrence for the state
gradient): gradcheck in float64, and gradients against the float64 oracle that
materializes phi(Q) phi(K)^T.
"""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive, projection, randn
from linattn.features import get_feature_map
from linattn.ops.favor import causal as causal_scan
from linattn.ops.favor import favor_causal

KERNELS = ["softmax", "softmax_hyp", "softmax_trig", "relu", "elu"]


def _mask(b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] >= lengths[:, None]
    mask[0] = torch.flip(mask[0], [0])  # one left-padded row
    return mask


# softmax_trig's signed denominators make finite differences ill-conditioned at this
# length; its r-gradient path is checked against the oracle below (and by
# test_favor_ops.test_gradcheck at L = 11).
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "relu"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_gradcheck_with_states_across_segments(kernel, per_head, monkeypatch):
    # chunk 2 with 2 chunks per segment (16 in production: the same loop, and 69 tokens
    # then made this gradcheck take 10-20 s; the oracle test below crosses the real
    # segments at L = 1000) -> segments of 4 tokens: three segments, the last one
    # partial; gradients reach the incoming state and come from the outgoing one.
    monkeypatch.setattr(causal_scan, "_CHUNKS_PER_SEGMENT", 2)
    chunk = 2
    length = 2 * chunk * causal_scan._CHUNKS_PER_SEGMENT + 3
    q, k, v = (randn(1, 2, length, 3, seed=s, requires_grad=True) for s in range(3))
    w = (
        projection(2, 3, seed=4).expand(2, 2, 3).clone() if per_head else projection(4, 3)
    ).requires_grad_()
    fm = get_feature_map(kernel)
    m = fm.feature_dim(w, 3)
    s0 = (randn(1, 2, m, 4, seed=5).abs() + 0.1).requires_grad_()
    c0 = randn(1, 2, seed=6)
    mask = _mask(1, length, seed=3)

    def fn(q, k, v, w, s0):
        params = fm.prepare(w, q, k, mask, 0.7)
        out, state, stab = favor_causal(
            q, k, v, fm, params, key_padding_mask=mask, chunk_size=chunk, initial=(s0, c0)
        )
        # The state is S with a detached log-scale c (a stabilizer, no gradient): the
        # quantity it stands for, S exp(c), is what must be differentiable.
        return out, state * stab.exp()[..., None, None]

    assert gradcheck(fn, (q, k, v, w, s0), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk", [1, 64, 100], ids=lambda c: f"chunk{c}")
def test_float64_gradients_match_oracle(kernel, chunk):
    q, k, v = (randn(2, 2, 1000, 8, seed=s, requires_grad=True) for s in range(3))
    w = projection(16, 8).requires_grad_()
    mask = _mask(2, 1000, seed=1)
    g = randn(2, 2, 1000, 8, seed=7)
    out = linattn.favor_attention(
        q, k, v, w, kernel=kernel, causal=True, key_padding_mask=mask, chunk_size=chunk
    )
    ref = naive(q, k, v, w, kernel=kernel, causal=True, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(out, (q, k, v, w), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, w), g)
    for name, a, b in zip("qkvw", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=f"d{name}")


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "relu"])
def test_float32_gradients_match_float64_oracle(kernel):
    q, k, v = (randn(1, 2, 1000, 16, seed=s) for s in range(3))
    q, k = q * 0.5, k * 0.5
    w = projection(32, 16)
    mask = _mask(1, 1000, seed=2)
    g = randn(1, 2, 1000, 16, seed=8)
    ins = [t.float().requires_grad_() for t in (q, k, v)] + [w.float().requires_grad_()]
    out = linattn.favor_attention(
        *ins[:3], ins[3], kernel=kernel, causal=True, key_padding_mask=mask
    )
    grads = torch.autograd.grad(out, ins, g.float())
    ref_ins = [t.requires_grad_() for t in (q, k, v, w)]
    ref = naive(*ref_ins, kernel=kernel, causal=True, mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_ins, g)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip("qkvw", grads, ref_grads):
        scale = b.abs().max()
        torch.testing.assert_close(
            a.double() / scale, b / scale, rtol=1e-4, atol=1e-5, msg=f"d{name}"
        )


def test_only_some_inputs_need_gradients():
    # needs_input_grad combinations: v alone, and q alone with the weight.
    q, k, v = (randn(1, 2, 70, 4, seed=s) for s in range(3))
    w = projection(8, 4)
    g = randn(1, 2, 70, 4, seed=9)
    for wanted in ((2,), (0, 3), (1,)):
        ins = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((q, k, v, w))]
        out = linattn.favor_attention(*ins[:3], ins[3], causal=True, chunk_size=8)
        grads = torch.autograd.grad(out, [ins[i] for i in wanted], g)
        ref_ins = [t.clone().requires_grad_(i in wanted) for i, t in enumerate((q, k, v, w))]
        ref = naive(*ref_ins[:3], ref_ins[3], causal=True)
        ref_grads = torch.autograd.grad(ref, [ref_ins[i] for i in wanted], g)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
