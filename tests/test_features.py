"""linattn.features: the kernel registry, the feature maps' formulas and the attributes
the ops read from them."""

import pytest
import torch

import linattn
from conftest import per_head, projection, randn
from linattn.features import exact_features, get_feature_map


def test_kernel_literal_lists_every_kernel():
    # The Literal used in annotations and the registry name the same kernels.
    from typing import get_args

    assert set(get_args(linattn.Kernel)) == set(linattn.KERNELS)
    assert len(get_args(linattn.Kernel)) == len(linattn.KERNELS)


def test_listed():
    assert "hedgehog" in linattn.KERNELS
    assert linattn.KERNELS["hedgehog"].feature_dim(projection(12, 8), 8) == 24
    assert linattn.KERNELS["hedgehog"].feature_dim(None, 8) == 16


def test_formula_and_identity_default():
    x = randn(2, 3, 5, 8)
    w = per_head(3, 6, 8)
    scale = 0.3
    phi = exact_features(x, w, kernel="hedgehog", scale=scale)
    z = torch.einsum("bhnd,hmd->bhnm", x * scale**0.5, w)
    manual = torch.cat(
        [z.exp() / z.exp().sum(-1, keepdim=True), (-z).exp() / (-z).exp().sum(-1, keepdim=True)],
        dim=-1,
    )
    torch.testing.assert_close(phi, manual)
    assert phi.shape == (2, 3, 5, 12) and (phi >= 0).all()
    torch.testing.assert_close(phi[..., :6].sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(
        exact_features(x, None, kernel="hedgehog", scale=scale),
        exact_features(x, eye, kernel="hedgehog", scale=scale),
    )


@pytest.mark.parametrize("kernel", list(linattn.KERNELS))
def test_positive_features_says_whether_every_feature_is_positive(kernel):
    # The ops read a normalizer <= 0 as a row without keys where the features are all
    # positive: the attribute must say exactly that (hedgehog's softmax features are,
    # the trigonometric map's sin/cos are not).
    fm = get_feature_map(kernel)
    x, y = randn(2, 3, 50, 8, seed=1), randn(2, 3, 50, 8, seed=2)
    w = projection(16, 2 * 8 if fm.untied else 8)
    params = fm.prepare(w, x, y, None, 8**-0.5)
    feats = [fm.exact(t, params, is_query=side) for t, side in ((x, True), (y, False))]
    assert fm.positive_features == all(bool((f > 0).all()) for f in feats)


@pytest.mark.parametrize("kernel", list(linattn.KERNELS))
def test_exp2_logits_maps_are_exp2_of_their_logits(kernel):
    # The causal backward and the window's far blocks differentiate only the logits of
    # the maps that say exp2_logits: their stabilized key features must be
    # exp2(L - max L) of _logits2, and the other maps must not claim it.
    fm = get_feature_map(kernel)
    x = randn(2, 3, 20, 8, seed=3)
    w = projection(16, 2 * 8 if fm.untied else 8)
    params = fm.prepare(w, x, x, None, 8**-0.5)
    feats, r = fm.stabilized(x, params, is_query=False)
    if not fm.exp2_logits:
        assert not hasattr(fm, "_logits2")
        return
    logits = fm._logits2(x, params, with_norm=True)
    top = logits.amax(-1, keepdim=True)
    torch.testing.assert_close(feats, (logits - top).exp2())
    torch.testing.assert_close(r, top.squeeze(-1) * torch.log(torch.tensor(2.0)).item())


def test_positive_exp_is_renamed_without_an_alias():
    # 0.x: breaking renames without aliases, listed in CHANGELOG.md.
    fm = get_feature_map("hedgehog")
    assert fm.positive_features is True
    assert get_feature_map("softmax_trig").positive_features is False
    assert not hasattr(fm, "positive_exp")
