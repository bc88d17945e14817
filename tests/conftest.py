import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter (tests/ops/favor/triton/test_triton.py).
# It must be chosen before any test module imports the kernels (@triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import linattn
from linattn.features import get_feature_map
from linattn.ops.favor import favor_naive


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, seed=0, requires_grad=False):
    t = torch.randn(*shape, dtype=dtype, generator=gen(seed))
    return t.requires_grad_(requires_grad)


def naive(
    q,
    k,
    v,
    w,
    *,
    kernel="softmax",
    causal=False,
    mask=None,
    window=None,
    linear_factor=None,
    sinks=0,
    scale=None,
):
    """The float64 oracle (``favor_naive``, L x L) with the same data-dependent feature
    parameters; padded keys and values zeroed first, as ``favor_attention`` does."""
    if mask is not None:
        pad = mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    fm = get_feature_map(kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    params = fm.prepare(w, q, k, mask, scale)
    return favor_naive(
        q,
        k,
        v,
        fm,
        params,
        causal=causal,
        key_padding_mask=mask,
        window=window,
        linear_factor=linear_factor,
        sinks=sinks,
    )


def projection(m, d, seed=0, dtype=torch.float64):
    return linattn.draw_projection(m, d, generator=gen(seed), dtype=dtype)


def per_head(heads, m, d, dtype=torch.float64):
    """A per-head projection ``(heads, m, d)``, one draw per head."""
    return torch.stack([projection(m, d, seed=10 + h, dtype=dtype) for h in range(heads)])
