"""PerformerAttention with a learned map (hedgehog), the sliding window, per-head and
trainable projections: the module equals the functional op with its own parameters,
recurrent steps equal the causal forward, state_dict round trips."""

import pytest
import torch
import torch.nn.functional as F

import linattn
from conftest import naive as oracle
from conftest import randn
from linattn.nn.performer import hedgehog_init

E, H = 16, 4  # embed_dim, heads (head_dim 4)


def _module(**kw):
    torch.manual_seed(0)
    return linattn.PerformerAttention(E, H, dtype=torch.float64, batch_first=True, **kw)


def _heads(m, x, offset=0):
    b, n, _ = x.shape
    return [
        t.view(b, n, H, E // H).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x))
    ]


def _merge(m, out):
    b, _, n, _ = out.shape
    return m.out_proj(out.transpose(1, 2).reshape(b, n, E))


def _perturb(m):
    # Move the learned parameters away from their initial values.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


WINDOWS = [None, 0, 3]
CASES = [
    ("hedgehog", {}),
    ("softmax", {}),
    ("softmax", {"per_head_projection": True}),
    ("softmax_hyp", {"learn_projection": True}),
    ("relu", {}),
]
CASE_IDS = ["hedgehog", "softmax", "softmax-per-head", "softmax_hyp-learned", "relu"]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel,kw", CASES, ids=CASE_IDS)
def test_module_equals_functional_with_its_parameters(kernel, kw, causal, window):
    m = _module(kernel=kernel, causal=causal, window=window, **kw)
    _perturb(m)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    out, _ = m(x, key_padding_mask=mask)
    factor = None
    if kernel == "hedgehog" and window is not None:
        factor = torch.exp(m.log_linear_factor)
    ref = linattn.favor_attention(
        *_heads(m, x),
        m.projection,
        kernel=kernel,
        causal=causal,
        key_padding_mask=mask,
        window=window,
        linear_factor=factor,
    )
    torch.testing.assert_close(out, _merge(m, ref))


def test_hedgehog_parameters_and_initialization():
    m = _module(kernel="hedgehog", window=4)
    d = E // H
    assert isinstance(m.projection, torch.nn.Parameter) and m.projection.shape == (H, d, d)
    assert m.num_features == d  # default m = head_dim for a learned map
    torch.testing.assert_close(m.projection, torch.eye(d, dtype=torch.float64).expand(H, d, d))
    assert m.log_linear_factor.shape == (H,)
    # m / 2: the learned scores (~2/m per key) on the scale of exp(s) inside the window.
    torch.testing.assert_close(m.linear_factor(), torch.full((H,), d / 2, dtype=torch.float64))
    names = {n for n, _ in m.named_parameters()}
    assert {"projection", "log_linear_factor"} <= names
    # Pure linear: the factor would cancel in the normalizer, so there is none.
    assert _module(kernel="hedgehog").log_linear_factor is None
    # Random features: a buffer, no factor, also with a window.
    r = _module(kernel="softmax", window=4)
    assert "projection" in dict(r.named_buffers()) and r.log_linear_factor is None
    assert r.linear_factor() is None
    # m != d: rows of unit norm, one draw per head.
    w = hedgehog_init(3, 10, 4, generator=torch.Generator().manual_seed(0))
    assert w.shape == (3, 10, 4)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(3, 10, dtype=torch.float64))
    assert not torch.equal(w[0], w[1])
    assert _module(kernel="hedgehog", num_features=6).projection.shape == (H, 6, d)


def test_per_head_random_projection_and_redraw():
    m = linattn.PerformerAttention(
        E, H, batch_first=True, per_head_projection=True, num_features=8, redraw_interval=1, seed=3
    )
    assert m.projection.shape == (H, 8, E // H)
    assert not torch.equal(m.projection[0], m.projection[1])
    first = m.projection.clone()
    m(torch.randn(1, 5, E))
    assert int(m.draws) == 1 and not torch.equal(m.projection, first)
    again = linattn.PerformerAttention(
        E, H, batch_first=True, per_head_projection=True, num_features=8, redraw_interval=1, seed=3
    )
    again.redraw_projection()
    assert torch.equal(again.projection, m.projection)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_reach_projection_and_linear_factor(causal):
    m = _module(kernel="hedgehog", window=2, causal=causal)
    x = torch.randn(2, 13, E, dtype=torch.float64)
    out, _ = m(x)
    out.square().sum().backward()
    for p in (m.projection, m.log_linear_factor):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().min() > 0, p.grad  # every head's parameter gets a gradient


def test_gradcheck_through_the_module():
    m = _module(kernel="hedgehog", window=1, causal=True)
    _perturb(m)
    # The map's parameters (the input's gradient is the plain FAVOR+ path, tested there).
    x = torch.randn(1, 5, E, dtype=torch.float64)
    w, logit = (p.detach().clone().requires_grad_() for p in (m.projection, m.log_linear_factor))

    def f(x, w, logit):
        params = {"projection": w, "log_linear_factor": logit}
        return torch.func.functional_call(m, params, (x,))[0]

    assert torch.autograd.gradcheck(f, (x, w, logit))


@pytest.mark.parametrize("chunk", [1, 3], ids=["token", "chunk3"])
@pytest.mark.parametrize("window", [0, 1, 4, 20], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kernel", ["hedgehog", "softmax", "relu"])
def test_step_equals_causal_forward(kernel, window, chunk):
    m = _module(kernel=kernel, causal=True, window=window, rotary=True)
    _perturb(m)
    m.eval()
    x = torch.randn(2, 14, E, dtype=torch.float64)
    full, _ = m(x)
    outs, state = [], None
    for t in range(0, 14, chunk):
        y, state = m.step(x[:, t : t + chunk], state, t)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "kernel,kw",
    [
        ("hedgehog", {"window": 3}),
        ("softmax", {"per_head_projection": True}),
        ("softmax", {"learn_projection": True, "window": 2}),
    ],
    ids=["hedgehog-w3", "softmax-per-head", "softmax-learned-w2"],
)
def test_state_dict_round_trip(kernel, kw):
    m = _module(kernel=kernel, **kw)
    _perturb(m)
    torch.manual_seed(1)
    other = linattn.PerformerAttention(
        E, H, dtype=torch.float64, batch_first=True, kernel=kernel, seed=9, **kw
    )
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, E, dtype=torch.float64)
    assert torch.equal(m(x)[0], other(x)[0])
    assert set(m.state_dict()) == set(other.state_dict())


def _exact(m, x, mask, causal):
    q, k, v = _heads(m, x)
    bias = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1], dtype=x.dtype)
    if mask is not None:
        bias = bias.masked_fill(mask[:, None, None, :], float("-inf"))
    if causal:
        bias = bias.masked_fill(torch.ones(x.shape[1], x.shape[1]).triu(1).bool(), float("-inf"))
    return _merge(m, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "softmax_trig", "relu", "hedgehog"])
def test_window_covering_the_sequence_is_exact_attention(kernel, causal):
    m = _module(kernel=kernel, causal=causal, window=12)
    _perturb(m)
    x = torch.randn(2, 12, E, dtype=torch.float64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 9:] = True
    out, _ = m(x, key_padding_mask=mask)
    torch.testing.assert_close(out, _exact(m, x, mask, causal))


def test_window_exact_for_bidirectional_only_kernel():
    m = _module(kernel="softmax_opt", window=7)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], _exact(m, x, None, False))


def test_extra_repr_names_window_and_kernel():
    r = repr(_module(kernel="hedgehog", window=8))
    assert "kernel='hedgehog'" in r and "window=8" in r and "per_head_projection" in r


@pytest.mark.parametrize(
    "kw,err,match",
    [
        ({"kernel": "hedgehog", "redraw_interval": 10}, ValueError, "not redrawn"),
        ({"learn_projection": True, "redraw_interval": 10}, ValueError, "not redrawn"),
        ({"window": -1}, ValueError, "window must be >= 0"),
        ({"window": 2.0}, TypeError, "window must be an int"),
        ({"kernel": "softmax_opt", "causal": True}, ValueError, "bidirectional only"),
    ],
    ids=["hedgehog-redraw", "learned-redraw", "negative-window", "float-window", "opt-causal"],
)
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        linattn.PerformerAttention(E, H, **kw)


def test_learned_projection_is_not_redrawn():
    m = linattn.PerformerAttention(E, H, kernel="hedgehog")
    with pytest.raises(ValueError, match="cannot be redrawn"):
        m.redraw_projection()


def test_module_refuses_non_finite_linear_factor():
    m = linattn.PerformerAttention(8, 2, kernel="hedgehog", window=1, batch_first=True)
    m = m.double()
    x = randn(1, 4, 8)
    with torch.no_grad():
        m.log_linear_factor[0] = float("inf")
    with pytest.raises(ValueError, match=r"linear_factor must be finite"):
        m(x, x, x)
    with torch.no_grad():
        m.log_linear_factor[0] = float("nan")
    with pytest.raises(ValueError, match=r"linear_factor must be finite"):
        m.step(x, None, 0)


@pytest.mark.parametrize("window,sinks", [(None, 0), (3, 1)], ids=str)
def test_module_starts_tied_trains_both_sides_and_round_trips(window, sinks):
    torch.manual_seed(0)
    kw = dict(causal=True, window=window, sinks=sinks, batch_first=True, dtype=torch.float64)
    mod = linattn.PerformerAttention(32, 4, kernel="hedgehog_untied", **kw)
    tied = linattn.PerformerAttention(32, 4, kernel="hedgehog", **kw)
    tied.load_state_dict(
        {k: v for k, v in mod.state_dict().items() if k != "projection"}, strict=False
    )
    assert mod.projection.shape == (4, 8, 16) and isinstance(mod.projection, torch.nn.Parameter)
    torch.testing.assert_close(mod.projection[..., :8], mod.projection[..., 8:])
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    tied.projection.data.copy_(mod.projection.data[..., :8])
    torch.testing.assert_close(mod(x, x, x)[0], tied(x, x, x)[0])
    mod(x, x, x)[0].square().sum().backward()
    g = mod.projection.grad
    assert g[..., :8].abs().sum() > 0 and g[..., 8:].abs().sum() > 0
    with torch.no_grad():
        mod.projection[..., 8:].mul_(1.7)
    again = linattn.PerformerAttention(32, 4, kernel="hedgehog_untied", **kw)
    again.load_state_dict(mod.state_dict())
    torch.testing.assert_close(again(x, x, x)[0], mod(x, x, x)[0], rtol=0, atol=0)


# ----------------------------------------------------------------- module and model
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("window", [None, 3], ids=lambda w: f"w{w}")
def test_module_forward_step_and_state_dict(kernel, window):
    torch.manual_seed(0)
    kw = dict(
        kernel=kernel, causal=True, window=window, sinks=2, batch_first=True, dtype=torch.float64
    )
    attn = linattn.PerformerAttention(16, 2, **kw)
    assert attn.sinks == 2 and attn.options().sinks == 2
    assert "sinks=2" in repr(attn)
    if kernel == "hedgehog":
        # The linear part is weighed against exact scores: a factor, window or not.
        assert attn.log_linear_factor is not None
        with torch.no_grad():
            attn.log_linear_factor.add_(torch.tensor([0.5, -0.7], dtype=torch.float64))
    x = randn(2, 13, 16, seed=3)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, :4] = True
    out = attn(x, key_padding_mask=mask)[0]
    # The oracle on the module's own projections.
    q, k, v = (attn._heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ref = oracle(
        q,
        k,
        v,
        attn.projection.detach(),
        kernel=kernel,
        causal=True,
        mask=mask,
        window=window,
        sinks=2,
        linear_factor=attn.linear_factor(),
    )
    torch.testing.assert_close(out, attn._finish(ref), rtol=1e-10, atol=1e-10)
    # Recurrent steps equal the parallel form (no padding here: step takes none).
    state, outs = None, []
    for t in range(0, 13, 5):
        o, state = attn.step(x[:, t : t + 5], state, t)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), attn(x)[0], rtol=1e-10, atol=1e-10)
    # state_dict round trip: a fresh module with the same options reproduces the outputs.
    again = linattn.PerformerAttention(16, 2, **{**kw, **vars(attn.options())})
    again.load_state_dict(attn.state_dict())
    torch.testing.assert_close(again(x, key_padding_mask=mask)[0], out, rtol=0, atol=0)


def test_module_sinks_change_the_output():
    torch.manual_seed(0)
    a = linattn.PerformerAttention(16, 2, window=2, sinks=1, batch_first=True, dtype=torch.float64)
    b = linattn.PerformerAttention(16, 2, window=2, batch_first=True, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = randn(2, 20, 16)
    assert (a(x)[0] - b(x)[0]).abs().max() > 1e-4
