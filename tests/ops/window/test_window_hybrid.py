"""The sliding-window hybrid (``window=``, ``linear_factor=``) against the float64 oracle
that materializes the L x L matrix, in every path."""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import naive as oracle
from conftest import per_head, projection, randn

KERNELS = ["softmax", "softmax_hyp", "elu", "hedgehog"]


def pad_mask(b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] >= lengths[:, None]
    mask[0] = torch.flip(mask[0], [0])  # one left-padded row
    return mask


FACTOR = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length", [1, 63, 200], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("window", [0, 1, 5, 300], ids=lambda w: f"w{w}")
def test_hybrid_matches_oracle(kernel, causal, length, window):
    q, k, v = (randn(2, 3, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    out = linattn.favor_attention(
        q, k, v, w, kernel=kernel, causal=causal, window=window, chunk_size=16
    )
    ref = oracle(q, k, v, w, kernel=kernel, causal=causal, window=window)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.fixture(params=["one-stabilizer", "running-max"])
def stabilizer(request, monkeypatch):
    # The bidirectional far part has two stabilizer paths (README): exercise both.
    if request.param == "running-max":
        monkeypatch.setattr("linattn.ops.favor.window.far.SPREAD_FLOAT64", -1.0)
        monkeypatch.setattr("linattn.ops.favor.window.far.SPREAD_FLOAT32", -1.0)
    return request.param


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("length", [1, 63, 200], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("window", [0, 5, 37, 64, 150], ids=lambda w: f"w{w}")
def test_hybrid_padding_per_head_factor_matches_oracle(kernel, causal, length, window, stabilizer):
    q, k, v = (randn(3, 3, length, 8, seed=s) for s in range(3))
    w = per_head(3, 12, 8)
    mask = pad_mask(3, length, seed=length)
    out = linattn.favor_attention(
        q,
        k,
        v,
        w,
        kernel=kernel,
        causal=causal,
        window=window,
        linear_factor=FACTOR,
        key_padding_mask=mask,
        chunk_size=16,
        block_size=7,
    )
    ref = oracle(
        q, k, v, w, kernel=kernel, causal=causal, window=window, linear_factor=FACTOR, mask=mask
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_scalar_and_zero_factor(causal):
    q, k, v = (randn(2, 3, 40, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    for lf in (torch.tensor(0.7, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)):
        out = linattn.favor_attention(q, k, v, w, causal=causal, window=4, linear_factor=lf)
        ref = oracle(q, k, v, w, causal=causal, window=4, linear_factor=lf)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_trig", "hedgehog", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_window_covering_everything_is_softmax_attention(kernel, causal):
    q, k, v = (randn(2, 3, 37, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = pad_mask(2, 37)
    sdpa_mask = ~mask[:, None, None, :]
    if causal:
        sdpa_mask = sdpa_mask & torch.ones(37, 37, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
    for window in (37, 1000) if causal else (36, 1000):
        out = linattn.favor_attention(
            q, k, v, w, kernel=kernel, causal=causal, window=window, key_padding_mask=mask
        )
        real = (
            ~mask[:, None, :, None].expand_as(out)
            if not causal
            else torch.ones_like(out, dtype=torch.bool)
        )
        # Rows that see no key (causal, left padding) are 0 here, NaN in SDPA.
        ok = real & torch.isfinite(ref)
        torch.testing.assert_close(out[ok], ref[ok], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradcheck(kernel, causal, stabilizer):
    if stabilizer == "running-max" and (causal or kernel == "hedgehog"):
        pytest.skip("one running-max case is enough")
    q, k, v = (randn(2, 2, 11, 4, seed=s, requires_grad=True) for s in range(3))
    w = per_head(2, 5, 4).requires_grad_()
    lf = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    mask = pad_mask(2, 11, seed=3)

    def fn(q, k, v, w, lf):
        return linattn.favor_attention(
            q,
            k,
            v,
            w,
            kernel=kernel,
            causal=causal,
            window=2,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=3,
            block_size=4,
        )

    assert gradcheck(fn, (q, k, v, w, lf), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_oracle(causal):
    q, k, v = (randn(2, 3, 70, 8, seed=s, requires_grad=True) for s in range(3))
    w = per_head(3, 8, 8).requires_grad_()
    lf = FACTOR.clone().requires_grad_()
    mask = pad_mask(2, 70, seed=5)
    args = dict(causal=causal, window=9, linear_factor=lf)
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask, chunk_size=16, **args)
    ref = oracle(q, k, v, w, mask=mask, **args)
    g = randn(*out.shape, seed=9)
    # Padded query rows are arbitrary in both: compare the real ones only.
    g = g.masked_fill(mask[:, None, :, None], 0.0)
    grads = torch.autograd.grad(out, (q, k, v, w, lf), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, w, lf), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
@pytest.mark.parametrize("window", [0, 1, 6, 50], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("step", [1, 5], ids=lambda s: f"step{s}")
def test_recurrent_equals_parallel(kernel, window, step):
    length = 33
    q, k, v = (randn(2, 3, length, 8, seed=s) for s in range(3))
    w = per_head(3, 8, 8)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, :6] = True  # left padding
    mask[1, 20:24] = True  # a hole
    par = linattn.favor_attention(
        q,
        k,
        v,
        w,
        kernel=kernel,
        causal=True,
        window=window,
        linear_factor=FACTOR,
        key_padding_mask=mask,
        chunk_size=8,
    )
    state, outs = None, []
    for s in range(0, length, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :],
            k[..., sl, :],
            v[..., sl, :],
            w,
            kernel=kernel,
            state=state,
            window=window,
            linear_factor=FACTOR,
            key_padding_mask=mask[:, sl],
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-9, atol=1e-9)
    # The ring holds the last min(window, tokens seen) tokens (issue 26 item 7).
    ring = min(window, length)
    assert state.keys.shape == (2, 3, ring, 8) and state.values.shape == (2, 3, ring, 8)
    assert state.padding.shape == (2, ring)


@pytest.mark.parametrize(
    "causal,side",
    [(False, "right"), (False, "left"), (True, "right"), (True, "left")],
    ids=["bidir-right", "bidir-left", "causal-right", "causal-left"],
)
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_padding_invariance_with_garbage(causal, side, kernel):
    b, length, pad = 2, 40, 13
    q, k, v = (randn(b, 2, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    lf = torch.tensor([0.3, 2.0], dtype=torch.float64)
    kw = dict(kernel=kernel, causal=causal, window=5, linear_factor=lf, chunk_size=8)
    ref = linattn.favor_attention(q, k, v, w, **kw)
    junk = [randn(b, 2, pad, 8, seed=10 + s) * 50 for s in range(3)]
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
    if side == "left" and not causal:
        torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-10, atol=1e-10)
    elif side == "right":
        torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-10, atol=1e-10)
    else:
        # Causal, left padding: positions move, so compare with the oracle directly.
        clean = [t.masked_fill(mask[:, None, :, None], 0.0) for t in (qp, kp, vp)]
        want = oracle(*clean, w, kernel=kernel, causal=True, window=5, linear_factor=lf, mask=mask)
        torch.testing.assert_close(out[..., sl, :], want[..., sl, :], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("window", [1, 16], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_adversarial_future_keys_do_not_leak(dtype, window, kernel):
    q, k, v = (randn(1, 2, 256, 16, seed=s, dtype=dtype) for s in range(3))
    w = projection(32, 16, dtype=dtype)
    kw = dict(kernel=kernel, causal=True, window=window, chunk_size=64)
    base = linattn.favor_attention(q, k, v, w, **kw)
    for p in (10, 63, 64, 100):
        k2, v2 = k.clone(), v.clone()
        k2[..., p + 1 :, :] *= 60.0
        v2[..., p + 1 :, :] = 1e6
        out = linattn.favor_attention(q, k2, v2, w, **kw)
        assert torch.isfinite(out[..., : p + 1, :]).all()
        torch.testing.assert_close(
            out[..., : p + 1, :], base[..., : p + 1, :], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "hedgehog"])
def test_float32_close_to_float64_oracle(causal, kernel, stabilizer):
    # Large logits: exact scores up to exp(~40), features of very different scales.
    q, k, v = (randn(2, 2, 300, 16, seed=s) for s in range(3))
    q, k = q * 2.5, k * 2.5
    w = projection(32, 16)
    lf = torch.tensor([0.1, 1.0], dtype=torch.float64)
    ref = oracle(q, k, v, w, kernel=kernel, causal=causal, window=8, linear_factor=lf)
    out = linattn.favor_attention(
        *(t.float() for t in (q, k, v)),
        w.float(),
        kernel=kernel,
        causal=causal,
        window=8,
        linear_factor=lf.float(),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_half_precision(dtype, causal):
    q, k, v = (randn(1, 2, 100, 16, seed=s, dtype=torch.float32) for s in range(3))
    w = projection(32, 16, dtype=torch.float32)
    lf = torch.tensor([0.5, 1.0])
    out = linattn.favor_attention(
        *(t.to(dtype) for t in (q, k, v)),
        w.to(dtype),
        causal=causal,
        window=7,
        linear_factor=lf.to(dtype),
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    rounded = linattn.favor_attention(
        *(t.to(dtype).float() for t in (q, k, v)),
        w.to(dtype).float(),
        causal=causal,
        window=7,
        linear_factor=lf.to(dtype).float(),
    )
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), rounded, rtol=eps, atol=eps)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_no_quadratic_intermediate(causal):
    # Every tensor autograd saves is O(L (w + M)): none has L*L elements.
    length, window = 512, 4
    q, k, v = (randn(1, 1, length, 8, seed=s, requires_grad=True) for s in range(3))
    w = projection(16, 8)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linattn.favor_attention(q, k, v, w, causal=causal, window=window)
    out.sum().backward()
    assert max(sizes) < length * length / 4


def test_validation_errors():
    q = randn(2, 3, 10, 8)
    w = projection(16, 8)
    with pytest.raises(ValueError, match="window must be >= 0"):
        linattn.favor_attention(q, q, q, w, window=-1)
    with pytest.raises(TypeError, match="window must be an int"):
        linattn.favor_attention(q, q, q, w, window=2.0)
    with pytest.raises(ValueError, match="Lq == Lk"):
        linattn.favor_attention(q[..., :4, :], q, q, w, window=2)
    with pytest.raises(ValueError, match=r"shape \(heads,\) = \(3,\)"):
        linattn.favor_attention(q, q, q, w, window=2, linear_factor=torch.ones(2).double())
    with pytest.raises(ValueError, match="non-negative"):
        linattn.favor_attention(
            q, q, q, w, window=2, linear_factor=-torch.ones(3, dtype=torch.float64)
        )
    with pytest.raises(TypeError, match=r"linear_factor must be a torch\.Tensor"):
        linattn.favor_attention(q, q, q, w, window=2, linear_factor=0.5)
    with pytest.raises(ValueError, match=r"\(heads, m, head_dim\) = \(3, m, 8\)"):
        linattn.favor_attention(q, q, q, per_head(2, 16, 8))
    _, state = linattn.favor_recurrent(q, q, q, w, window=3)
    with pytest.raises(ValueError, match=r"state\.keys must have shape"):
        linattn.favor_recurrent(q, q, q, w, window=4, state=state)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", ["hedgehog", "hedgehog_untied", "softmax"])
def test_a_window_covering_the_batch_still_gives_every_parameter_a_gradient(causal, kernel):
    # DistributedDataParallel needs the same parameters used on every rank and step, and
    # ranks' batches differ in length: a batch the window covers must not leave the feature
    # map or the factor out of the graph (a None gradient), only give them zero.
    mod = linattn.PerformerAttention(
        16,
        2,
        kernel=kernel,
        causal=causal,
        window=8,
        sinks=1,
        learn_projection=True,
        batch_first=True,
    )
    x = torch.randn(3, 6, 16)
    mod(x, x, x)[0].sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None, name
    assert mod.projection.grad.abs().max() == 0
    y = torch.randn(3, 40, 16)
    mod.zero_grad()
    mod(y, y, y)[0].sum().backward()
    assert mod.projection.grad.abs().max() > 0


@pytest.mark.parametrize("kernel", ["softmax", "hedgehog", "softmax_opt"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("split", ["heads", "rows"])
def test_cpu_groups_give_the_one_call_numbers(kernel, causal, split, monkeypatch):
    # On CPU the hybrid runs over groups of (batch, head) pairs (window_groups): one head
    # at a time, or whole sequences one at a time; the values and every gradient (q, k,
    # v, a per-head projection, a per-head factor) are those of one call over all pairs.
    from linattn.ops.favor.window import hybrid as win

    if causal and kernel == "softmax_opt":
        pytest.skip("FAVOR++ is bidirectional only")
    b, h, length, d = 3, 3, 90, 8
    q, k, v = (randn(b, h, length, d, seed=s).requires_grad_() for s in range(3))
    w = (projection(12, 8) if kernel == "softmax_opt" else per_head(h, 12, 8)).requires_grad_()
    lf = FACTOR.clone().requires_grad_()
    mask = pad_mask(b, length, seed=7)

    def run():
        out = linattn.favor_attention(
            q, k, v, w, kernel=kernel, causal=causal, window=16, sinks=1,
            linear_factor=lf, key_padding_mask=mask,
        )  # fmt: skip
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), (q, k, v, w, lf))
        return out, grads

    m = 24 if kernel == "hedgehog" else 12
    per_pair = max(length * m, -(-length // win.far_block(16, length)) * m * (d + 1)) * 8
    monkeypatch.setattr(win, "CPU_GROUP_BYTES", 1 << 40)
    assert win.window_groups((b, h, length, d), m, win.far_block(16, length), 8) == (b, h)
    one, one_grads = run()
    budget = per_pair if split == "heads" else per_pair * (h + 1)
    monkeypatch.setattr(win, "CPU_GROUP_BYTES", budget)
    groups = win.window_groups((b, h, length, d), m, win.far_block(16, length), 8)
    assert groups == ((1, 1) if split == "heads" else (1, h))
    calls = []
    inner = win.hybrid_call
    monkeypatch.setattr(win, "hybrid_call", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    out, grads = run()
    assert len(calls) == (b * h if split == "heads" else b)
    torch.testing.assert_close(out, one, rtol=1e-10, atol=1e-12)
    for g, ref in zip(grads, one_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11)


def test_window_groups_arithmetic(monkeypatch):
    from linattn.ops.favor.window import hybrid as win

    # One (batch, head) pair at L = 1024, M = 128, dv = 32, C = 64, float32: 1024 * 128 * 4
    # bytes of features (more than the 16 * 128 * 33 * 4 of its block states).
    monkeypatch.setattr(win, "CPU_GROUP_BYTES", 1024 * 128 * 4 * 10)
    assert win.window_groups((8, 4, 1024, 32), 128, 64, 4) == (2, 4)  # 10 pairs: 2 rows
    assert win.window_groups((8, 16, 1024, 32), 128, 64, 4) == (1, 10)  # part of the heads
    assert win.window_groups((1, 2, 1024, 32), 128, 64, 4) == (1, 2)  # all of it
    # dv = 64: the block states (16 * 128 * 65 > 1024 * 128) set the size: 9 pairs.
    assert win.window_groups((8, 16, 1024, 64), 128, 64, 4) == (1, 9)
    monkeypatch.setattr(win, "CPU_GROUP_BYTES", 1)
    assert win.window_groups((8, 4, 1024, 32), 128, 64, 4) == (1, 1)  # at least one pair
    assert win.window_groups((0, 4, 1024, 32), 128, 64, 4) == (0, 4)
    assert win.window_groups((2, 0, 1024, 32), 128, 64, 4) == (2, 0)
    q = randn(2, 0, 10, 8)
    out = linattn.favor_attention(q, q, q, projection(16, 8), window=3)
    assert out.shape == (2, 0, 10, 8)


# ------------------------------------- rows with no far key (issue 26 item 1)
UNDERFLOW_KERNELS = ["hedgehog", "hedgehog_untied", "relu", "elu", "softmax"]


def _far_scores(length, score, dtype=torch.float32):
    # Every exact score q_i.k_j * scale = score (far below exp's underflow), v distinct.
    k = torch.zeros(1, 1, length, 4, dtype=dtype)
    k[..., 0] = 1.0
    q = torch.zeros(1, 1, length, 4, dtype=dtype)
    q[..., 0] = 2.0 * score  # scale = 1 / sqrt(4)
    v = torch.arange(4.0 * length, dtype=dtype).reshape(1, 1, length, 4)
    return q, k, v


@pytest.mark.parametrize("kernel", UNDERFLOW_KERNELS)
def test_issue_repro_first_causal_rows_keep_their_exact_scores(kernel):
    # The first w rows of a causal window have no far key: plain softmax over the band.
    # The far part's nominal scale (0 for hedgehog, relu, elu) stabilized them before, and
    # exp(-1000) underflowed: the rows came out as zeros.
    q, k, v = _far_scores(4, -500.0)
    w = projection(8, 4, dtype=torch.float32) if kernel.startswith("softmax") else None
    out = linattn.favor_attention(q, k, v, w, kernel=kernel, causal=True, window=2)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, :2].mean(0))
    step, _ = linattn.favor_recurrent(
        q[..., :1, :], k[..., :1, :], v[..., :1, :], w, kernel=kernel, window=2
    )
    torch.testing.assert_close(step[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize("kernel", UNDERFLOW_KERNELS)
@pytest.mark.parametrize("score", [-100.0, -90.0, -1e4])
def test_issue_repro_padding_invariance_at_low_scores(kernel, score):
    # A window covering the real tokens: right padding adds a far part whose keys are all
    # padding. Near the underflow threshold the exact part was subnormal (10% off).
    q, k, v = _far_scores(4, score)
    q[..., 1] = torch.arange(4.0)
    k[..., 1] = 0.3 * torch.arange(4.0)
    w = projection(8, 4, dtype=torch.float32) if kernel.startswith("softmax") else None
    alone = linattn.favor_attention(q, k, v, w, kernel=kernel, window=3)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(alone, exact)
    grow = [torch.cat([t, torch.zeros(1, 1, 6, 4)], dim=-2) for t in (q, k, v)]
    mask = torch.arange(10)[None] >= 4
    for causal in (False, True):
        padded = linattn.favor_attention(
            *grow, w, kernel=kernel, window=3, causal=causal, key_padding_mask=mask
        )
        ref = linattn.favor_attention(q, k, v, w, kernel=kernel, window=3, causal=causal)
        torch.testing.assert_close(padded[..., :4, :], ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ huge windows (issue 26 item 7)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"s{s}")
def test_huge_window_costs_nothing_beyond_the_sequence(causal, sinks):
    # w >= L is exact attention: the window is clamped to the sequence (before, 10**8
    # took 24 s of Python work at L = 12 and 10**12 raised MemoryError).
    q, k, v = (randn(2, 3, 12, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = pad_mask(2, 12)
    kw = dict(causal=causal, sinks=sinks, key_padding_mask=mask, linear_factor=FACTOR)
    huge = linattn.favor_attention(q, k, v, w, window=10**12, **kw)
    covering = linattn.favor_attention(q, k, v, w, window=12, **kw)
    torch.testing.assert_close(huge, covering, rtol=0, atol=0)
    ref = oracle(q, k, v, w, window=12, mask=mask, causal=causal, linear_factor=FACTOR)
    torch.testing.assert_close(huge, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("step", [1, 5], ids=lambda s: f"step{s}")
def test_recurrent_huge_window_keeps_a_small_ring(sinks, step):
    # favor_recurrent(window=2**40) tried to allocate a ring of 2**40 slots (2.8e14
    # bytes): the ring holds only the tokens seen so far.
    length = 12
    q, k, v = (randn(2, 3, length, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = pad_mask(2, length)
    state, outs = None, []
    for s in range(0, length, step):
        sl = slice(s, s + step)
        o, state = linattn.favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w,
            state=state, window=2**40, sinks=sinks, key_padding_mask=mask[:, sl],
        )  # fmt: skip
        outs.append(o)
        assert state.keys.shape[-2] == min(s + step, length)
    par = linattn.favor_attention(
        q, k, v, w, causal=True, window=2**40, sinks=sinks, key_padding_mask=mask
    )
    torch.testing.assert_close(torch.cat(outs, dim=-2), par, rtol=1e-10, atol=1e-10)


def test_a_ring_not_yet_full_continues_and_a_smaller_windows_full_ring_is_refused():
    q = randn(2, 3, 9, 8)
    w = projection(16, 8)
    # Two tokens into window 5: a ring of 2 slots, continued with window 5.
    _, state = linattn.favor_recurrent(q[..., :2, :], q[..., :2, :], q[..., :2, :], w, window=5)
    assert state.keys.shape[-2] == 2
    o, state = linattn.favor_recurrent(
        q[..., 2:, :], q[..., 2:, :], q[..., 2:, :], w, window=5, state=state
    )
    ref = linattn.favor_attention(q, q, q, w, causal=True, window=5)
    torch.testing.assert_close(o, ref[..., 2:, :], rtol=1e-10, atol=1e-10)
    # A full ring of window 3 (keys already left it) is not a window-5 state.
    _, small = linattn.favor_recurrent(q, q, q, w, window=3)
    with pytest.raises(ValueError, match=r"state\.keys must have shape"):
        linattn.favor_recurrent(q, q, q, w, window=5, state=small)


# ------------------------------------------------- combine: signed kernels' far parts
def _combine_reference(parts):
    # The formula itself, unstabilized (float64, moderate g): sum exp(g) nd[:dv] / sum
    # exp(g) nd[dv].
    total = sum(torch.exp(g).unsqueeze(-1) * nd for nd, g in parts)
    return total[..., :-1] / total[..., -1:]


@pytest.mark.parametrize(
    "far_normalizer", [0.0, 1e-310, -1e-310], ids=["zero", "subnormal", "neg-subnormal"]
)
def test_combine_keeps_a_signed_part_whose_normalizer_vanishes(far_normalizer):
    # softmax_trig / softmax_hyp far parts are signed: their normalizer can be exactly 0
    # (or subnormal) while their numerators are not. Such a part was dropped (normalizer
    # 0) or divided by the subnormal normalizer (inf numerators, NaN out).
    from linattn.ops.favor.window.hybrid import combine

    near = torch.tensor([[[[0.5, -1.0, 2.0]]]], dtype=torch.float64)
    far = torch.tensor([[[[0.75, 0.25, far_normalizer]]]], dtype=torch.float64)
    g_near = torch.tensor([[[0.3]]], dtype=torch.float64)
    g_far = torch.tensor([[[-0.2]]], dtype=torch.float64)
    parts = [(near, g_near), (far, g_far)]
    out = combine(parts, positive=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _combine_reference(parts), rtol=1e-12, atol=0)
    # A part with nothing in it (all zero) is still left out, and a row with nothing
    # anywhere is 0.
    empty = (torch.zeros_like(far), torch.full_like(g_far, 50.0))
    torch.testing.assert_close(combine([parts[0], empty], positive=False), near[..., :2] / 2.0)
    zero = combine([(torch.zeros_like(near), g_near), empty], positive=False)
    assert torch.equal(zero, torch.zeros_like(zero))
