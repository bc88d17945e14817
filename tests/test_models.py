"""Models: encoder, classifier, causal LM, generation, save/load, compile, checkpointing."""

import pytest
import torch

from linattn.models import CausalLM, ModelConfig, SequenceClassifier, load_model

ATTN = ["softmax", "favor", "relu"]


def _lm(attention, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, depth=2, heads=4, causal=True,
                      attention=attention, max_seq_len=128, **kw)
    return CausalLM(cfg)


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("position", ["rotary", "learned", "sinusoidal"])
def test_incremental_logits_equal_parallel(attention, position):
    m = _lm(attention, position=position).double().eval()
    ids = torch.randint(0, 40, (2, 37))
    full = m(ids)
    logits, caches = m.step_logits(ids[:, :10], None, 0)
    outs = [logits]
    for t in range(10, 37):
        logits, caches = m.step_logits(ids[:, t:t + 1], caches, t)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention", ATTN)
def test_greedy_generate_equals_full_recompute(attention):
    m = _lm(attention).double().eval()
    prompt = torch.randint(0, 40, (2, 6))
    out = m.generate(prompt, 10, greedy=True)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_favor_state_does_not_grow():
    m = _lm("favor").eval()
    _, caches = m.step_logits(torch.randint(0, 40, (1, 100)), None, 0)
    sizes = [c.kv.numel() for c in caches]
    _, caches = m.step_logits(torch.randint(0, 40, (1, 1)), caches, 100)
    assert [c.kv.numel() for c in caches] == sizes


def test_sampling_seeded_and_filtered():
    m = _lm("favor").eval()
    prompt = torch.randint(0, 40, (3, 4))
    a = m.generate(prompt, 8, top_k=5, top_p=0.8, temperature=0.7,
                   generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 8, top_k=5, top_p=0.8, temperature=0.7,
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 12)
    one = m.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, m.generate(prompt, 5, greedy=True))


@pytest.mark.parametrize("attention", ["softmax", "favor", "relu", "linformer"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_padding_aware(attention, pooling):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, dim=32, depth=2, heads=4, attention=attention,
                      num_classes=3, pooling=pooling, max_seq_len=64, proj_dim=16,
                      position="learned" if attention == "linformer" else "rotary")
    m = SequenceClassifier(cfg).double().eval()
    ids = torch.randint(1, 30, (1, 20))
    ref = m(ids)
    padded = torch.cat([ids, torch.randint(1, 30, (1, 9))], 1)
    mask = torch.arange(29)[None] >= 20
    torch.testing.assert_close(m(padded, mask), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention", ["softmax", "favor", "relu", "linformer"])
def test_tiny_model_overfits(attention):
    torch.manual_seed(0)
    causal = attention != "linformer"
    cfg = ModelConfig(vocab_size=16, dim=32, depth=2, heads=4, attention=attention,
                      causal=causal, max_seq_len=32, proj_dim=16,
                      position="learned" if attention == "linformer" else "rotary",
                      num_classes=None if causal else 4)
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


@pytest.mark.parametrize("attention", ["favor", "linformer"])
def test_save_load_round_trip(tmp_path, attention):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, dim=16, depth=2, heads=2, attention=attention,
                      num_classes=2, max_seq_len=32, proj_dim=8, redraw_interval=1,
                      linformer_sharing="layerwise", linformer_projection="random",
                      position="learned" if attention == "linformer" else "rotary")
    m = SequenceClassifier(cfg)
    m(torch.randint(0, 20, (2, 10)))  # a training forward: redraw once
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
        ({"attention": "linformer", "causal": True}, "cannot be causal"),
        ({"attention": "linformer"}, "rotary positions are not defined for Linformer"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
    ],
    ids=["divisible", "unknown", "linformer-causal", "linformer-rotary", "vocab"],
)
def test_bad_config(kw, match):
    args = {"vocab_size": 10, **kw}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**args)
