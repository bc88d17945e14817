"""Statistical properties of the estimators (seeded; bounds of several standard errors)."""

import math

import pytest
import torch

import linattn
from linattn.features import FeatureParams, exact_features, get_feature_map


def _draws(n, m, d, *, orthogonal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        linattn.draw_projection(m, d, orthogonal=orthogonal, generator=g, dtype=torch.float64)
        for _ in range(n)
    ]


def _kernel_estimates(kernel, x, y, draws, params_fn=None):
    est = []
    for w in draws:
        p = params_fn(w) if params_fn else FeatureParams(w, 1.0)
        fx = exact_features(x, w, kernel=kernel, params=p)
        fy = exact_features(y, w, kernel=kernel, params=p)
        est.append((fx * fy).sum(-1))
    return torch.stack(est)  # [draws, pairs]


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "softmax_trig", "softmax_opt"])
@pytest.mark.parametrize("orthogonal", [True, False], ids=["orf", "iid"])
def test_kernel_estimate_unbiased(kernel, orthogonal):
    d, m = 6, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, d, dtype=torch.float64, generator=g) * 0.5
    y = torch.randn(5, d, dtype=torch.float64, generator=g) * 0.5
    fm = get_feature_map(kernel)

    def params_fn(w):
        # FAVOR++ with its data-dependent A for these points (unbiased for any A < 1/8).
        return (
            fm.prepare(w, x[None], y[None], None, 1.0)
            if kernel == "softmax_opt"
            else FeatureParams(w, 1.0)
        )

    if kernel == "softmax_opt":
        p = params_fn(torch.eye(d, dtype=torch.float64))
        assert p.opt_a.item() < 0  # the optimum is a real correction here

        def params_fn(w, p=p):
            return FeatureParams(w, 1.0, p.opt_a, p.opt_b)

    est = _kernel_estimates(
        kernel, x[None], y[None], _draws(4000, m, d, orthogonal=orthogonal), params_fn
    )
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    target = torch.exp((x * y).sum(-1))[None]
    z = ((mean - target) / se).abs()
    assert (z < 4.5).all(), z


def _attention_mse(kernel, q, k, v, draws, **kw):
    exact = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), -1) @ v
    errs = [
        (linattn.favor_attention(q, k, v, w, kernel=kernel, **kw) - exact).square().mean()
        for w in draws
    ]
    return torch.stack(errs).mean()


def test_error_falls_with_num_features():
    g = torch.Generator().manual_seed(2)
    # Normalized inputs (|q~|^2 ~ 1): there the error is variance, falling as 1/m.
    q, k = (torch.randn(256, 16, dtype=torch.float64, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(256, 16, dtype=torch.float64, generator=g)
    mses = [_attention_mse("softmax", q, k, v, _draws(8, m, 16, seed=m)) for m in (8, 32, 128)]
    assert mses[0] > mses[1] > mses[2]


@pytest.mark.slow
def test_orthogonal_beats_iid_paper_setting():
    # The paper's Figure 4 setting: L = 4096, d = 16, m = d.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4096, 16, dtype=torch.float64, generator=g) for _ in range(3))
    orf = _attention_mse("softmax", q, k, v, _draws(6, 16, 16, orthogonal=True, seed=4))
    iid = _attention_mse("softmax", q, k, v, _draws(6, 16, 16, orthogonal=False, seed=4))
    assert orf < iid


def test_orthogonal_beats_iid_small():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(512, 16, dtype=torch.float64, generator=g) for _ in range(3))
    orf = _attention_mse("softmax", q, k, v, _draws(20, 16, 16, orthogonal=True, seed=4))
    iid = _attention_mse("softmax", q, k, v, _draws(20, 16, 16, orthogonal=False, seed=4))
    assert orf < iid


def _estimate_variance(kernel, x, y, draws, params_fn):
    est = _kernel_estimates(kernel, x, y, draws, params_fn)
    return est.var(0).mean() / torch.exp((x * y).sum(-1)).square().mean()


def test_favor_plus_plus_lower_variance_than_favor_plus():
    d = 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, d, dtype=torch.float64, generator=g) * 0.35
    y = torch.randn(1, 64, d, dtype=torch.float64, generator=g) * 0.35
    draws = _draws(400, 16, d, orthogonal=False, seed=6)
    fm = get_feature_map("softmax_opt")
    opt = _estimate_variance("softmax_opt", x, y, draws, lambda w: fm.prepare(w, x, y, None, 1.0))
    pos = _estimate_variance("softmax", x, y, draws, lambda w: FeatureParams(w, 1.0))
    assert opt < 0.9 * pos, (opt, pos)


def test_hyperbolic_lower_variance_than_positive_same_draws():
    d = 16
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 64, d, dtype=torch.float64, generator=g) * 0.35
    y = torch.randn(1, 64, d, dtype=torch.float64, generator=g) * 0.35
    draws = _draws(400, 16, d, orthogonal=False, seed=8)
    hyp = _estimate_variance("softmax_hyp", x, y, draws, lambda w: FeatureParams(w, 1.0))
    pos = _estimate_variance("softmax", x, y, draws, lambda w: FeatureParams(w, 1.0))
    assert hyp < pos, (hyp, pos)
