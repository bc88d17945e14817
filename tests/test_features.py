"""linattn.features: the kernel registry and its names."""

import torch

import linattn
from conftest import per_head, projection, randn
from linattn.features import exact_features


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
