"""An empty batch (B = 0) returns the empty shape, as SDPA and nn.MultiheadAttention do
(issue 26, item 6: it used to crash in ``_as_4d``'s ``reshape(0, -1, L, d)``). The
modules' and models' empty batches are tested in ``tests/nn/test_mha.py`` and
``tests/models/test_models.py``."""

import pytest
import torch

import linattn
from conftest import check_grad_shapes, projection, randn

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


@pytest.mark.parametrize("name", list(FAVOR))
def test_favor_attention_empty_batch(name):
    kw = dict(FAVOR[name])
    w = kw.pop("proj", W)
    if kw.pop("mask", False):
        kw["key_padding_mask"] = torch.zeros(0, L, dtype=torch.bool)
    q, k, v = _inputs()
    out = linattn.favor_attention(q, k, v, w, **kw)
    assert out.shape == (0, H, L, DV) and out.dtype == q.dtype
    check_grad_shapes(out, q, k, v)


@pytest.mark.parametrize("kw", [{}, {"window": 2}, {"window": 2, "sinks": 1}], ids=str)
def test_favor_recurrent_empty_batch(kw):
    q, k, v = _inputs()
    out, state = linattn.favor_recurrent(q, k, v, W, **kw)
    assert out.shape == (0, H, L, DV) and state.kv.shape[:2] == (0, H)
    out2, _ = linattn.favor_recurrent(q, k, v, W, state=state, **kw)
    assert out2.shape == (0, H, L, DV)
    check_grad_shapes(out + out2, q, k, v)


def test_linformer_attention_empty_batch():
    q, k, v = _inputs()
    out = linattn.linformer_attention(q, k, v, randn(3, 8))
    assert out.shape == (0, H, L, DV)
    check_grad_shapes(out, q, k, v)
