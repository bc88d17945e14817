"""torch.func (vmap, grad) and torch.compile(fullgraph=True) over FAVOR+ attention and
the window/sinks hybrid (issue 26 item 10): the autograd Functions are setup_context
style, the band has a generated vmap rule, and no path that decides something from the
data (a host sync) runs while a graph is captured."""

import pytest
import torch

import linattn
from conftest import projection, randn

HYBRIDS = [
    {},
    {"causal": True},
    {"window": 3},
    {"window": 3, "causal": True},
    {"sinks": 2},
    {"window": 2, "sinks": 1, "causal": True},
]
IDS = ["bidir", "causal", "w3", "w3-causal", "s2", "w2-s1-causal"]


@pytest.mark.parametrize("kw", HYBRIDS, ids=IDS)
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_vmap_equals_the_batched_call(kw, kernel):
    q, k, v = (randn(3, 2, 19, 8, seed=s) for s in range(3))
    mask = torch.zeros(3, 19, dtype=torch.bool)
    mask[1, 15:] = True
    w = projection(8, 8)

    def one(q, k, v, mask):
        # One sequence: (H, L, d) -> the leading (H,) is the batch of this call.
        return linattn.favor_attention(q, k, v, w, kernel=kernel, key_padding_mask=mask, **kw)

    def call(q, k, v, mask):
        return one(q[:, None], k[:, None], v[:, None], mask[None].expand(q.shape[0], -1))[:, 0]

    out = torch.func.vmap(call)(q, k, v, mask)
    ref = linattn.favor_attention(q, k, v, w, kernel=kernel, key_padding_mask=mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", HYBRIDS, ids=IDS)
def test_func_grad_equals_autograd(kw):
    q, k, v = (randn(2, 2, 17, 8, seed=s) for s in range(3))
    w = projection(8, 8)
    probe = randn(2, 2, 17, 8, seed=9)

    def loss(q, k, w):
        out = linattn.favor_attention(q, k, v, w, kernel="hedgehog", **kw)
        return (out * probe).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, w)
    leaves = [t.clone().requires_grad_() for t in (q, k, w)]
    ref = torch.autograd.grad(loss(*leaves), leaves)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def _compiled_matches_eager(causal, backend, **kw):
    torch._dynamo.reset()
    q, k, v = (randn(2, 2, 24, 8, seed=s, dtype=torch.float32) for s in range(3))
    w = projection(8, 8, dtype=torch.float32)

    def f(q, k, v):
        return linattn.favor_attention(q, k, v, w, causal=causal, **kw)

    out = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kw", [{"window": 3, "sinks": 2}, {"sinks": 2}], ids=["w3-s2", "s2"])
def test_compile_fullgraph_with_window_and_sinks_captures_one_graph(causal, kw):
    # fullgraph=True: no graph break (the far part's spread test, a host sync, is not
    # taken while compiling). aot_eager: the captured graph without inductor's codegen.
    _compiled_matches_eager(causal, "aot_eager", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_compile_fullgraph_inductor_with_window_and_sinks_matches_eager(causal):
    _compiled_matches_eager(causal, "inductor", window=3, sinks=2)


@pytest.mark.parametrize("kw", [{"window": 2}, {"sinks": 1}], ids=["w2", "s1"])
def test_forward_mode_raises_a_clear_error(kw):
    # The window band and the far part have hand-written backwards only.
    import torch.autograd.forward_ad as fwad

    q = randn(1, 2, 12, 8)
    w = projection(8, 8)
    with fwad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative"):
        linattn.favor_attention(fwad.make_dual(q, torch.ones_like(q)), q, q, w, **kw)
