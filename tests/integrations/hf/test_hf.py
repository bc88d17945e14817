"""Hugging Face conversion on tiny randomly initialized BERT and Llama models (no
downloads): weights kept, outputs approach the exact model, exact padding, causality,
save/load, recurrent generation, distillation."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import naive  # noqa: E402
from hf_models import TEXTS, ByteTokenizer, ids, left_padded, peaky, tiny_bert, tiny_llama  # noqa: E402
from linattn.integrations.hf import (  # noqa: E402
    FavorCache,
    convert,
    converted_layers,
    linattn_attention,
    load_converted,
    redraw_projections,
    save_converted,
)
from linattn.integrations.hf.distill import (  # noqa: E402
    DistillConfig,
    distill,
    embedding_agreement,
    lm_agreement,
)


def hidden(model, x, mask=None):
    return model(x, attention_mask=mask).last_hidden_state


# ----------------------------------------------------------------- conversion basics
@pytest.mark.parametrize(
    "make,method",
    [(tiny_bert, "favor"), (tiny_bert, "linformer"), (tiny_llama, "favor")],
    ids=["bert-favor", "bert-linformer", "llama-favor"],
)
def test_convert_keeps_weights_and_adds_state(make, method):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, method)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    extra = [k for k in after if k not in before]
    assert extra and all(".linattn." in k for k in extra)
    assert len(list(converted_layers(model))) == 2
    assert model.config._attn_implementation == "linattn"
    assert model.config.linattn_conversion["method"] == method


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama-gqa"])
def test_outputs_approach_exact_as_features_grow(make):
    model = make()
    x = ids(2, 24)
    ref = model(x).last_hidden_state if make is tiny_bert else model(x).logits
    errors = {}
    for m in (16, 256, 4096):
        errs = []
        for seed in range(3):
            c = convert(copy.deepcopy(model), "favor", num_features=m, seed=seed)
            out = c(x).last_hidden_state if make is tiny_bert else c(x).logits
            errs.append(relative_error(out, ref))
        errors[m] = sum(errs) / len(errs)
    assert errors[4096] < errors[256] < errors[16]
    # Monte Carlo error falls like 1/sqrt(m): 16x more features, about 4x less error.
    assert errors[4096] < errors[256] / 2.5
    assert errors[4096] < 0.02


def test_attention_function_equals_favor_oracle():
    """The registered function with GQA and padding equals the float64 FAVOR formula."""
    model = convert(tiny_llama(), "favor", num_features=64)
    module = next(iter(converted_layers(model)))
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :3] = False
    out, weights = linattn_attention(module, q, k, v, keep, scaling=module.scaling)
    assert weights is None and out.shape == (2, 9, 4, 8)
    w = module.linattn.projection.double()
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = naive(q, kr, vr, w, causal=True, mask=~keep, scale=module.scaling)
    torch.testing.assert_close(out.transpose(1, 2)[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.transpose(1, 2)[1, :, 3:], ref[1, :, 3:], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- padding exactness
@pytest.mark.parametrize(
    "method,opts",
    [
        ("favor", {}),
        ("favor", {"kernel": "relu"}),
        ("favor", {"kernel": "softmax_opt"}),
        ("linformer", {"proj_dim": 8}),
        ("linformer", {"sharing": "layerwise", "proj_dim": 8}),
        ("linformer", {"proj_kind": "conv", "proj_dim": 8}),
    ],
    ids=["favor", "relu", "favor++", "linformer", "linformer-layerwise", "linformer-conv"],
)
@pytest.mark.parametrize("side", ["right", "left"])
def test_encoder_padding_is_exact(method, opts, side):
    model = convert(tiny_bert(), method, **opts)
    lengths = [13, 7, 10]
    seqs = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    x = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        x[i, sl], mask[i, sl] = s, 1
    if side == "left":
        # BERT's absolute positions would shift under left padding; give the real ones.
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        batch = model(x, attention_mask=mask, position_ids=pos).last_hidden_state
    else:
        batch = hidden(model, x, mask)
    for i, s in enumerate(seqs):
        alone = hidden(model, s[None])[0]
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        torch.testing.assert_close(batch[i, sl], alone, rtol=1e-10, atol=1e-10)


def test_decoder_left_padding_is_exact():
    model = convert(tiny_llama(), "favor", num_features=32)
    a, b = ids(1, 11, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0], model(a).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1, 5:], model(b).logits[0], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- causality
def test_decoder_stays_causal_without_a_mask():
    model = convert(tiny_llama(), "favor", num_features=32)
    x = ids(2, 20)
    y = x.clone()
    # Enormous future changes: new tokens from position 12 on.
    y[:, 12:] = ids(2, 8, seed=5)
    lx, ly = model(x).logits, model(y).logits
    torch.testing.assert_close(lx[:, :12], ly[:, :12], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(lx[:, 12:], ly[:, 12:])
    torch.testing.assert_close(model(x[:, :7]).logits, lx[:, :7], rtol=1e-10, atol=1e-10)


def test_conversion_defaults_are_the_options_dataclasses():
    # convert() reads FavorOptions and LinformerOptions, and records what it used.
    import dataclasses

    from linattn import FavorOptions, LinformerOptions

    options = convert(tiny_bert(), "linformer").config.linattn_conversion["options"]
    assert {k: options[k] for k in vars(LinformerOptions())} == vars(LinformerOptions())
    options = convert(tiny_bert(), "favor").config.linattn_conversion["options"]
    for f in dataclasses.fields(FavorOptions):
        if f.name != "num_features":  # None: resolved to d log d per layer
            assert options[f.name] == getattr(FavorOptions(), f.name), f.name
    with pytest.raises(TypeError, match="unknown option"):
        convert(tiny_bert(), "linformer", projection="linear")


def test_linformer_on_a_decoder_is_an_error():
    with pytest.raises(ValueError, match="causal"):
        convert(tiny_llama(), "linformer")


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: convert(m, "favor", proj_dim=8), TypeError, "unknown option"),
        (lambda m: convert(m, "performer"), ValueError, "method"),
        (lambda m: convert(convert(m, "favor"), "favor"), ValueError, "already converted"),
        (lambda m: convert(m, "favor", kernel="nope"), ValueError, "kernel"),
    ],
    ids=["unknown-option", "unknown-method", "twice", "bad-kernel"],
)
def test_bad_conversions_raise(call, exc, match):
    with pytest.raises(exc, match=match):
        call(tiny_bert())


def test_bidirectional_only_kernel_on_a_decoder_is_an_error():
    with pytest.raises(ValueError, match="causal"):
        convert(tiny_llama(), "favor", kernel="softmax_opt")


def test_full_4d_mask_is_refused():
    model = convert(tiny_bert(), "favor")
    module = next(iter(converted_layers(model)))
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="key padding mask"):
        linattn_attention(module, q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_unconverted_module_is_explained():
    model = tiny_bert()
    module = model.encoder.layer[0].attention.self
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="convert"):
        linattn_attention(module, q, q, q, None)


# ----------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "make,method,opts",
    [
        (tiny_bert, "favor", {"num_features": 48, "kernel": "softmax_hyp", "seed": 3}),
        (tiny_bert, "linformer", {"proj_dim": 8, "sharing": "layerwise"}),
        (tiny_bert, "linformer", {"proj_dim": 8, "proj_kind": "random", "sharing": "none"}),
        (tiny_llama, "favor", {"num_features": 32}),
    ],
    ids=["bert-favor-hyp", "bert-linformer-layerwise", "bert-linformer-random", "llama-favor"],
)
def test_save_load_round_trip(tmp_path, make, method, opts):
    model = convert(make(), method, **opts)
    if method == "favor":
        redraw_projections(model)  # a non-initial draw must survive too
    if method == "linformer" and opts.get("proj_kind", "linear") == "linear":
        with torch.no_grad():
            for layer in converted_layers(model):
                if layer.linattn.projection is not None:
                    layer.linattn.projection.e.add_(0.5)
    save_converted(model, tmp_path)
    spec = json.loads((tmp_path / "config.json").read_text())["linattn_conversion"]
    assert spec["method"] == method
    loaded = load_converted(tmp_path).eval()
    x = ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    a, b = model(x, attention_mask=mask), loaded(x, attention_mask=mask)
    key = "last_hidden_state" if make is tiny_bert else "logits"
    # float64 rounding only: transformers' own save/load of the unconverted model is not
    # bitwise either (reloaded weights can take other BLAS paths), ~1e-16 here.
    torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)


def test_learned_projection_trains_and_round_trips(tmp_path):
    model = convert(tiny_bert(), "favor", num_features=16, learn_projection=True)
    states = [m.linattn for m in converted_layers(model)]
    assert all(isinstance(s.projection, torch.nn.Parameter) for s in states)
    out = hidden(model, ids(2, 9))
    out.square().sum().backward()
    assert all(s.projection.grad is not None and s.projection.grad.abs().sum() > 0 for s in states)
    with torch.no_grad():
        states[0].projection.mul_(1.5)
    save_converted(model, tmp_path)
    back = load_converted(tmp_path).eval()
    assert back.dtype == torch.float64  # from_pretrained keeps the saved precision
    x = ids(2, 9)
    torch.testing.assert_close(hidden(model, x), hidden(back, x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="redraw"):
        convert(tiny_bert(), "favor", learn_projection=True, redraw_interval=10)


def test_load_of_an_unconverted_model_is_explained(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no linattn conversion"):
        load_converted(tmp_path)


# ----------------------------------------------------------------- recurrent generation
def test_cache_steps_equal_the_parallel_forward():
    model = convert(tiny_llama(), "favor", num_features=32)
    x = ids(2, 15)
    full = model(x).logits
    cache = FavorCache(model)
    # A 6-token prefill, then one token at a time.
    out = [model(x[:, :6], past_key_values=cache, use_cache=True).logits]
    for t in range(6, 15):
        out.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == 15


def test_generate_uses_the_constant_size_state_and_equals_recomputation():
    model = convert(tiny_llama(), "favor", num_features=32)
    prompt = ids(1, 9)
    res = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, FavorCache)
    x = prompt
    for _ in range(12):
        nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
    assert torch.equal(res.sequences, x)
    short = model.generate(
        prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True
    ).past_key_values
    # Same state size after 2 or 12 new tokens: nothing grows with the context.
    assert short.state_bytes() == res.past_key_values.state_bytes() > 0


def test_batched_generation_with_left_padding_equals_one_by_one():
    model = convert(tiny_llama(), "favor", num_features=32)
    a, b = ids(1, 10, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    batch = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, p in ((0, a), (1, b)):
        alone = model.generate(p, max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row, -6:], alone[0, -6:])


def test_beam_search_reorders_the_state():
    model = convert(tiny_llama(), "favor", num_features=32)
    prompt = ids(1, 7)
    beams = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)
    exact_cache = model.generate(
        prompt,
        max_new_tokens=5,
        num_beams=3,
        do_sample=False,
        past_key_values=transformers.DynamicCache(),
    )
    assert torch.equal(beams, exact_cache)


# ----------------------------------------------------------------- distillation
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_distillation_improves_agreement_and_writes_its_log(tmp_path, make):
    teacher = peaky(make().float())
    student = convert(copy.deepcopy(teacher), "favor", num_features=16)
    cfg = DistillConfig(
        steps=30,
        batch_size=8,
        max_length=32,
        lr=1e-3,
        warmup=3,
        eval_every=15,
        checkpoint_every=15,
        train="attention",
    )
    log = distill(
        student,
        teacher,
        ByteTokenizer(),
        TEXTS[:48],
        TEXTS[48:],
        cfg,
        out_dir=tmp_path,
        progress=False,
    )
    assert [r["step"] for r in log] == [0, 15, 30]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == log
    if make is tiny_bert:
        assert log[-1]["hidden_rel_error"] < 0.7 * log[0]["hidden_rel_error"]
    else:
        assert log[-1]["kl"] < 0.7 * log[0]["kl"]
    reloaded = load_converted(tmp_path / "checkpoint").eval()
    tok = ByteTokenizer()
    fn = lm_agreement if make is tiny_llama else embedding_agreement
    a = fn(teacher, student, tok, TEXTS[48:], max_length=32)
    b = fn(teacher, reloaded, tok, TEXTS[48:], max_length=32)
    assert a == b


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_lora_distillation_merges_into_a_plain_converted_model(tmp_path, make):
    pytest.importorskip("peft")
    from linattn.integrations.hf.distill import add_lora, lora_targets, merge_lora

    teacher = peaky(make().float())
    student = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=2)
    names = lora_targets(student)
    linear = (
        {"query", "key", "value"} if make is tiny_bert else {"q_proj", "k_proj", "v_proj", "o_proj"}
    )
    assert {n.rsplit(".", 1)[1] for n in names} == linear and len(names) == 2 * len(linear)
    # Injected adapters start at zero: the function is unchanged; merging keeps it.
    x = ids(2, 12)
    copy_ = copy.deepcopy(student)
    add_lora(copy_, 4)
    with torch.no_grad():
        ref = student(x)[0]
        for n, p in copy_.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a nonzero update, so that merging has something to fold
        adapted = copy_(x)[0]
    assert not torch.allclose(adapted, ref)
    merge_lora(copy_)
    assert not any("lora_" in n for n, _ in copy_.named_parameters())
    torch.testing.assert_close(copy_(x)[0], adapted, rtol=1e-4, atol=1e-5)

    frozen = {
        n: p.clone()
        for n, p in student.named_parameters()
        if "embeddings" in n or "embed_tokens" in n
    }
    cfg = DistillConfig(
        steps=30,
        batch_size=8,
        max_length=32,
        lr=3e-3,
        warmup=3,
        eval_every=15,
        checkpoint_every=15,
        train="lora",
        lora_rank=4,
    )
    log = distill(
        student,
        teacher,
        ByteTokenizer(),
        TEXTS[:48],
        TEXTS[48:],
        cfg,
        out_dir=tmp_path,
        progress=False,
    )
    key = "kl" if make is tiny_llama else "hidden_rel_error"
    assert log[-1][key] < 0.8 * log[0][key]
    # Only adapters and feature maps trained: the embeddings did not move, and the
    # student is a plain converted model again, with every parameter trainable.
    for n, p in student.named_parameters():
        assert "lora_" not in n and p.requires_grad
        if n in frozen:
            assert torch.equal(p, frozen[n])
    reloaded = load_converted(tmp_path / "checkpoint").eval()
    torch.testing.assert_close(reloaded(x)[0], student(x)[0])


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_lora_on_the_blocks_adapts_every_block_linear_and_trains(tmp_path, make):
    pytest.importorskip("peft")
    from linattn.integrations.hf.distill import lora_targets

    teacher = peaky(make().float())
    student = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=2)
    names = lora_targets(student, "blocks")
    # Every nn.Linear of the blocks (2 layers), nothing outside them (pooler, LM head).
    blocks = "encoder.layer." if make is tiny_bert else "model.layers."
    expected = sorted(
        n
        for n, m in student.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(blocks)
    )
    assert sorted(names) == expected
    leaf = (
        {"query", "key", "value", "dense"}
        if make is tiny_bert
        else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert {n.rsplit(".", 1)[1] for n in names} == leaf
    assert set(lora_targets(student)) < set(names)
    with pytest.raises(ValueError, match="where"):
        lora_targets(student, "mlp")
    before = {n: p.clone() for n, p in student.named_parameters()}
    cfg = DistillConfig(
        steps=20,
        batch_size=8,
        max_length=32,
        lr=3e-3,
        warmup=3,
        eval_every=10,
        train="lora",
        lora_rank=4,
        lora_targets="blocks",
    )
    log = distill(
        student,
        teacher,
        ByteTokenizer(),
        TEXTS[:48],
        TEXTS[48:],
        cfg,
        out_dir=tmp_path,
        progress=False,
    )
    key = "kl" if make is tiny_llama else "hidden_rel_error"
    assert log[-1][key] < 0.8 * log[0][key]
    # The merged adapters moved the MLP weights too; the embeddings stayed.
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    mlp = "intermediate.dense" if make is tiny_bert else "mlp.up_proj"
    assert any(mlp in n for n in moved)
    assert not any("embed" in n for n in moved)
    reloaded = load_converted(tmp_path / "checkpoint").eval()
    x = ids(2, 12)
    torch.testing.assert_close(reloaded(x)[0], student.eval()(x)[0])


def test_distill_config_is_checked():
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=-1)
    with pytest.raises(ValueError, match="train"):
        DistillConfig(train="some")
    with pytest.raises(ValueError, match="lora_rank"):
        DistillConfig(train="lora", lora_rank=0)
    with pytest.raises(ValueError, match="lora_targets"):
        DistillConfig(train="lora", lora_targets="mlp")


def test_lm_agreement_in_row_slices_equals_whole_batches(monkeypatch):
    # A decoder's logits are rows x tokens x vocabulary: lm_agreement measures a batch in
    # slices of rows under LOGITS_BUDGET (a 135M decoder's 32 x 512 batch needed ~10 GB)
    # and the numbers are those of the whole batch.
    from linattn.integrations.hf import distill as dmod

    teacher = tiny_llama().double()
    student = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=2).double()
    tok = ByteTokenizer()
    whole = lm_agreement(teacher, student, tok, TEXTS[:10], max_length=24, batch_size=8)
    seen = []
    real = dmod._lm_logits

    def spy(model, batch):
        seen.append(batch["input_ids"].shape[0])
        return real(model, batch)

    monkeypatch.setattr(dmod, "_lm_logits", spy)
    monkeypatch.setattr(dmod, "LOGITS_BUDGET", 3 * 24 * student.config.vocab_size)
    sliced = lm_agreement(teacher, student, tok, TEXTS[:10], max_length=24, batch_size=8)
    assert max(seen) <= 3 and sum(seen) == 2 * 10
    assert sliced.keys() == whole.keys()
    # The logits are float32 (as in every measurement): slicing changes their rounding only.
    for key in whole:
        assert sliced[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-9), key
