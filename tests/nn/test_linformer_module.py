"""LinformerAttention (``nn/linformer.py``): the module against per-sequence oracles in
float64, projection kinds and sharing, padding invariance, state_dict, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import linattn
from conftest import length_mask, randn
from linattn.ops.linformer import pool_matrix

KINDS = ["linear", "random", "mean", "max", "conv"]


SHARING = ["none", "headwise", "kv", "layerwise"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compress_first", [False, True], ids=["project-first", "compress-first"])
def test_module_calls_the_functional_path(kind, compress_first, monkeypatch):
    # One path: the module's attention is linattn.linformer_attention, whatever the kind.
    import linattn.nn.linformer as mod

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("compressed", False))
        return linattn.functional.linformer_attention(*args, **kwargs)

    monkeypatch.setattr(mod, "linformer_attention", spy)
    m = _module(kind, "headwise", compress_first=compress_first)
    m(randn(2, 10, 12, seed=1), key_padding_mask=length_mask([10, 6], 10))
    assert len(calls) == 1
    assert calls[0] == (
        kind not in ("linear", "random")
        or (compress_first and kind in ("linear", "random", "mean"))
    )


def _module(kind, sharing, *, n=24, kdim=5, embed=12, heads=3, **kw):
    shared = None
    if sharing == "layerwise":
        shared = linattn.LinformerProjection(
            n,
            kdim,
            heads,
            embed // heads,
            proj_kind=kind,
            sharing="layerwise",
            seed=3,
            dtype=torch.float64,
        )
    m = linattn.LinformerAttention(
        embed,
        heads,
        max_seq_len=n,
        proj_dim=kdim,
        sharing=sharing,
        proj_kind=kind,
        shared_projection=shared,
        seed=3,
        dtype=torch.float64,
        **{"batch_first": True, **kw},
    )
    # Non-trivial conv weights (they start as a mean).
    if kind == "conv":
        with torch.no_grad():
            for p in m.proj.parameters():
                p.copy_(torch.randn_like(p))
    return m


def _compress_oracle(proj, x, head):
    """One sequence's real tokens x: (len, d) of head `head`, compressed by definition."""
    length, kdim = x.shape[0], proj.proj_dim

    def mat(t):
        return t[head] if t.dim() == 3 else t

    if proj.proj_kind in ("linear", "random"):
        return mat(proj.e)[:, :length] @ x, mat(proj.value_projection)[:, :length] @ x
    if proj.proj_kind == "mean":
        pm = pool_matrix(length, kdim, length, dtype=x.dtype)
        return pm @ x, pm @ x
    if proj.proj_kind == "max":
        pooled = F.adaptive_max_pool1d(x.T[None], kdim)[0].T
        return pooled, pooled
    d = x.shape[1]
    outs = []
    for w in (proj.e, proj.value_projection):
        w = w[head * d : (head + 1) * d] if proj.sharing == "none" else w
        xp = F.pad(x.T[None], (0, kdim * proj.stride - length))
        outs.append(F.conv1d(xp, w, stride=proj.stride, groups=d)[0].T)
    return outs


def _module_oracle(m, query, key, value, mask):
    outs = []
    for b in range(query.shape[0]):
        real = slice(None) if mask is None else ~mask[b]
        qb = m.q_proj(query[b]).view(-1, m.num_heads, m.head_dim).transpose(0, 1)
        kb = m.k_proj(key[b][real]).view(-1, m.num_heads, m.head_dim).transpose(0, 1)
        vb = m.v_proj(value[b][real]).view(-1, m.num_heads, m.head_dim).transpose(0, 1)
        heads = []
        for h in range(m.num_heads):
            kc, _ = _compress_oracle(m.proj, kb[h], h)
            _, vc = _compress_oracle(m.proj, vb[h], h)
            att = torch.softmax(qb[h] @ kc.T / math.sqrt(m.head_dim), -1)
            heads.append(att @ vc)
        outs.append(m.out_proj(torch.stack(heads, 1).reshape(-1, m.embed_dim)))
    return torch.stack(outs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sharing", SHARING)
def test_module_matches_oracle(kind, sharing):
    m = _module(kind, sharing)
    x = randn(3, 17, 12, seed=1, requires_grad=True)
    mask = length_mask([17, 9, 2], 17)
    out, weights = m(x, key_padding_mask=mask)
    assert weights is None and out.shape == (3, 17, 12)
    ref = _module_oracle(m, x, x, x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = randn(*out.shape, seed=5)
    params = [x, *m.parameters(), *m.proj.parameters()]
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "random", "mean"])
@pytest.mark.parametrize("sharing", ["headwise", "kv"])
def test_compress_first_is_exact(kind, sharing):
    fast = _module(kind, sharing)
    slow = _module(kind, sharing, compress_first=False)
    slow.load_state_dict(fast.state_dict())
    assert fast.proj.head_shared_linear
    x = randn(2, 20, 12, seed=2)
    mask = length_mask([20, 7], 20)
    torch.testing.assert_close(
        fast(x, key_padding_mask=mask)[0], slow(x, key_padding_mask=mask)[0], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_module_padding_invariance(kind, side):
    m = _module(kind, "headwise")
    x = randn(1, 10, 12, seed=3)
    ref = m(x)[0]
    junk = randn(1, 5, 12, seed=8) * 50
    xp = torch.cat([x, junk], 1) if side == "right" else torch.cat([junk, x], 1)
    mask = length_mask([10], 15) if side == "right" else ~length_mask([5], 15)
    out = m(xp, key_padding_mask=mask)[0]
    real = slice(0, 10) if side == "right" else slice(5, 15)
    torch.testing.assert_close(out[:, real], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_and_conv_have_exactly_kdim_positions(kind):
    proj = linattn.LinformerProjection(23, 7, 2, 3, proj_kind=kind, dtype=torch.float64)
    for length in (1, 5, 7, 13, 23):
        k = randn(2, 2, length, 3)
        kc, vc = proj(k, k, None)
        assert kc.shape == (2, 2, 7, 3) and vc.shape == (2, 2, 7, 3)


def test_cross_attention_and_batch_first_false():
    m = linattn.LinformerAttention(
        8, 2, max_seq_len=30, proj_dim=4, kdim=6, vdim=5, batch_first=True, dtype=torch.float64
    )
    q, k, v = randn(2, 7, 8), randn(2, 30, 6, seed=1), randn(2, 30, 5, seed=2)
    out = m(q, k, v)[0]
    assert out.shape == (2, 7, 8)
    m2 = linattn.LinformerAttention(
        8, 2, max_seq_len=30, proj_dim=4, kdim=6, vdim=5, batch_first=False, dtype=torch.float64
    )
    m2.load_state_dict(m.state_dict())
    out2 = m2(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))[0]
    torch.testing.assert_close(out2.transpose(0, 1), out)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_to(kind):
    m = _module(kind, "none")
    other = _module(kind, "none")
    with torch.no_grad():  # differ from m everywhere, fixed projections included
        for t in list(other.parameters()) + list(other.buffers()):
            t.add_(1.0)
    other.load_state_dict(m.state_dict())
    x = randn(2, 11, 12)
    assert torch.equal(m(x)[0], other(x)[0])
    if kind == "random":
        assert "projection.e" in m.state_dict() and not any(
            n.startswith("projection.e") for n, _ in m.named_parameters()
        )
    m32 = m.to(torch.float32)
    for t in list(m32.parameters()) + list(m32.buffers()):
        assert t.dtype == torch.float32
    assert m32(x.float())[0].dtype == torch.float32


def _count_matrices(modules, kdim, n):
    seen, total = set(), 0
    for mod in modules:
        proj = mod.proj
        for t in list(proj.parameters()) + list(proj.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() // (kdim * n)
    return total


@pytest.mark.parametrize(
    "sharing,expected", [("none", 288), ("headwise", 24), ("kv", 12), ("layerwise", 1)]
)
def test_paper_matrix_counts(sharing, expected):
    n, kdim, heads, embed = 64, 8, 12, 48
    shared = (
        linattn.LinformerProjection(n, kdim, heads, embed // heads, sharing="layerwise")
        if sharing == "layerwise"
        else None
    )
    layers = [
        linattn.LinformerAttention(
            embed, heads, max_seq_len=n, proj_dim=kdim, sharing=sharing, shared_projection=shared
        )
        for _ in range(12)
    ]
    assert _count_matrices(layers, kdim, n) == expected


def test_nonuniform_proj_dim_per_layer():
    dims = [16, 12, 8, 4]
    layers = [
        linattn.LinformerAttention(
            8, 2, max_seq_len=32, proj_dim=k, sharing="headwise", batch_first=True
        )
        for k in dims
    ]
    assert [lyr.proj.e.shape[0] for lyr in layers] == dims
    x = torch.randn(2, 32, 8)
    for lyr in layers:
        x = x + lyr(x)[0]
    assert torch.isfinite(x).all()


def test_module_errors():
    with pytest.raises(ValueError, match="cannot be causal"):
        linattn.LinformerAttention(8, 2, max_seq_len=16, causal=True)
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads"):
        linattn.LinformerAttention(10, 4, max_seq_len=16)
    with pytest.raises(ValueError, match="sharing must be one of"):
        linattn.LinformerAttention(8, 2, max_seq_len=16, sharing="all")
    with pytest.raises(ValueError, match="kind must be one of"):
        linattn.LinformerAttention(8, 2, max_seq_len=16, proj_kind="fft")
    with pytest.raises(ValueError, match="needs shared_projection"):
        linattn.LinformerAttention(8, 2, max_seq_len=16, sharing="layerwise")
    m = linattn.LinformerAttention(8, 2, max_seq_len=16, proj_dim=4, batch_first=True)
    x = torch.randn(1, 17, 8)
    with pytest.raises(ValueError, match="key length 17 exceeds max_seq_len=16"):
        m(x)
    with pytest.raises(ValueError, match="need_weights=True is not available"):
        m(x[:, :4], need_weights=True)
    with pytest.raises(ValueError, match="no attn_mask and no causal"):
        m(x[:, :4], is_causal=True)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, 8\)"):
        m(torch.randn(1, 4, 6))


@pytest.mark.parametrize("length", [1, 5, 7, 13, 23, 64])
@pytest.mark.parametrize("kdim", [1, 4, 7, 16])
def test_pool_matrix_is_adaptive_average_pooling(length, kdim):
    # Independent of pool_matrix: torch's adaptive pooling defines the windows.
    x = randn(length, 3)
    ref = F.adaptive_avg_pool1d(x.T[None], kdim)[0].T
    m = pool_matrix(length, kdim, 80, dtype=torch.float64)
    assert m.shape == (kdim, 80) and not m[:, length:].any()
    torch.testing.assert_close(m[:, :length] @ x, ref)


def test_linformer_options_are_every_default():
    # One place for Linformer's defaults: the modules' signatures, ModelConfig and
    # TrainConfig read LinformerOptions.
    import dataclasses
    import inspect

    from linattn import LinformerOptions
    from linattn.models import ModelConfig
    from linattn.train import TrainConfig

    opts = LinformerOptions()
    for cls in (linattn.LinformerAttention, linattn.LinformerProjection):
        sig = inspect.signature(cls).parameters
        for f in dataclasses.fields(LinformerOptions):
            if f.name in sig and sig[f.name].default is not inspect.Parameter.empty:
                assert sig[f.name].default == getattr(opts, f.name), (cls.__name__, f.name)
    assert linattn.LinformerAttention(8, 2, max_seq_len=16).options() == opts
    assert (
        ModelConfig(vocab_size=4, attention="linformer", position="learned").linformer_options()
        == opts
    )
    assert TrainConfig().proj_dim == opts.proj_dim
    # A module built from options reports them back.
    custom = LinformerOptions(proj_dim=3, sharing="kv", proj_kind="max")
    assert linattn.LinformerAttention(8, 2, max_seq_len=16, **vars(custom)).options() == custom


def test_a_projection_that_does_not_compress_warns():
    import warnings

    with pytest.warns(UserWarning, match="proj_dim=256 >= max_seq_len=64"):
        linattn.LinformerAttention(16, 2, max_seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linattn.LinformerAttention(16, 2, max_seq_len=64, proj_dim=16)
