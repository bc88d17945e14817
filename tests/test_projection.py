import math

import pytest
import torch

import linattn
from conftest import gen


@pytest.mark.parametrize("m,d", [(8, 8), (20, 8), (3, 16), (256, 64)], ids=str)
@pytest.mark.parametrize("orthogonal", [True, False], ids=["orf", "iid"])
def test_shape_dtype_device(m, d, orthogonal):
    w = linattn.draw_projection(m, d, orthogonal=orthogonal, dtype=torch.float64)
    assert w.shape == (m, d) and w.dtype == torch.float64 and w.device.type == "cpu"
    assert linattn.draw_projection(m, d).dtype == torch.float32


def test_orthogonal_blocks_and_scalings():
    d = 8
    w = linattn.draw_projection(20, d, scaling="sqrt_d", dtype=torch.float64, generator=gen(1))
    torch.testing.assert_close(w.norm(dim=-1), torch.full((20,), math.sqrt(d), dtype=w.dtype))
    for block in (w[:8], w[8:16], w[16:]):
        g = block @ block.T
        torch.testing.assert_close(g, torch.eye(len(block), dtype=w.dtype) * d)
    chi = linattn.draw_projection(4096, d, dtype=torch.float64, generator=gen(2))
    norms2 = chi.norm(dim=-1) ** 2
    # chi^2 with d degrees of freedom: mean d, variance 2d.
    assert abs(norms2.mean().item() - d) < 4 * math.sqrt(2 * d / 4096)
    assert norms2.std() > 1.0  # not all equal


def test_generator_reproducible():
    a = linattn.draw_projection(32, 16, generator=gen(5))
    b = linattn.draw_projection(32, 16, generator=gen(5))
    c = linattn.draw_projection(32, 16, generator=gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_haar_sign_correction():
    # Without Q * sign(diag(R)) the first coordinate of the first direction is biased
    # (QR's sign convention); with it, each orthonormal row is uniform on the sphere.
    g = gen(3)
    firsts = (
        torch.stack(
            [
                linattn.draw_projection(4, 4, scaling="sqrt_d", dtype=torch.float64, generator=g)[
                    0, 0
                ]
                for _ in range(3000)
            ]
        )
        / 2.0
    )
    # Uniform on the sphere in 4 dims: E = 0, Var = 1/4.
    assert abs(firsts.mean().item()) < 4 * math.sqrt(0.25 / 3000)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_features": 0, "head_dim": 4}, ValueError, "num_features must be >= 1"),
        ({"num_features": 4, "head_dim": 2.0}, TypeError, "head_dim must be an int"),
        ({"num_features": 4, "head_dim": 4, "scaling": "unit"}, ValueError, "scaling"),
        ({"num_features": 4, "head_dim": 4, "generator": 3}, TypeError, "generator"),
    ],
    ids=["zero-features", "float-dim", "bad-scaling", "bad-generator"],
)
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        linattn.draw_projection(**kwargs)
