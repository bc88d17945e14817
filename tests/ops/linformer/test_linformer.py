"""Linformer: functional op and module against per-sequence oracles, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import linattn
from conftest import randn
from linattn.ops.linformer import linformer_naive, pool_matrix

KINDS = ["linear", "random", "mean", "max", "conv"]
SHARING = ["none", "headwise", "kv", "layerwise"]


def _mask(lengths, total):
    return torch.arange(total)[None] >= torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- functional


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-E", "per-head-E"])
@pytest.mark.parametrize("separate_v", [False, True], ids=["E=F", "E,F"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_functional_matches_oracle(per_head, separate_v, masked):
    q, k, v = randn(3, 2, 9, 4, seed=0), randn(3, 2, 21, 4, seed=1), randn(3, 2, 21, 5, seed=2)
    shape = (2, 6, 32) if per_head else (6, 32)
    e = randn(*shape, seed=3)
    f = randn(*shape, seed=4) if separate_v else None
    mask = _mask([21, 13, 1], 21) if masked else None
    out = linattn.linformer_attention(q, k, v, e, f, key_padding_mask=mask, scale=0.3)
    ref = linformer_naive(q, k, v, e, f, key_padding_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_functional_gradcheck():
    q, k, v = (randn(2, 2, 7, 3, seed=s, requires_grad=True) for s in range(3))
    e = randn(2, 4, 10, seed=5, requires_grad=True)
    mask = _mask([7, 4], 7)

    def fn(q, k, v, e):
        return linattn.linformer_attention(q, k, v, e, key_padding_mask=mask)

    assert gradcheck(fn, (q, k, v, e))


@pytest.mark.parametrize("side", ["right", "left"])
def test_functional_padding_invariance(side):
    q, k, v = randn(1, 2, 5, 4, seed=0), randn(1, 2, 11, 4, seed=1), randn(1, 2, 11, 4, seed=2)
    e = randn(6, 20, seed=3)
    ref = linattn.linformer_attention(q, k, v, e)
    junk = randn(1, 2, 6, 4, seed=9) * 100
    if side == "right":
        kp, vp = torch.cat([k, junk], -2), torch.cat([v, junk], -2)
        mask = _mask([11], 17)
    else:
        kp, vp = torch.cat([junk, k], -2), torch.cat([junk, v], -2)
        mask = ~_mask([6], 17)
    out = linattn.linformer_attention(q, kp, vp, e, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"e": randn(6, 8)}, ValueError, r"sequence length 10 exceeds the 8 columns of proj_k"),
        (
            {"e": randn(3, 6, 20)},
            ValueError,
            r"proj_k must have shape \(proj_dim, n\) or \(heads, proj_dim, n\) = \(2, proj_dim, n\)",
        ),
        ({"f": randn(5, 20)}, ValueError, r"same proj_dim"),
        ({"e": randn(6, 20).float()}, TypeError, r"proj_k has dtype torch.float32"),
        ({"mask": torch.zeros(1, 10)}, TypeError, r"key_padding_mask must have dtype"),
    ],
    ids=["too-long", "head-count", "kdim-mismatch", "dtype", "mask-dtype"],
)
def test_functional_errors(kw, exc, match):
    q = randn(1, 2, 10, 4)
    with pytest.raises(exc, match=match):
        linattn.linformer_attention(
            q, q, q, kw.get("e", randn(6, 20)), kw.get("f"), key_padding_mask=kw.get("mask")
        )


def test_functional_compressed_equals_projecting_inside():
    # compressed=True takes K' = E K, V' = F V as given: the same attention.
    q, k, v = randn(2, 2, 9, 4, seed=0), randn(2, 2, 13, 4, seed=1), randn(2, 2, 13, 5, seed=2)
    e, f = randn(6, 20, seed=3), randn(6, 20, seed=4)
    ref = linattn.linformer_attention(q, k, v, e, f, scale=0.7)
    out = linattn.linformer_attention(q, e[:, :13] @ k, f[:, :13] @ v, scale=0.7, compressed=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, r"proj_k is required"),
        ({"proj_k": randn(6, 20), "compressed": True}, r"proj_k must be None with compressed"),
        (
            {"key_padding_mask": torch.zeros(1, 10, dtype=torch.bool), "compressed": True},
            r"key_padding_mask must be None with compressed",
        ),
        ({"proj_k": randn(6, 20), "dropout_p": 1.0}, r"dropout_p must be a number in \[0, 1\)"),
    ],
    ids=["no-proj", "proj-and-compressed", "mask-and-compressed", "dropout"],
)
def test_functional_compressed_errors(kw, match):
    q = randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match=match):
        linattn.linformer_attention(q, q, q, **kw)


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
    m(randn(2, 10, 12, seed=1), key_padding_mask=_mask([10, 6], 10))
    assert len(calls) == 1
    assert calls[0] == (
        kind not in ("linear", "random")
        or (compress_first and kind in ("linear", "random", "mean"))
    )


# ---------------------------------------------------------------- modules


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
    mask = _mask([17, 9, 2], 17)
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
    mask = _mask([20, 7], 20)
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
    mask = _mask([10], 15) if side == "right" else ~_mask([5], 15)
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
