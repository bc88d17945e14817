"""The compiled one-token decoding step (``favor_recurrent(compile_step=True)``): the
same outputs and states as the eager step, token by token after a prefill, with every
hybrid option (sinks, per-head linear factor, decay, far inputs), in float64 and
float32; it is taken exactly in the steady state (a full ring and full sink slots, no
gradient to build) and compiles once for a decoding loop."""

import pytest
import torch

from linattn import favor_attention, favor_recurrent

B, H, D = 2, 3, 8


def randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def decode(kw, length, prefill, dtype, compile_step):
    q, k, v, fq, fk = (randn(B, H, length, D, seed=i, dtype=dtype) for i in range(5))
    w = randn(H, 8, D, seed=20, dtype=dtype) * 0.4
    lf = torch.tensor([0.7, 1.3, 2.0], dtype=dtype)
    opts = dict(kernel="hedgehog", linear_factor=lf, **kw)
    far = kw.pop("far", False)
    opts.pop("far", None)

    def part(t, a, b):
        return None if not far else t[..., a:b, :]

    out, state = favor_recurrent(
        q[..., :prefill, :], k[..., :prefill, :], v[..., :prefill, :], w,
        far_q=part(fq, 0, prefill), far_k=part(fk, 0, prefill), **opts,
    )  # fmt: skip
    outs = [out]
    for t in range(prefill, length):
        sl = slice(t, t + 1)
        out, state = favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, state=state,
            far_q=part(fq, t, t + 1), far_k=part(fk, t, t + 1), compile_step=compile_step,
            **opts,
        )  # fmt: skip
        outs.append(out)
    full = favor_attention(
        q, k, v, w, causal=True, far_q=None if not far else fq, far_k=None if not far else fk,
        **opts,
    )  # fmt: skip
    return torch.cat(outs, -2), state, full


DECAY = torch.tensor([-0.02, -0.2, -0.001], dtype=torch.float64)


@pytest.mark.parametrize(
    "kw",
    [
        dict(window=4, sinks=0),
        dict(window=4, sinks=2),
        dict(window=6, sinks=1, decay=DECAY, far=True),
        dict(window=None, sinks=1),
    ],
    ids=["window", "window+sinks", "decay+far", "sinks-only"],
)
def test_compiled_step_equals_the_eager_step(kw, compiled_steps):
    eager, s_eager, full = decode(dict(kw), 24, 10, torch.float64, False)
    assert not compiled_steps
    comp, s_comp, _ = decode(dict(kw), 24, 10, torch.float64, True)
    # Every step after the prefill (the ring is full by then) went through it.
    assert len(compiled_steps) == 14
    torch.testing.assert_close(comp, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(comp, full, rtol=1e-9, atol=1e-11)
    for a, b in zip(s_comp, s_eager):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_step_float32(compiled_steps):
    comp, _, _ = decode(dict(window=4, sinks=1, decay=DECAY, far=True), 20, 8, torch.float32, True)
    eager, _, _ = decode(
        dict(window=4, sinks=1, decay=DECAY, far=True), 20, 8, torch.float32, False
    )
    assert len(compiled_steps) == 12
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_compiled_step_waits_for_a_full_ring_and_skips_gradients(compiled_steps):
    # From an empty state the ring fills over the first `window` tokens: those steps are
    # eager (their shapes change), the rest compiled.
    q, k, v = (randn(1, H, 12, D, seed=i) for i in range(3))
    w = randn(H, 8, D, seed=20) * 0.4
    state = None
    for t in range(12):
        sl = slice(t, t + 1)
        _, state = favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w, state=state, kernel="hedgehog",
            window=5, sinks=1, compile_step=True,
        )  # fmt: skip
    # ring full after 5 tokens, the sink slot after 6: steps 7..12 compiled.
    assert len(compiled_steps) == 6
    qg = q[..., :1, :].clone().requires_grad_()
    out, _ = favor_recurrent(
        qg, k[..., :1, :], v[..., :1, :], w, state=state, kernel="hedgehog", window=5,
        sinks=1, compile_step=True,
    )  # fmt: skip
    assert len(compiled_steps) == 6  # a gradient to build: the eager step
    out.sum().backward()
    assert qg.grad is not None


def test_compile_step_must_be_a_bool():
    q = randn(1, H, 1, D, seed=0)
    with pytest.raises(TypeError, match="compile_step must be a bool"):
        favor_recurrent(q, q, q, None, window=2, compile_step=1)
