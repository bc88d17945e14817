"""Linformer: the functional op against per-sequence oracles, in float64 (the module:
``tests/nn/test_linformer_module.py``)."""

import pytest
import torch
from torch.autograd import gradcheck

import linattn
from conftest import PADDING_CONTENTS, length_mask, padded, randn
from linattn.ops.linformer import linformer_naive

# ---------------------------------------------------------------- functional


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-E", "per-head-E"])
@pytest.mark.parametrize("separate_v", [False, True], ids=["E=F", "E,F"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_functional_matches_oracle(per_head, separate_v, masked):
    q, k, v = randn(3, 2, 9, 4, seed=0), randn(3, 2, 21, 4, seed=1), randn(3, 2, 21, 5, seed=2)
    shape = (2, 6, 32) if per_head else (6, 32)
    e = randn(*shape, seed=3)
    f = randn(*shape, seed=4) if separate_v else None
    mask = length_mask([21, 13, 1], 21) if masked else None
    out = linattn.linformer_attention(q, k, v, e, f, key_padding_mask=mask, scale=0.3)
    ref = linformer_naive(q, k, v, e, f, key_padding_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_functional_gradcheck():
    q, k, v = (randn(2, 2, 7, 3, seed=s, requires_grad=True) for s in range(3))
    e = randn(2, 4, 10, seed=5, requires_grad=True)
    mask = length_mask([7, 4], 7)

    def fn(q, k, v, e):
        return linattn.linformer_attention(q, k, v, e, key_padding_mask=mask)

    assert gradcheck(fn, (q, k, v, e))


@pytest.mark.parametrize("side", ["right", "left"])
def test_functional_padding_invariance(side):
    q, k, v = randn(1, 2, 5, 4, seed=0), randn(1, 2, 11, 4, seed=1), randn(1, 2, 11, 4, seed=2)
    e = randn(6, 20, seed=3)
    ref = linattn.linformer_attention(q, k, v, e)
    junk = randn(1, 2, 6, 4, seed=9) * 100
    if side == "right":
        kp, vp = torch.cat([k, junk], -2), torch.cat([v, junk], -2)
        mask = length_mask([11], 17)
    else:
        kp, vp = torch.cat([junk, k], -2), torch.cat([junk, v], -2)
        mask = ~length_mask([6], 17)
    out = linattn.linformer_attention(q, kp, vp, e, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"e": randn(6, 8)}, ValueError, r"sequence length 10 exceeds the 8 columns of proj_k"),
        (
            {"e": randn(3, 6, 20)},
            ValueError,
            r"proj_k must have shape \(proj_dim, n\) or \(heads, proj_dim, n\) = \(2, proj_dim, n\)",
        ),
        ({"f": randn(5, 20)}, ValueError, r"same proj_dim"),
        ({"e": randn(6, 20).float()}, TypeError, r"proj_k has dtype torch.float32"),
        ({"mask": torch.zeros(1, 10)}, TypeError, r"key_padding_mask must have dtype"),
    ],
    ids=["too-long", "head-count", "kdim-mismatch", "dtype", "mask-dtype"],
)
def test_functional_errors(kw, exc, match):
    q = randn(1, 2, 10, 4)
    with pytest.raises(exc, match=match):
        linattn.linformer_attention(
            q, q, q, kw.get("e", randn(6, 20)), kw.get("f"), key_padding_mask=kw.get("mask")
        )


def test_functional_compressed_equals_projecting_inside():
    # compressed=True takes K' = E K, V' = F V as given: the same attention.
    q, k, v = randn(2, 2, 9, 4, seed=0), randn(2, 2, 13, 4, seed=1), randn(2, 2, 13, 5, seed=2)
    e, f = randn(6, 20, seed=3), randn(6, 20, seed=4)
    ref = linattn.linformer_attention(q, k, v, e, f, scale=0.7)
    out = linattn.linformer_attention(q, e[:, :13] @ k, f[:, :13] @ v, scale=0.7, compressed=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, r"proj_k is required"),
        ({"proj_k": randn(6, 20), "compressed": True}, r"proj_k must be None with compressed"),
        (
            {"key_padding_mask": torch.zeros(1, 10, dtype=torch.bool), "compressed": True},
            r"key_padding_mask must be None with compressed",
        ),
        ({"proj_k": randn(6, 20), "dropout_p": 1.0}, r"dropout_p must be a number in \[0, 1\)"),
    ],
    ids=["no-proj", "proj-and-compressed", "mask-and-compressed", "dropout"],
)
def test_functional_compressed_errors(kw, match):
    q = randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match=match):
        linattn.linformer_attention(q, q, q, **kw)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("content", list(PADDING_CONTENTS), ids=list(PADDING_CONTENTS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_linformer_padding_contents_do_not_matter(content, side):
    q, k, v = (randn(2, 2, 9, 8, seed=s) for s in range(3))
    e = randn(5, 16, seed=7)
    ref = linattn.linformer_attention(q, k, v, e)
    _, kp, vp, mask, _ = padded(q, k, v, 4, PADDING_CONTENTS[content], side)
    out = linattn.linformer_attention(q, kp, vp, e, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ NaN in real keys
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
