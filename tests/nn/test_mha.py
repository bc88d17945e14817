"""What the nn.MultiheadAttention-shaped modules share (``nn/_mha.py``): the layout and
weights of ``nn.MultiheadAttention``, padding contents that never reach the real tokens,
sizes checked up front, packed sequences (``cu_seqlens``) and empty batches."""

import pytest
import torch
from torch import nn

import linattn
from conftest import (
    PACKED_LENGTHS,
    PACKED_TOL,
    check_grad_shapes,
    cu_seqlens_of,
    randn,
    spans_of,
)


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


# ------------------------------------------------------------------ MHA layout
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


def _packed_input(lengths, width, seed=30):
    return randn(1, sum(lengths), width, seed=seed, requires_grad=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: linattn.PerformerAttention(8, 2, num_features=6, causal=True, batch_first=True),
        lambda: linattn.PerformerAttention(
            8, 2, num_features=6, window=1, sinks=1, rotary=True, batch_first=True
        ),
        lambda: linattn.PerformerAttention(8, 2, kernel="hedgehog", window=2, batch_first=True),
        lambda: linattn.LinformerAttention(8, 2, max_seq_len=8, proj_dim=3, batch_first=True),
        lambda: linattn.LinformerAttention(
            8, 2, max_seq_len=8, proj_dim=3, proj_kind="mean", batch_first=True
        ),
        lambda: linattn.ExactAttention(8, 2, causal=True, rotary=True, batch_first=True),
    ],
    ids=["favor-causal", "favor-window-sinks-rotary", "hedgehog", "linformer", "lin-mean", "exact"],
)
def test_modules_packed_equal_each_alone(make):
    m = make().double()
    x = _packed_input(PACKED_LENGTHS, 8)
    out, _ = m(x, x, x, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS))
    out.sum().backward()
    got = x.grad.clone()
    x.grad = None
    parts = [m(x[:, s:e], x[:, s:e], x[:, s:e])[0] for s, e in spans_of(PACKED_LENGTHS) if e > s]
    want = torch.cat(parts, 1)
    want.sum().backward()
    torch.testing.assert_close(out, want, **PACKED_TOL)
    torch.testing.assert_close(got, x.grad, **PACKED_TOL)


def test_module_packed_sequence_first_layout():
    m = linattn.PerformerAttention(8, 2, num_features=6, causal=True).double()
    x = _packed_input(PACKED_LENGTHS, 8).transpose(0, 1)  # (T, 1, E)
    out, _ = m(x, x, x, cu_seqlens=cu_seqlens_of(PACKED_LENGTHS))
    s, e = spans_of(PACKED_LENGTHS)[3]
    torch.testing.assert_close(out[s:e], m(x[s:e], x[s:e], x[s:e])[0], **PACKED_TOL)
    with pytest.raises(ValueError, match=r"cu_seqlens and key_padding_mask cannot be combined"):
        m(
            x,
            x,
            x,
            cu_seqlens=cu_seqlens_of(PACKED_LENGTHS),
            key_padding_mask=torch.zeros(1, 16, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match=r"cu_seqlens must end at T = 16"):
        m(x, x, x, cu_seqlens=cu_seqlens_of([3, 4]))


@pytest.mark.parametrize("window", [None, 2], ids=["linear", "window"])
def test_performer_module_empty_batch(window):
    m = linattn.PerformerAttention(8, 2, num_features=4, causal=True, window=window).double()
    x = randn(5, 0, 8, requires_grad=True)
    out, weights = m(x, x, x)
    assert out.shape == (5, 0, 8) and weights is None
    check_grad_shapes(out, x)
    mb = linattn.PerformerAttention(8, 2, num_features=4, window=window, batch_first=True)
    y = randn(0, 3, 8).float()
    step, state = mb.step(y, None, 0)
    assert step.shape == (0, 3, 8)
    step, _ = mb.step(y, state, 3)
    assert step.shape == (0, 3, 8)


def test_linformer_module_empty_batch():
    m = linattn.LinformerAttention(8, 2, max_seq_len=5, proj_dim=3).double()
    x = randn(5, 0, 8, requires_grad=True)
    out, _ = m(x, x, x)
    assert out.shape == (5, 0, 8)
    check_grad_shapes(out, x)
