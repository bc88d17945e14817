"""The bidirectional hybrid's far block states (``far_block_sums``) against their n x n
reference, forward and gradients, float64."""

import pytest
import torch

from linattn.ops.favor.window import far_block_sums, far_block_sums_reference


@pytest.mark.parametrize("n,reach", [(1, 0), (2, 0), (5, 1), (9, 2), (7, 6), (4, 9)],
                         ids=lambda x: str(x))
def test_far_block_sums_equal_the_reference(n, reach):
    g = torch.Generator().manual_seed(n * 10 + reach)
    u = torch.randn(2, 3, n, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(far_block_sums(u, reach), far_block_sums_reference(u, reach),
                               rtol=1e-12, atol=1e-12)
    # Block t sees none of the blocks within reach, every other one.
    if n > reach + 1:
        out = far_block_sums(u, reach).detach()
        torch.testing.assert_close(out[:, :, 0], u.detach()[:, :, reach + 1:].sum(2))
    torch.autograd.gradcheck(lambda x: far_block_sums(x, reach), (u,))
    w = torch.randn(2, 3, n, 4, 5, dtype=torch.float64, generator=g)
    (gu,) = torch.autograd.grad((far_block_sums(u, reach) * w).sum(), u)
    (gr,) = torch.autograd.grad((far_block_sums_reference(u, reach) * w).sum(), u)
    torch.testing.assert_close(gu, gr, rtol=1e-12, atol=1e-12)
