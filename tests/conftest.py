import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter (tests/test_triton.py).
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


def naive(q, k, v, w, *, kernel="softmax", causal=False, mask=None, scale=None):
    """The float64 oracle with the same (data-dependent) feature parameters."""
    fm = get_feature_map(kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    params = fm.prepare(w, q, k, mask, scale)
    return favor_naive(q, k, v, fm, params, causal=causal, key_padding_mask=mask)


def projection(m, d, seed=0, dtype=torch.float64):
    return linattn.draw_projection(m, d, generator=gen(seed), dtype=dtype)
