"""An empty batch (B = 0) returns the empty shape, as SDPA and nn.MultiheadAttention do
(issue 26, item 6: it used to crash in ``_as_4d``'s ``reshape(0, -1, L, d)``)."""

import pytest
import torch

import linattn
from conftest import projection, randn
from linattn.models import CausalLM, Encoder, ModelConfig

H, L, D, DV = 2, 5, 4, 3
W = projection(8, D)

FAVOR = {
    "bidir": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": 2},
    "window-bidir": {"window": 2},
    "sinks": {"causal": True, "sinks": 1},
    "sinks-bidir": {"sinks": 1},
    "hedgehog-window": {"kernel": "hedgehog", "causal": True, "window": 1, "proj": None},
    "softmax_opt": {"kernel": "softmax_opt"},
    "mask": {"mask": True},
}


def _inputs(requires_grad=True):
    q = randn(0, H, L, D, requires_grad=requires_grad)
    k = randn(0, H, L, D, seed=1, requires_grad=requires_grad)
    v = randn(0, H, L, DV, seed=2, requires_grad=requires_grad)
    return q, k, v


def _check_grads(out, *leaves):
    out.sum().backward()
    for t in leaves:
        assert t.grad is None or t.grad.shape == t.shape


@pytest.mark.parametrize("name", list(FAVOR))
def test_favor_attention_empty_batch(name):
    kw = dict(FAVOR[name])
    w = kw.pop("proj", W)
    if kw.pop("mask", False):
        kw["key_padding_mask"] = torch.zeros(0, L, dtype=torch.bool)
    q, k, v = _inputs()
    out = linattn.favor_attention(q, k, v, w, **kw)
    assert out.shape == (0, H, L, DV) and out.dtype == q.dtype
    _check_grads(out, q, k, v)


@pytest.mark.parametrize("kw", [{}, {"window": 2}, {"window": 2, "sinks": 1}], ids=str)
def test_favor_recurrent_empty_batch(kw):
    q, k, v = _inputs()
    out, state = linattn.favor_recurrent(q, k, v, W, **kw)
    assert out.shape == (0, H, L, DV) and state.kv.shape[:2] == (0, H)
    out2, _ = linattn.favor_recurrent(q, k, v, W, state=state, **kw)
    assert out2.shape == (0, H, L, DV)
    _check_grads(out + out2, q, k, v)


def test_linformer_attention_empty_batch():
    q, k, v = _inputs()
    out = linattn.linformer_attention(q, k, v, randn(3, 8))
    assert out.shape == (0, H, L, DV)
    _check_grads(out, q, k, v)


@pytest.mark.parametrize("window", [None, 2], ids=["linear", "window"])
def test_performer_module_empty_batch(window):
    m = linattn.PerformerAttention(8, 2, num_features=4, causal=True, window=window).double()
    x = randn(L, 0, 8, requires_grad=True)
    out, weights = m(x, x, x)
    assert out.shape == (L, 0, 8) and weights is None
    _check_grads(out, x)
    mb = linattn.PerformerAttention(8, 2, num_features=4, window=window, batch_first=True)
    y = randn(0, 3, 8).float()
    step, state = mb.step(y, None, 0)
    assert step.shape == (0, 3, 8)
    step, _ = mb.step(y, state, 3)
    assert step.shape == (0, 3, 8)


def test_linformer_module_empty_batch():
    m = linattn.LinformerAttention(8, 2, max_seq_len=L, proj_dim=3).double()
    x = randn(L, 0, 8, requires_grad=True)
    out, _ = m(x, x, x)
    assert out.shape == (L, 0, 8)
    _check_grads(out, x)


@pytest.mark.parametrize("attention", ["favor", "exact"])
def test_causal_lm_empty_batch(attention):
    cfg = ModelConfig(
        vocab_size=11, dim=8, heads=2, depth=1, max_seq_len=16, causal=True, attention=attention
    )
    lm = CausalLM(cfg)
    logits = lm(torch.zeros(0, L, dtype=torch.long))
    assert logits.shape == (0, L, 11)
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
    assert Encoder(cfg)(torch.zeros(0, L, dtype=torch.long)).shape == (0, L, 8)
