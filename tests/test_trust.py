"""Issue 15: no silent wrong results (padding contents, NaN propagation, double backward,
FAVOR++ precision, argument validation, MHA layout)."""

import math

import pytest
import torch
from torch import nn

import linattn
from conftest import projection, randn
from linattn.features import get_feature_map
from linattn.ops.linformer import linformer_naive

KERNELS = ["softmax", "softmax_hyp", "softmax_opt", "softmax_trig", "relu", "elu"]
CAUSAL_KERNELS = [k for k in KERNELS if get_feature_map(k).causal_ok]
CONTENTS = {"nan": float("nan"), "inf": float("inf"), "big": 1e30, "-big": -1e30}


def _fill_padding(t, mask, value):
    t = t.clone()
    t[mask[:, None, :, None].expand_as(t)] = value
    return t


def _padded(q, k, v, pad, value, side="right"):
    # q, k, v (B, H, L, d) -> padded on one side with `value`, and the mask.
    b, h, length, _ = q.shape
    total = length + pad
    if side == "right":
        mask = torch.arange(total)[None].expand(b, -1) >= length
        sl = slice(0, length)
    else:
        mask = torch.arange(total)[None].expand(b, -1) < pad
        sl = slice(pad, total)
    out = []
    for t in (q, k, v):
        big = t.new_zeros(b, h, total, t.shape[-1])
        big[..., sl, :] = t
        out.append(_fill_padding(big, mask, value))
    return (*out, mask, sl)


# ------------------------------------------------------------------ 1. padding contents
@pytest.mark.parametrize("content", list(CONTENTS), ids=list(CONTENTS))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_favor_bidirectional_padding_contents_do_not_matter(kernel, content, side):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, kernel=kernel)
    qp, kp, vp, mask, sl = _padded(q, k, v, 4, CONTENTS[content], side)
    out = linattn.favor_attention(qp, kp, vp, w, kernel=kernel, key_padding_mask=mask)
    assert torch.isfinite(out[..., sl, :]).all()
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("content", list(CONTENTS), ids=list(CONTENTS))
@pytest.mark.parametrize("kernel", CAUSAL_KERNELS)
def test_favor_causal_and_recurrent_padding_contents_do_not_matter(kernel, content):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    ref = linattn.favor_attention(q, k, v, w, kernel=kernel, causal=True)
    # Causal: left padding keeps the real tokens' prefixes.
    qp, kp, vp, mask, sl = _padded(q, k, v, 4, CONTENTS[content], "left")
    out = linattn.favor_attention(
        qp, kp, vp, w, kernel=kernel, causal=True, key_padding_mask=mask, chunk_size=4
    )
    torch.testing.assert_close(out[..., sl, :], ref, rtol=1e-9, atol=1e-9)
    state, outs = None, []
    for i in range(qp.shape[-2]):
        o, state = linattn.favor_recurrent(
            qp[..., i : i + 1, :],
            kp[..., i : i + 1, :],
            vp[..., i : i + 1, :],
            w,
            state=state,
            kernel=kernel,
            key_padding_mask=mask[:, i : i + 1],
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -2)[..., sl, :], ref, rtol=1e-9, atol=1e-9)


def test_issue_repro_huge_padded_key_softmax():
    q, k, v = (randn(1, 1, 4, 8, seed=s, dtype=torch.float32) for s in range(3))
    k[..., 3, :] = 1e30
    w = projection(16, 8, dtype=torch.float32)
    mask = torch.tensor([[0, 0, 0, 1]]).bool()
    out = linattn.favor_attention(q, k, v, w, key_padding_mask=mask)
    ref = linattn.favor_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], w)
    torch.testing.assert_close(out[..., :3, :], ref[..., :3, :])


def test_padding_contents_do_not_reach_gradients():
    q, k, v = (randn(2, 2, 7, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    _, kp, vp, mask, sl = _padded(q, k, v, 3, float("nan"), "right")
    # Queries at padded positions stay finite: a NaN query poisons its own output row and,
    # through it, the backward pass, exactly as in exact attention (SDPA).
    qp = _padded(q, k, v, 3, 0.5, "right")[0]
    for t in (qp, kp, vp):
        t.requires_grad_()
    for causal in (False, True):
        out = linattn.favor_attention(qp, kp, vp, w, causal=causal, key_padding_mask=mask)
        gk, gv = torch.autograd.grad(out[..., sl, :].sum(), (kp, vp))
        assert torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert (gk[..., 7:, :] == 0).all() and (gv[..., 7:, :] == 0).all()


@pytest.mark.parametrize("content", list(CONTENTS), ids=list(CONTENTS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_linformer_padding_contents_do_not_matter(content, side):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    e = randn(5, 16, seed=7)
    ref = linattn.linformer_attention(q, k, v, e)
    _, kp, vp, mask, _ = _padded(q, k, v, 4, CONTENTS[content], side)
    out = linattn.linformer_attention(q, kp, vp, e, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("module", ["performer", "linformer", "linformer-pool"])
def test_modules_padding_contents_do_not_matter(module):
    torch.manual_seed(0)
    if module == "performer":
        attn = linattn.PerformerAttention(16, 2, batch_first=True, dtype=torch.float64)
    else:
        kind = "linear" if module == "linformer" else "mean"
        attn = linattn.LinformerAttention(
            16,
            2,
            max_seq_len=16,
            proj_dim=4,
            proj_kind=kind,
            sharing="headwise",
            batch_first=True,
            dtype=torch.float64,
        )
    x = randn(2, 6, 16)
    ref, _ = attn(x)
    xp = torch.cat([x, torch.full((2, 3, 16), float("nan"), dtype=x.dtype)], dim=1)
    mask = torch.arange(9)[None].expand(2, -1) >= 6
    out, _ = attn(xp, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :6], ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ 2. NaN in real keys
@pytest.mark.parametrize("kdim", [1, 3])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_linformer_nonfinite_real_key_matches_reference(kdim, value):
    q, k, v = (randn(2, 2, 5, 4, seed=s) for s in range(3))
    k[0, 0, 1, 0] = float(value)
    e = randn(kdim, 8, seed=5)
    out = linattn.linformer_attention(q, k, v, e)
    ref = linformer_naive(q, k, v, e)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True)


def test_favor_nan_in_real_key_propagates():
    q, k, v = (randn(1, 1, 5, 8, seed=s) for s in range(3))
    k[0, 0, 2, 0] = float("nan")
    w = projection(16, 8)
    for causal in (False, True):
        out = linattn.favor_attention(q, k, v, w, causal=causal)
        rows = slice(2, None) if causal else slice(None)
        assert out[..., rows, :].isnan().all()


# ------------------------------------------------------------------ 3. double backward
@pytest.mark.parametrize(
    "path", ["bidirectional", "causal", "recurrent", "window-bidirectional", "window-causal"]
)
def test_double_backward_raises_instead_of_silently_dropping_the_graph(path):
    q, k, v = (randn(1, 2, 5, 8, seed=s, requires_grad=True) for s in range(3))
    w = projection(16, 8)
    if path == "recurrent":
        out, _ = linattn.favor_recurrent(q, k, v, w)
    elif path.startswith("window"):
        out = linattn.favor_attention(q, k, v, w, causal=path.endswith("causal"), window=1)
    else:
        out = linattn.favor_attention(q, k, v, w, causal=path == "causal")
    # First-order gradients with create_graph=True are still right ...
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (g_ref,) = torch.autograd.grad(out.pow(2).sum(), q, retain_graph=True)
    torch.testing.assert_close(g, g_ref)
    # ... but differentiating them again raises instead of returning a wrong answer.
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.pow(2).sum(), q)


# ------------------------------------------------------------------ 4. FAVOR++ precision
def _log_domain_favor(q, k, v, w, params, mask=None):
    # The oracle in log space (float64): weights logsumexp_m(lq_im + lk_jm) never overflow.
    xs_q, xs_k = (t * math.sqrt(params.scale) for t in (q, k))
    a, b = params.opt_a[..., None, None], params.opt_b[..., None, None]

    def logf(xs):
        return a * (w * w).sum(-1) + b * (xs @ w.T) - 0.5 * (xs * xs).sum(-1, keepdim=True)

    lw = torch.logsumexp(logf(xs_q)[..., :, None, :] + logf(xs_k)[..., None, :, :], -1)
    if mask is not None:
        lw = lw.masked_fill(mask[:, None, None, :], float("-inf"))
    return torch.softmax(lw, -1) @ v


@pytest.mark.parametrize("scale_up", [1.0, 4.0, 8.0, 16.0, 30.0])
def test_favor_plus_plus_float32_matches_float64_oracle_at_large_scales(scale_up):
    q, k, v = (randn(2, 2, 20, 16, seed=s) for s in range(3))
    q, k = q * scale_up, k * scale_up
    w = projection(64, 16)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 15:] = True
    fm = get_feature_map("softmax_opt")
    params = fm.prepare(w, q, k, mask, 16**-0.5)
    ref = _log_domain_favor(q, k, v, w, params, mask)
    out64 = linattn.favor_attention(q, k, v, w, kernel="softmax_opt", key_padding_mask=mask)
    torch.testing.assert_close(out64, ref, rtol=1e-9, atol=1e-9)
    out32 = linattn.favor_attention(
        q.float(), k.float(), v.float(), w.float(), kernel="softmax_opt", key_padding_mask=mask
    )
    torch.testing.assert_close(out32.double(), ref, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ 5. validation
def _qkv(lq=4, lk=4, d=8):
    return randn(1, 2, lq, d, seed=0), randn(1, 2, lk, d, seed=1), randn(1, 2, lk, d, seed=2)


def _state(kv_shape=(1, 2, 16, 9), stab_shape=(1, 2), dtype=torch.float64):
    return linattn.FavorState(
        torch.zeros(kv_shape, dtype=dtype), torch.zeros(stab_shape, dtype=dtype)
    )


FUNCTIONAL_BAD = {
    "scale-inf": (
        lambda: linattn.favor_attention(*_qkv(), projection(16, 8), scale=math.inf),
        ValueError,
        "scale must be a finite number > 0",
    ),
    "scale-nan": (
        lambda: linattn.favor_attention(*_qkv(), projection(16, 8), scale=math.nan),
        ValueError,
        "scale",
    ),
    "linformer-scale-inf": (
        lambda: linattn.linformer_attention(*_qkv(), randn(3, 8), scale=math.inf),
        ValueError,
        "scale",
    ),
    "lq-0": (
        lambda: linattn.favor_attention(*_qkv(lq=0), projection(16, 8)),
        ValueError,
        "at least one query",
    ),
    "lq-0-linformer": (
        lambda: linattn.linformer_attention(*_qkv(lq=0), randn(3, 8)),
        ValueError,
        "at least one query",
    ),
    "d-0": (lambda: linattn.favor_attention(*_qkv(d=0), randn(16, 0)), ValueError, "head_dim"),
    "projection-0-rows": (
        lambda: linattn.favor_attention(*_qkv(), randn(0, 8)),
        ValueError,
        "m >= 1",
    ),
    "draw-int64": (
        lambda: linattn.draw_projection(16, 8, dtype=torch.int64),
        TypeError,
        "floating",
    ),
    "draw-bool": (lambda: linattn.draw_projection(16, 8, dtype=torch.bool), TypeError, "floating"),
    "state-type": (
        lambda: linattn.favor_recurrent(*_qkv(lq=1, lk=1), projection(16, 8), state=(1, 2)),
        TypeError,
        "FavorState",
    ),
    "state-kv-shape": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(kv_shape=(1, 2, 8, 9))
        ),
        ValueError,
        "state.kv",
    ),
    "state-stab-shape": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(stab_shape=(2,))
        ),
        ValueError,
        "state.stab",
    ),
    "state-dtype": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(dtype=torch.int64)
        ),
        TypeError,
        "state.kv",
    ),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_BAD), ids=list(FUNCTIONAL_BAD))
def test_functional_bad_input_is_named_up_front(case):
    call, exc, match = FUNCTIONAL_BAD[case]
    with pytest.raises(exc, match=match):
        call()


def _cfg(**kw):
    from linattn.models import ModelConfig

    return ModelConfig(**{"vocab_size": 50, "dim": 16, "heads": 2, "depth": 1, **kw})


MODULE_BAD = {
    "performer-num-features-0": (
        lambda: linattn.PerformerAttention(16, 2, num_features=0),
        ValueError,
        "num_features",
    ),
    "config-num-features-0": (lambda: _cfg(num_features=0), ValueError, "num_features"),
    "config-proj-dim-0": (
        lambda: _cfg(attention="linformer", position="learned", proj_dim=0),
        ValueError,
        "proj_dim",
    ),
    "config-causal-str": (lambda: _cfg(causal="yes"), TypeError, "causal"),
    "config-num-classes-1": (lambda: _cfg(num_classes=1), ValueError, "num_classes"),
    "config-seed-str": (lambda: _cfg(seed="a"), TypeError, "seed"),
}


@pytest.mark.parametrize("case", list(MODULE_BAD), ids=list(MODULE_BAD))
def test_module_and_config_bad_input_is_named_up_front(case):
    call, exc, match = MODULE_BAD[case]
    with pytest.raises(exc, match=match):
        call()


def test_sequence_classifier_needs_two_classes():
    from linattn.models import SequenceClassifier

    cfg = _cfg(num_classes=2)
    cfg.num_classes = 1  # mutated after the config check
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SequenceClassifier(cfg)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"prompt": "empty"}, "at least one prompt"),
        ({"prompt": "float"}, "integer"),
        ({"prompt": "oov"}, r"\[0, 50\)"),
    ],
    ids=[
        "top_k-0",
        "top_k-neg",
        "temp-nan",
        "temp-inf",
        "temp-0",
        "top_p-0",
        "new-neg",
        "new-float",
        "empty-prompt",
        "float-prompt",
        "out-of-vocab",
    ],
)
def test_generate_bad_arguments_are_named_up_front(kwargs, match):
    from linattn.models import CausalLM

    model = CausalLM(_cfg(causal=True))
    prompt = {
        "empty": torch.zeros(1, 0, dtype=torch.long),
        "float": torch.zeros(1, 3),
        "oov": torch.full((1, 3), 50),
    }.get(kwargs.pop("prompt", None), torch.ones(1, 3, dtype=torch.long))
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(prompt, **kwargs)


# ------------------------------------------------------------------ 6. MHA layout
def _from_mha(module, mha):
    e = mha.embed_dim
    with torch.no_grad():
        for i, lin in enumerate((module.q_proj, module.k_proj, module.v_proj)):
            lin.weight.copy_(mha.in_proj_weight[i * e : (i + 1) * e])
            lin.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
        module.out_proj.weight.copy_(mha.out_proj.weight)
        module.out_proj.bias.copy_(mha.out_proj.bias)
    return module


def _modules(batch_first=None):
    kw = {} if batch_first is None else {"batch_first": batch_first}
    return {
        "performer": linattn.PerformerAttention(16, 4, dtype=torch.float64, **kw),
        # Mean pooling to one position: uniform weights over the real keys, exactly.
        "linformer": linattn.LinformerAttention(
            16,
            4,
            max_seq_len=16,
            proj_dim=1,
            proj_kind="mean",
            sharing="headwise",
            dtype=torch.float64,
            **kw,
        ),
    }


def test_default_layout_is_that_of_multihead_attention():
    mha = nn.MultiheadAttention(16, 4)
    for name, m in _modules().items():
        assert m.batch_first is mha.batch_first is False, name


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("name", ["performer", "linformer"])
def test_drop_in_for_multihead_attention_with_the_same_weights(name, batch_first):
    # Zero key projections make every score equal: softmax attention and the linear forms
    # are then all the exact mean of the real values, so the two modules must agree to
    # rounding, in either layout, with padding. Attending across the batch (the wrong
    # axis) would mix the sequences and fail.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight[16:32].zero_()
        mha.in_proj_bias[16:32].zero_()
    m = _from_mha(_modules(batch_first=None if not batch_first else True)[name], mha)
    x = randn(3, 7, 16)  # (N, L, E)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, :2] = True
    inp = x if batch_first else x.transpose(0, 1)
    ref, _ = mha(inp, inp, inp, key_padding_mask=mask, need_weights=False)
    out, weights = m(inp, inp, inp, key_padding_mask=mask, need_weights=False)
    assert weights is None and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_performer_approaches_multihead_attention_with_many_features():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.mul_(0.5)
    m = _from_mha(linattn.PerformerAttention(16, 4, num_features=8192, dtype=torch.float64), mha)
    x = randn(9, 2, 16)  # (L, N, E), the default layout
    ref, _ = mha(x, x, x, need_weights=False)
    out, _ = m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.02)


@pytest.mark.parametrize("name", ["performer", "linformer"])
def test_seq_first_is_the_transpose_of_batch_first(name):
    torch.manual_seed(0)
    seq_first = _modules()[name]
    batch_first = _modules(batch_first=True)[name]
    batch_first.load_state_dict(seq_first.state_dict())
    x = randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    out_bf, _ = batch_first(x, key_padding_mask=mask)
    out_sf, _ = seq_first(x.transpose(0, 1), key_padding_mask=mask)
    torch.testing.assert_close(out_sf, out_bf.transpose(0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"warmup": -3}, "warmup"),
        ({"num_features": 0}, "num_features"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"redraw_interval": 0}, "redraw_interval"),
    ],
    ids=["warmup-neg", "num-features-0", "proj-dim-0", "redraw-0"],
)
def test_train_config_refuses_values_that_would_silently_become_defaults(kw, match):
    from linattn.train.config import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize(
    "flag", [["--num-features", "0"], ["--warmup", "-3"]], ids=["num-features-0", "warmup-neg"]
)
def test_cli_train_refuses_before_any_work(tmp_path, flag):
    from linattn.cli import main

    out = tmp_path / "run"
    try:
        rc = main(["train", "--steps", "1", "--out", str(out), *flag])
    except (ValueError, SystemExit) as err:
        rc = err.code if isinstance(err, SystemExit) else 1
    assert rc not in (0, None)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: linattn.PerformerAttention(16, 2, kdim=0), "kdim"),
        (lambda: linattn.PerformerAttention(16, 2, vdim=0), "vdim"),
        (lambda: linattn.LinformerAttention(16, 2, max_seq_len=8, kdim=0), "kdim"),
        (lambda: linattn.PerformerAttention(16, 2, chunk_size=0), "chunk_size"),
    ],
    ids=["performer-kdim-0", "performer-vdim-0", "linformer-kdim-0", "chunk-0"],
)
def test_module_zero_sizes_are_refused_not_defaulted(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_model_out_of_vocabulary_ids_are_named():
    from linattn.models import CausalLM

    lm = CausalLM(_cfg(causal=True))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        lm(torch.full((1, 3), 50))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        lm(torch.full((1, 3), -1))
