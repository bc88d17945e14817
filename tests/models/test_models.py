"""Models: encoder, classifier, causal LM, generation, save/load, compile, checkpointing."""

import json
import math

import pytest
import torch

import linattn
from conftest import PACKED_LENGTHS, PACKED_TOL, cu_seqlens_of, spans_of
from linattn.models import CausalLM, Encoder, ModelConfig, SequenceClassifier, load_model

# Attention kinds by the spec names of `linattn train --compare`.
KINDS = {
    "exact": {"attention": "exact"},
    "favor": {"attention": "favor"},
    "favor-relu": {"attention": "favor", "kernel": "relu"},
    "favor-w8": {"attention": "favor", "window": 8},
    "favor-hedgehog": {"attention": "favor", "kernel": "hedgehog"},
    "favor-hedgehog-w8": {"attention": "favor", "kernel": "hedgehog", "window": 8},
}
ATTN = list(KINDS)


def _lm(attention, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40,
        dim=32,
        depth=2,
        heads=4,
        causal=True,
        max_seq_len=128,
        **KINDS[attention],
        **kw,
    )
    return CausalLM(cfg)


def _perturb(m):
    # Learned maps start at the identity: move them, so tests see a trained-like model.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("projection", "log_linear_factor")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("position", ["rotary", "learned", "sinusoidal"])
def test_incremental_logits_equal_parallel(attention, position):
    m = _lm(attention, position=position).double().eval()
    _perturb(m)
    ids = torch.randint(0, 40, (2, 37))
    full = m(ids)
    logits, caches = m.step_logits(ids[:, :10], None, 0)
    outs = [logits]
    for t in range(10, 37):
        logits, caches = m.step_logits(ids[:, t : t + 1], caches, t)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention", ATTN)
def test_greedy_generate_equals_full_recompute(attention):
    m = _lm(attention).double().eval()
    _perturb(m)
    prompt = torch.randint(0, 40, (2, 6))
    out = m.generate(prompt, 10, greedy=True)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def _state_size(state) -> int:
    return sum(t.numel() for t in state if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("attention", ["favor", "favor-hedgehog-w8"])
def test_favor_state_does_not_grow(attention):
    m = _lm(attention).eval()
    _, caches = m.step_logits(torch.randint(0, 40, (1, 100)), None, 0)
    sizes = [_state_size(c) for c in caches]
    assert all(s > 0 for s in sizes)
    for t in range(100, 103):
        _, caches = m.step_logits(torch.randint(0, 40, (1, 1)), caches, t)
        assert [_state_size(c) for c in caches] == sizes


def test_sampling_seeded_and_filtered():
    m = _lm("favor").eval()
    prompt = torch.randint(0, 40, (3, 4))
    a = m.generate(
        prompt, 8, top_k=5, top_p=0.8, temperature=0.7, generator=torch.Generator().manual_seed(1)
    )
    b = m.generate(
        prompt, 8, top_k=5, top_p=0.8, temperature=0.7, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b) and a.shape == (3, 12)
    one = m.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, m.generate(prompt, 5, greedy=True))


CLASSIFIER_KINDS = {**KINDS, "linformer": {"attention": "linformer"}}


@pytest.mark.parametrize("attention", list(CLASSIFIER_KINDS))
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_padding_aware(attention, pooling):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=30,
        dim=32,
        depth=2,
        heads=4,
        **CLASSIFIER_KINDS[attention],
        num_classes=3,
        pooling=pooling,
        max_seq_len=64,
        proj_dim=16,
        position="learned" if attention == "linformer" else "rotary",
    )
    m = SequenceClassifier(cfg).double().eval()
    _perturb(m)
    ids = torch.randint(1, 30, (1, 20))
    ref = m(ids)
    padded = torch.cat([ids, torch.randint(1, 30, (1, 9))], 1)
    mask = torch.arange(29)[None] >= 20
    torch.testing.assert_close(m(padded, mask), ref, rtol=1e-9, atol=1e-9)


# (The learned map with a window trains in test_hedgehog_window_model_trains.)
@pytest.mark.parametrize("attention", ["exact", "favor", "favor-relu", "linformer"])
def test_tiny_model_overfits(attention):
    torch.manual_seed(0)
    causal = attention != "linformer"
    cfg = ModelConfig(
        vocab_size=16,
        dim=32,
        depth=2,
        heads=4,
        **CLASSIFIER_KINDS[attention],
        causal=causal,
        max_seq_len=32,
        proj_dim=16,
        position="learned" if attention == "linformer" else "rotary",
        num_classes=None if causal else 4,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (8, 24), generator=g)
    if causal:
        m = CausalLM(cfg)

        def loss_fn():
            return m.loss(ids)
    else:
        m = SequenceClassifier(cfg)
        labels = torch.randint(0, 4, (8,), generator=g)

        def loss_fn():
            return torch.nn.functional.cross_entropy(m(ids), labels)

    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = loss_fn().item()
    for _ in range(150):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first and loss.item() < 0.6, (first, loss.item())


@pytest.mark.parametrize("attention", ["favor", "favor-hedgehog-w8", "linformer"])
def test_save_load_round_trip(tmp_path, attention):
    torch.manual_seed(0)
    learned = attention == "favor-hedgehog-w8"
    cfg = ModelConfig(
        vocab_size=20,
        dim=16,
        depth=2,
        heads=2,
        **CLASSIFIER_KINDS[attention],
        num_classes=2,
        max_seq_len=32,
        proj_dim=8,
        redraw_interval=None if learned else 1,
        linformer_sharing="layerwise",
        proj_kind="random",
        position="learned" if attention == "linformer" else "rotary",
    )
    m = SequenceClassifier(cfg)
    m(torch.randint(0, 20, (2, 10)))  # a training forward: redraw once
    _perturb(m)
    m.eval()
    m.save(tmp_path)
    loaded = load_model(tmp_path).eval()
    ids = torch.randint(0, 20, (3, 12))
    assert torch.equal(m(ids), loaded(ids))


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = _lm("favor", checkpointing=ckpt, redraw_interval=1)
        ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(3))
        m.loss(ids).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        # One redraw per training forward, checkpointing or not.
        assert all(int(a.draws) == 1 for a in m.encoder.performer_layers())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # The default (inductor) backend, inference and a training step.
    m = _lm("favor")
    ids = torch.randint(0, 40, (2, 33))
    compiled = torch.compile(m)
    m.eval()
    torch.testing.assert_close(compiled(ids), m(ids), rtol=1e-4, atol=1e-4)
    m.train()
    grads = []
    for fn in (compiled, m):
        m.zero_grad()
        logits = fn(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"dim": 30, "heads": 4}, r"dim \(30\) must be divisible by heads"),
        ({"attention": "sparse"}, "attention must be one of"),
        ({"attention": "softmax"}, "attention must be one of"),
        ({"attention": "relu"}, "attention must be one of"),
        ({"attention": "linformer", "causal": True}, "cannot be causal"),
        ({"attention": "linformer"}, "rotary positions are not defined for Linformer"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"kernel": "cosine"}, "kernel must be one of"),
        ({"attention": "exact", "kernel": "relu"}, "needs attention='favor'"),
        ({"attention": "exact", "window": 4}, "window applies to attention='favor' only"),
        ({"window": -1}, "window must be None or an int >= 0"),
        ({"kernel": "softmax_opt", "causal": True}, "bidirectional only"),
        ({"kernel": "hedgehog", "redraw_interval": 5}, "not redrawn"),
    ],
    ids=[
        "divisible",
        "unknown",
        "old-softmax",
        "old-relu",
        "linformer-causal",
        "linformer-rotary",
        "vocab",
        "unknown-kernel",
        "kernel-without-favor",
        "window-without-favor",
        "negative-window",
        "opt-causal",
        "hedgehog-redraw",
    ],
)
def test_bad_config(kw, match):
    args = {"vocab_size": 10, **kw}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**args)


@pytest.mark.parametrize("model", ["encoder", "classifier", "lm"])
def test_hedgehog_window_model_trains(model):
    # A few steps move the loss, and every layer's map and window factor get gradients.
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=24,
        dim=32,
        depth=2,
        heads=4,
        attention="favor",
        kernel="hedgehog",
        window=8,
        causal=model == "lm",
        max_seq_len=64,
        num_classes=3 if model == "classifier" else None,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 24, (4, 29), generator=g)
    if model == "lm":
        m = CausalLM(cfg)
        params = m.encoder

        def loss_fn():
            return m.loss(ids)
    elif model == "classifier":
        m = SequenceClassifier(cfg)
        params = m.encoder
        labels = torch.randint(0, 3, (4,), generator=g)

        def loss_fn():
            return torch.nn.functional.cross_entropy(m(ids), labels)
    else:
        m = params = Encoder(cfg)
        target = torch.randn(4, 29, 32, generator=g)

        def loss_fn():
            return (m(ids) - target).square().mean()

    layers = params.performer_layers()
    assert len(layers) == 2 and all(a.kernel == "hedgehog" and a.window == 8 for a in layers)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = loss_fn().item()
    for _ in range(8):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        for a in layers:
            assert a.projection.grad.abs().sum() > 0
            assert a.log_linear_factor.grad.abs().min() > 0
        opt.step()
    assert loss_fn().item() < first
    # The map and the factors moved from their initial values.
    eye = torch.eye(8).expand(4, 8, 8)
    assert all(not torch.equal(a.projection.detach(), eye) for a in layers)


# The FAVOR+ buffers of every layer: what a state_dict of another kind lacks.
FAVOR_ONLY = ("projection", "redraw_key", "draws", "calls")


@pytest.mark.parametrize(
    "src,dst",
    [("exact", "favor"), ("favor", "exact"), ("favor", "favor-relu")],
    ids=["exact-to-favor", "favor-to-exact", "favor-to-relu"],
)
def test_state_dict_moves_between_attention_kinds(src, dst):
    a, b = _lm(src), _lm(dst)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1)
    result = b.load_state_dict(a.state_dict(), strict=False)
    favor_keys = {f"encoder.blocks.{i}.attn.inner.{n}" for i in range(2) for n in FAVOR_ONLY}
    missing = favor_keys if src == "exact" else set()
    unexpected = favor_keys if dst == "exact" else set()
    assert set(result.missing_keys) == missing
    assert set(result.unexpected_keys) == unexpected
    # Every shared weight arrived (same names, same shapes).
    sb = b.state_dict()
    for name, t in a.state_dict().items():
        if name.rsplit(".", 1)[-1] not in FAVOR_ONLY:
            assert torch.equal(sb[name], t), name


def test_exact_model_matches_favor_model_with_a_window_covering_the_sequence():
    # The same weights under exact attention and under FAVOR+ with w >= L (exact inside
    # the window): the outputs agree, so the parameters mean the same in both.
    a, b = _lm("exact").double().eval(), _lm("favor", window=64).double().eval()
    b.load_state_dict(a.state_dict(), strict=False)
    ids = torch.randint(0, 40, (2, 23))
    torch.testing.assert_close(b(ids), a(ids), rtol=1e-9, atol=1e-9)


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


def test_model_out_of_vocabulary_ids_are_named():
    from linattn.models import CausalLM

    lm = CausalLM(_cfg(causal=True))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        lm(torch.full((1, 3), 50))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        lm(torch.full((1, 3), -1))


def test_attention_literal_is_the_list_of_attention_kinds():
    from typing import get_args

    from linattn.models.config import ATTENTIONS, Attention

    assert ATTENTIONS == get_args(Attention) == ("exact", "favor", "linformer")


def test_model_config_reaches_the_layers_and_generation():
    from linattn.models import CausalLM, ModelConfig

    cfg = ModelConfig(
        vocab_size=50,
        dim=16,
        depth=2,
        heads=2,
        attention="favor",
        window=2,
        sinks=3,
        causal=True,
        max_seq_len=64,
    )
    assert cfg.favor_options().sinks == 3
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).sinks == 3
    model = CausalLM(cfg).double().eval()
    layers = model.encoder.performer_layers()
    assert layers and all(a.sinks == 3 and a.window == 2 for a in layers)
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    logits, caches = model.step_logits(ids[:, :6], None, 0)
    steps = [logits]
    for t in range(6, 17):
        logits, caches = model.step_logits(ids[:, t : t + 1], caches, t)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "attention,position",
    [("favor", "learned"), ("favor", "rotary"), ("exact", "sinusoidal"), ("linformer", "learned")],
)
def test_causal_lm_packed_equals_each_alone(attention, position):
    from linattn.models import CausalLM, Encoder, ModelConfig

    causal = attention != "linformer"
    cfg = ModelConfig(
        vocab_size=13,
        dim=8,
        heads=2,
        depth=2,
        max_seq_len=8,
        causal=causal,
        attention=attention,
        position=position,
        window=1 if attention == "favor" else None,
        proj_dim=4,
    )
    torch.manual_seed(0)
    model = (CausalLM(cfg) if causal else Encoder(cfg)).double().eval()
    ids = torch.randint(0, 13, (1, sum(PACKED_LENGTHS)))
    out = model(ids, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS))
    parts = [model(ids[:, s:e]) for s, e in spans_of(PACKED_LENGTHS) if e > s]
    torch.testing.assert_close(out, torch.cat(parts, 1), **PACKED_TOL)
    if causal:
        # The packed loss: each document's own next tokens, token-weighted.
        loss = model.loss(ids, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS))
        total, count = 0.0, 0
        for s, e in spans_of(PACKED_LENGTHS):
            if e - s >= 2:
                total = total + model.loss(ids[:, s:e]) * (e - s - 1)
                count += e - s - 1
        torch.testing.assert_close(loss, total / count, **PACKED_TOL)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_causal_lm_empty_batch(attention):
    cfg = ModelConfig(
        vocab_size=11, dim=8, heads=2, depth=1, max_seq_len=16, causal=True, attention=attention
    )
    lm = CausalLM(cfg)
    logits = lm(torch.zeros(0, 5, dtype=torch.long))
    assert logits.shape == (0, 5, 11)
    logits.sum().backward()


def test_linformer_encoder_empty_batch():
    cfg = ModelConfig(
        vocab_size=11,
        dim=8,
        heads=2,
        depth=1,
        max_seq_len=16,
        attention="linformer",
        position="learned",
        proj_dim=4,
    )
    assert Encoder(cfg)(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 8)
