"""Attention-sink keys in the window hybrid (``sinks=s``): the first ``s`` unpadded keys
of each sequence are scored exactly by every query that sees them. Every path against
the float64 oracle (itself checked against a per-pair definition), gradients, padding
invariance, causal leak-freeness, recurrent decoding. The module's sinks are tested in
``tests/nn/test_performer_learned.py``, the model config's in ``tests/models/``, the flags
in ``tests/cli/test_cli.py``, the Hugging Face conversions in
``tests/integrations/hf/test_hf_transfer.py``."""

import json
import math

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive as oracle
from conftest import per_head, projection, randn
from linattn.models import ModelConfig

FACTOR = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)
WINDOWS = [None, 0, 2, 200]
SINKS = [1, 3, 200]


def mixed_mask(b, length, seed=0):
    """Row 0 unpadded, then left-padded, right-padded and holed rows (cycled)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for row in range(1, b):
        n = int(torch.randint(0, max(1, length // 2) + 1, (1,), generator=g))
        kind = row % 3
        if kind == 1:
            mask[row, :n] = True
        elif kind == 2:
            mask[row, length - n :] = True
        else:
            start = int(torch.randint(0, length, (1,), generator=g))
            mask[row, start : start + n] = True
    return mask


def garbage(x, mask, seed=0):
    """``x`` with NaN, inf and 1e30 in the padded slots (they must never reach a sum)."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e30
    junk[..., 0] = float("nan")
    junk[..., 1] = float("inf")
    return torch.where(mask[:, None, :, None], junk, x)


# ----------------------------------------------------------------- the oracle itself
def by_pairs(q, k, v, phi, *, causal, mask, window, factor, sinks, scale):
    """The semantics written pair by pair in Python: key j is exact for query i iff it
    is visible and (in i's window or among the first `sinks` real keys)."""
    bsz, heads, length, _ = q.shape
    out = torch.zeros(bsz, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        real = [j for j in range(length) if mask is None or not bool(mask[b, j])]
        sink = set(real[:sinks])
        for h in range(heads):
            for i in range(length):
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                for j in real:
                    if causal and j > i:
                        continue
                    near = window is not None and (
                        (i - window < j <= i) if causal else abs(i - j) <= window
                    )
                    if near or j in sink:
                        a = math.exp(scale * float(q[b, h, i] @ k[b, h, j]))
                    else:
                        f = 1.0 if factor is None else float(factor[h])
                        a = f * float(phi(q[b, h, i], h) @ phi(k[b, h, j], h))
                    num, den = num + a * v[b, h, j], den + a
                if den > 0:
                    out[b, h, i] = num / den
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [None, 0, 2], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", [1, 2, 20], ids=lambda s: f"s{s}")
def test_oracle_is_the_pairwise_definition(causal, window, sinks):
    q, k, v = (randn(3, 2, 9, 4, seed=s) for s in range(3))
    w = projection(6, 4)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, :3] = True  # left padding: the sinks are positions 3, 4, ...
    mask[2, 1:4] = True  # a hole after the first key
    k, v = k.masked_fill(mask[:, None, :, None], 0.0), v.masked_fill(mask[:, None, :, None], 0.0)
    scale = 0.5
    factor = torch.tensor([0.4, 2.5], dtype=torch.float64)

    def phi(x, h):
        xs = x * math.sqrt(scale)
        return torch.exp(w @ xs - xs.square().sum() / 2) / math.sqrt(w.shape[0])

    got = oracle(
        q,
        k,
        v,
        w,
        causal=causal,
        mask=mask,
        window=window,
        linear_factor=factor,
        sinks=sinks,
        scale=scale,
    )
    want = by_pairs(
        q,
        k,
        v,
        phi,
        causal=causal,
        mask=mask,
        window=window,
        factor=factor,
        sinks=sinks,
        scale=scale,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The sinks matter: without them the result is different.
    plain = oracle(
        q, k, v, w, causal=causal, mask=mask, window=window, linear_factor=factor, scale=scale
    )
    assert (plain - got).abs().max() > 1e-3


# ----------------------------------------------------------------- fast paths
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length", [1, 9, 150], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", SINKS, ids=lambda s: f"s{s}")
def test_sinks_match_oracle_with_padding_garbage(kernel, causal, length, window, sinks):
    q, k, v = (randn(4, 3, length, 8, seed=s) for s in range(3))
    w = per_head(3, 12, 8)
    mask = mixed_mask(4, length, seed=length)
    kw = dict(kernel=kernel, causal=causal, window=window, linear_factor=FACTOR, sinks=sinks)
    out = linattn.favor_attention(
        q,
        garbage(k, mask),
        garbage(v, mask, seed=1),
        w,
        key_padding_mask=mask,
        chunk_size=16,
        block_size=7,
        **kw,
    )
    ref = oracle(q, k, v, w, mask=mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", ["softmax_hyp", "elu", "relu", "softmax_trig"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [None, 3], ids=lambda w: f"w{w}")
def test_other_kernels_match_oracle(kernel, causal, window):
    q, k, v = (randn(3, 3, 70, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = mixed_mask(3, 70, seed=4)
    kw = dict(kernel=kernel, causal=causal, window=window, sinks=2)
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask, chunk_size=16, **kw)
    ref = oracle(q, k, v, w, mask=mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.fixture(params=["one-stabilizer", "running-max"])
def stabilizer(request, monkeypatch):
    # The bidirectional far part has two stabilizer paths (README): exercise both.
    if request.param == "running-max":
        monkeypatch.setattr("linattn.ops.favor.window.far.SPREAD_FLOAT64", -1.0)
        monkeypatch.setattr("linattn.ops.favor.window.far.SPREAD_FLOAT32", -1.0)
    return request.param


@pytest.mark.parametrize("window", [None, 0, 5, 70], ids=lambda w: f"w{w}")
def test_bidirectional_stabilizer_paths(window, stabilizer):
    q, k, v = (randn(3, 3, 200, 8, seed=s) for s in range(3))
    w = per_head(3, 12, 8)
    mask = mixed_mask(3, 200, seed=7)
    kw = dict(window=window, linear_factor=FACTOR, sinks=3)
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask, **kw)
    ref = oracle(q, k, v, w, mask=mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_sinks_zero_is_the_plain_hybrid():
    q, k, v = (randn(2, 3, 50, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = mixed_mask(2, 50)
    for causal in (False, True):
        for window in (None, 4):
            kw = dict(causal=causal, window=window, key_padding_mask=mask)
            assert torch.equal(
                linattn.favor_attention(q, k, v, w, sinks=0, **kw),
                linattn.favor_attention(q, k, v, w, **kw),
            )
            assert not torch.equal(
                linattn.favor_attention(q, k, v, w, sinks=1, **kw),
                linattn.favor_attention(q, k, v, w, **kw),
            )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_window_none_sinks_are_the_only_exact_keys(causal):
    # With a zero linear factor, only the sinks count: exact softmax over the sinks.
    q, k, v = (randn(2, 2, 30, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, :5] = True
    out = linattn.favor_attention(
        q,
        k,
        v,
        w,
        causal=causal,
        sinks=2,
        key_padding_mask=mask,
        linear_factor=torch.zeros((), dtype=torch.float64),
    )
    for b, first in ((0, 0), (1, 5)):
        ks, vs = k[b, :, first : first + 2], v[b, :, first : first + 2]
        want = torch.softmax(q[b] @ ks.transpose(-2, -1) / math.sqrt(8), -1) @ vs
        rows = slice(first + 1, None) if causal else slice(None)
        torch.testing.assert_close(out[b, :, rows], want[:, rows], rtol=1e-10, atol=1e-10)
    if causal:  # query `first` sees one sink only
        torch.testing.assert_close(out[1, :, 5], v[1, :, 5], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [None, 2], ids=lambda w: f"w{w}")
def test_gradcheck(kernel, causal, window):
    q, k, v = (randn(2, 2, 11, 4, seed=s, requires_grad=True) for s in range(3))
    w = per_head(2, 5, 4).requires_grad_()
    lf = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, :3] = True

    def fn(q, k, v, w, lf):
        return linattn.favor_attention(
            q,
            k,
            v,
            w,
            kernel=kernel,
            causal=causal,
            window=window,
            sinks=2,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=3,
            block_size=4,
        )

    assert gradcheck(fn, (q, k, v, w, lf), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("window", [None, 9], ids=lambda w: f"w{w}")
def test_gradients_match_oracle(causal, window):
    q, k, v = (randn(3, 3, 70, 8, seed=s, requires_grad=True) for s in range(3))
    w = per_head(3, 8, 8).requires_grad_()
    lf = FACTOR.clone().requires_grad_()
    mask = mixed_mask(3, 70, seed=5)
    args = dict(causal=causal, window=window, linear_factor=lf, sinks=3)
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask, chunk_size=16, **args)
    ref = oracle(q, k, v, w, mask=mask, **args)
    g = randn(*out.shape, seed=9).masked_fill(mask[:, None, :, None], 0.0)
    grads = torch.autograd.grad(out, (q, k, v, w, lf), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, w, lf), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------- invariances
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("window", [None, 3], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_padding_invariance(causal, side, window, kernel):
    b, length, pad = 2, 40, 13
    q, k, v = (randn(b, 2, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    lf = torch.tensor([0.3, 2.0], dtype=torch.float64)
    kw = dict(kernel=kernel, causal=causal, window=window, linear_factor=lf, sinks=2, chunk_size=8)
    ref = linattn.favor_attention(q, k, v, w, **kw)
    junk = [randn(b, 2, pad, 8, seed=10 + s) * 1e30 for s in range(3)]
    junk[1][..., 0, :] = float("nan")
    junk[2][..., 1, :] = float("inf")
    if side == "right":
        qp, kp, vp = (torch.cat([t, j], dim=-2) for t, j in zip((q, k, v), junk))
        mask = torch.arange(length + pad)[None].expand(b, -1) >= length
        sl = slice(0, length)
    else:
        qp, kp, vp = (torch.cat([j, t], dim=-2) for t, j in zip((q, k, v), junk))
        mask = torch.arange(length + pad)[None].expand(b, -1) < pad
        sl = slice(pad, pad + length)
    out = linattn.favor_attention(qp, kp, vp, w, key_padding_mask=mask, **kw)
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("window", [None, 1, 16], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_adversarial_future_keys_do_not_leak(dtype, window, kernel):
    q, k, v = (randn(2, 2, 256, 16, seed=s, dtype=dtype) for s in range(3))
    w = projection(32, 16, dtype=dtype)
    # Row 1: 70 padded keys first, so its sinks (positions 70..74) come late.
    mask = torch.zeros(2, 256, dtype=torch.bool)
    mask[1, :70] = True
    kw = dict(
        kernel=kernel, causal=True, window=window, sinks=5, chunk_size=64, key_padding_mask=mask
    )
    base = linattn.favor_attention(q, k, v, w, **kw)
    for p in (2, 10, 63, 72, 100):
        k2, v2 = k.clone(), v.clone()
        k2[..., p + 1 :, :] *= 60.0
        v2[..., p + 1 :, :] = 1e6
        out = linattn.favor_attention(q, k2, v2, w, **kw)
        assert torch.isfinite(out[..., : p + 1, :]).all()
        torch.testing.assert_close(
            out[..., : p + 1, :], base[..., : p + 1, :], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("window", [None, 4], ids=lambda w: f"w{w}")
def test_causal_prefix_consistency(window):
    q, k, v = (randn(3, 2, 90, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = mixed_mask(3, 90, seed=2)
    kw = dict(causal=True, window=window, sinks=3, chunk_size=16)
    full = linattn.favor_attention(q, k, v, w, key_padding_mask=mask, **kw)
    for n in (1, 5, 41):
        part = linattn.favor_attention(
            q[..., :n, :], k[..., :n, :], v[..., :n, :], w, key_padding_mask=mask[:, :n], **kw
        )
        torch.testing.assert_close(part, full[..., :n, :], rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64_oracle():
    # Large logits: exact scores up to exp(~40), features of very different scales.
    q, k, v = (randn(2, 2, 300, 16, seed=s) for s in range(3))
    q, k = q * 2.5, k * 2.5
    w = projection(32, 16)
    lf = torch.tensor([0.1, 1.0], dtype=torch.float64)
    for causal in (False, True):
        for window in (None, 8):
            kw = dict(kernel="softmax", causal=causal, window=window, sinks=2)
            ref = oracle(q, k, v, w, linear_factor=lf, **kw)
            out = linattn.favor_attention(
                *(t.float() for t in (q, k, v)), w.float(), linear_factor=lf.float(), **kw
            )
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_no_quadratic_intermediate(causal):
    length = 512
    q, k, v = (randn(1, 1, length, 8, seed=s, requires_grad=True) for s in range(3))
    w = projection(16, 8)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linattn.favor_attention(q, k, v, w, causal=causal, window=4, sinks=4)
        out2 = linattn.favor_attention(q, k, v, w, causal=causal, sinks=4)
    (out + out2).sum().backward()
    assert max(sizes) < length * length / 4


# ----------------------------------------------------------------- recurrent decoding
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("window", [None, 0, 1, 6, 50], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("sinks", [1, 3, 40], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("step", [1, 4, 7], ids=lambda s: f"step{s}")
def test_recurrent_equals_parallel(kernel, window, sinks, step):
    length = 33
    q, k, v = (randn(3, 3, length, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[0, :6] = True  # left padding longer than a step
    mask[1, 1:5] = True  # a hole between the first and the second sink
    mask[1, 20:24] = True
    kw = dict(kernel=kernel, window=window, sinks=sinks, linear_factor=FACTOR)
    par = linattn.favor_attention(
        q, garbage(k, mask), v, w, causal=True, key_padding_mask=mask, chunk_size=8, **kw
    )
    state, outs = None, []
    for s in range(0, length, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :],
            garbage(k, mask)[..., sl, :],
            v[..., sl, :],
            w,
            state=state,
            key_padding_mask=mask[:, sl],
            **kw,
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-9, atol=1e-9)
    band = 0 if window is None else window
    # The ring holds the last min(window, tokens seen) tokens (issue 26 item 7).
    assert state.keys.shape == (3, 3, min(band, length), 8)
    # The sink slots: one per token that left the window, up to `sinks` (issue 26 item
    # 7: never more than can be seen).
    left = min(sinks, max(0, length - band))
    assert state.sink_keys.shape == (3, 3, left, 8) and state.sink_values.shape == (3, 3, left, 8)
    assert state.sink_padding.shape == (3, left)
    assert state.seen.tolist() == (~mask).sum(-1).tolist()
    # The sinks that left the window are kept, the others are empty slots.
    assert (~state.sink_padding).sum(-1).max() <= min(sinks, left)


def test_recurrent_state_has_no_sink_fields_without_sinks():
    q = randn(2, 3, 5, 8)
    w = projection(16, 8)
    _, state = linattn.favor_recurrent(q, q, q, w, window=3)
    assert state.sink_keys is None and state.seen is None
    _, state = linattn.favor_recurrent(q, q, q, w)
    assert state.keys is None and state.sink_keys is None


def test_recurrent_state_checks():
    q = randn(2, 3, 5, 8)
    w = projection(16, 8)
    _, state = linattn.favor_recurrent(q, q, q, w, window=3, sinks=2)
    # After 5 tokens only 2 have left the window (both sinks, nothing in kv): that state
    # is the same for sinks=2 and sinks=3 (2 slots either way) and is accepted; after 8
    # tokens kv holds keys, so it can only belong to sinks=2.
    linattn.favor_recurrent(q, q, q, w, window=3, sinks=3, state=state)
    q8 = randn(2, 3, 8, 8)
    _, state8 = linattn.favor_recurrent(q8, q8, q8, w, window=3, sinks=2)
    with pytest.raises(ValueError, match=r"state\.sink_keys must have shape"):
        linattn.favor_recurrent(q, q, q, w, window=3, sinks=3, state=state8)
    with pytest.raises(ValueError, match="sinks=0"):
        linattn.favor_recurrent(q, q, q, w, window=3, state=state)
    with pytest.raises(ValueError, match="sinks=0"):
        linattn.favor_recurrent(q, q, q, w, state=state._replace(keys=None))
    _, plain = linattn.favor_recurrent(q, q, q, w, window=3)
    with pytest.raises(ValueError, match=r"state\.sink_keys must have shape"):
        linattn.favor_recurrent(q, q, q, w, window=3, sinks=2, state=plain)
    _, nowin = linattn.favor_recurrent(q, q, q, w, sinks=2)
    assert nowin.keys.shape == (2, 3, 0, 8)
    linattn.favor_recurrent(q, q, q, w, sinks=2, state=nowin)


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "value,exc",
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError), (None, TypeError)],
    ids=["negative", "float", "bool", "str", "none"],
)
def test_bad_sinks_raise(value, exc):
    q = randn(2, 3, 10, 8)
    w = projection(16, 8)
    with pytest.raises(exc, match="sinks"):
        linattn.favor_attention(q, q, q, w, window=2, sinks=value)
    with pytest.raises(exc, match="sinks"):
        linattn.favor_recurrent(q, q, q, w, sinks=value)
    with pytest.raises((ValueError, TypeError), match="sinks"):
        linattn.PerformerAttention(16, 2, sinks=value)
    with pytest.raises((ValueError, TypeError), match="sinks"):
        ModelConfig(vocab_size=10, dim=16, heads=2, sinks=value)


def test_numpy_integers_are_ints():
    # A NumPy integer (a config read with numpy, a sweep over np.arange) is an int:
    # the same output as the Python int, stored as a Python int (JSON-serializable).
    np = pytest.importorskip("numpy")
    q = randn(2, 3, 10, 8)
    w = projection(16, 8)
    want = linattn.favor_attention(q, q, q, w, window=2, sinks=1)
    got = linattn.favor_attention(q, q, q, w, window=np.int64(2), sinks=np.int32(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    mod = linattn.PerformerAttention(16, 2, window=np.int64(3), sinks=np.int64(1))
    assert type(mod.window) is int and type(mod.sinks) is int
    cfg = ModelConfig(vocab_size=10, dim=16, heads=2, window=np.int64(4), sinks=np.int16(2))
    assert type(cfg.window) is int and type(cfg.sinks) is int
    json.dumps(cfg.to_dict())


def test_sinks_need_self_attention():
    q, k = randn(2, 3, 10, 8), randn(2, 3, 7, 8)
    with pytest.raises(ValueError, match="sinks=2 needs Lq == Lk"):
        linattn.favor_attention(q, k, k, projection(16, 8), sinks=2)
    with pytest.raises(ValueError, match="sinks applies to attention='favor' only"):
        ModelConfig(vocab_size=10, dim=16, heads=2, attention="exact", sinks=1)


@pytest.mark.parametrize("kernel", ["hedgehog", "hedgehog_untied", "relu", "elu"])
def test_issue_repro_causal_sinks_without_window_keep_row_zero_exact(kernel):
    # Row 0 sees only key 0, a sink: exact softmax over it (its value), whatever the
    # score. The empty far part's nominal scale 0 stabilized it before (-1.111 for -1.1258).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 4, generator=g) for _ in range(3))
    k[..., 0] = 1.0
    q[..., 0] = -200.0
    out = linattn.favor_attention(q, k, v, kernel=kernel, causal=True, sinks=1)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    step, _ = linattn.favor_recurrent(
        q[..., :1, :], k[..., :1, :], v[..., :1, :], kernel=kernel, sinks=1
    )
    torch.testing.assert_close(step[0, 0, 0], v[0, 0, 0])


# ----------------------------------------------------------------- huge sinks, stateful
def test_huge_sinks_in_the_stateful_paths_cost_what_is_seen():
    # Issue 26 item 7: cost never depends on a size beyond what can be seen. sinks=10**12
    # once allocated every slot up front (a bare allocator error); every key is then a
    # sink, so the result is the same as sinks = L.
    q, k, v = (randn(1, 2, 6, 4, seed=s) for s in range(3))
    w = projection(8, 4)
    more = [randn(1, 2, n, 4, seed=10 + n) for n in (1, 3)]
    for kw in ({"window": 2}, {"window": None}):
        huge, small = dict(kw, sinks=10**12), dict(kw, sinks=11)
        out, state = linattn.favor_attention(
            q, k, v, w, causal=True, output_final_state=True, **huge
        )
        ref, ref_state = linattn.favor_attention(
            q, k, v, w, causal=True, output_final_state=True, **small
        )
        torch.testing.assert_close(out, ref)
        left = 6 - (kw["window"] or 0)
        assert state.sink_keys.shape == (1, 2, left, 4)
        _rec, rstate = linattn.favor_recurrent(
            q[..., :1, :], k[..., :1, :], v[..., :1, :], w, **huge
        )
        assert rstate.sink_keys.shape[-2] <= 1
        # Decoding on, one token and three at a time, from either state.
        for st, r in ((state, ref_state), (rstate, None)):
            for x in more:
                o, st = linattn.favor_recurrent(x, x, x, w, state=st, **huge)
                if r is not None:
                    o2, r = linattn.favor_recurrent(x, x, x, w, state=r, **small)
                    torch.testing.assert_close(o, o2)
            assert st.sink_keys.shape[-2] <= 10
        o, _ = linattn.favor_attention(
            q, k, v, w, causal=True, initial_state=state, output_final_state=True, **huge
        )
        assert o.shape == (1, 2, 6, 4)


@pytest.mark.parametrize("sinks", [1, 3], ids=lambda s: f"s{s}")
def test_packed_states_with_sink_slots_of_different_counts(sinks):
    # The sink slots grow with the tokens that leave the window: packed sequences of
    # different lengths have different counts, padded with empty slots when stacked.
    q, k, v = (randn(1, 2, 9, 4, seed=s) for s in range(3))
    w = projection(8, 4)
    cu = torch.tensor([0, 1, 9], dtype=torch.int32)
    kw = dict(window=1, sinks=sinks)
    _out, state = linattn.favor_attention(
        q, k, v, w, causal=True, cu_seqlens=cu, output_final_state=True, **kw
    )
    x = randn(1, 2, 2, 4, seed=7)
    o, _ = linattn.favor_recurrent(
        x, x, x, w, state=state, cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32), **kw
    )
    for i, (s, e) in enumerate(((0, 1), (1, 9))):
        full = torch.cat([q[..., s:e, :], x[..., i : i + 1, :]], dim=-2)
        fk = torch.cat([k[..., s:e, :], x[..., i : i + 1, :]], dim=-2)
        fv = torch.cat([v[..., s:e, :], x[..., i : i + 1, :]], dim=-2)
        ref = linattn.favor_attention(full, fk, fv, w, causal=True, **kw)
        torch.testing.assert_close(o[..., i : i + 1, :], ref[..., -1:, :])
