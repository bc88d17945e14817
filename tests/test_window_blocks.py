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


@pytest.mark.parametrize("window,sinks", [(0, 0), (2, 0), (5, 0), (None, 1), (3, 2)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_favor_plus_plus_hybrid_equals_the_oracle(window, sinks, pad):
    # FAVOR++ moves a per-feature shift from the keys to the queries: the hybrid's queries
    # keep their norm term and must still take the query's side of it.
    import linattn
    from linattn.features import get_feature_map
    from linattn.ops.favor import favor_naive

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 23, 8, dtype=torch.float64, generator=g) for _ in range(3))
    w = linattn.draw_projection(16, 8, dtype=torch.float64, generator=g)
    mask = None
    if pad:
        mask = torch.zeros(2, 23, dtype=torch.bool)
        mask[0, 19:] = True
        mask[1, :4] = True
    fm = get_feature_map("softmax_opt")
    params = fm.prepare(w, q, k, mask, 8 ** -0.5)
    got = linattn.favor_attention(q, k, v, w, kernel="softmax_opt", window=window,
                                  sinks=sinks, key_padding_mask=mask)
    want = favor_naive(q, k, v, fm, params, window=window, sinks=sinks,
                       key_padding_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
