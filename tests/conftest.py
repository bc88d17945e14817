import functools
import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter
# (tests/ops/favor/triton/test_triton.py).
# It must be chosen before any test module imports the kernels (@triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import linattn
from linattn.features import get_feature_map
from linattn.ops.favor import favor_naive


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def small_matmul_rate(monkeypatch):
    """``linattn.bench.speed.matmul_rate`` on a 512 x 512 matmul instead of 4096 (about
    16 s on one thread of the 2-core machine, for a number the tests never check): the
    benchmark tests check the files and their schema, with the same function."""
    from linattn.bench import speed

    monkeypatch.setattr(speed, "matmul_rate", functools.partial(speed.matmul_rate, n=512))


@pytest.fixture
def compiled_steps(monkeypatch):
    """A list that grows by one entry (the query's shape) for every one-token step that
    goes through the compiled decoding step (``compile_step=True``,
    ``set_compiled_decoding``): tests check the compiled form is the one taken."""
    from linattn.ops.favor.window import step as step_module

    calls = []
    real = step_module.compiled_step_one

    def counting():
        fn = real()

        def run(*args, **kwargs):
            calls.append(tuple(args[0].shape))
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(step_module, "compiled_step_one", counting)
    return calls


@pytest.fixture
def compiled_decisions(monkeypatch):
    """A list that grows by one entry (the cache's shape) for every slot decision that
    goes through the compiled form (``favor_slots_step(compiled=True)``, a slot model
    under ``set_compiled_decoding``): tests check the compiled form is the one taken."""
    from linattn.ops.favor.slots import segments

    calls = []
    real = segments.compiled_decide

    def counting():
        fn = real()

        def run(st, *args, **kwargs):
            calls.append(tuple(st.cache_k.shape))
            return fn(st, *args, **kwargs)

        return run

    monkeypatch.setattr(segments, "compiled_decide", counting)
    return calls


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


# What padded positions may hold: none of it may reach a real token's output.
PADDING_CONTENTS = {"nan": float("nan"), "inf": float("inf"), "big": 1e30, "-big": -1e30}


def fill_padding(t, mask, value):
    """``t (B, H, L, d)`` with the positions where ``mask (B, L)`` is True set to ``value``."""
    t = t.clone()
    t[mask[:, None, :, None].expand_as(t)] = value
    return t


def padded(q, k, v, pad, value, side="right"):
    """q, k, v ``(B, H, L, d)`` padded with ``pad`` positions holding ``value`` on one side:
    returns ``(q, k, v, key_padding_mask, slice of the real positions)``."""
    b, h, length, _ = q.shape
    total = length + pad
    if side == "right":
        mask = torch.arange(total)[None].expand(b, -1) >= length
        sl = slice(0, length)
    else:
        mask = torch.arange(total)[None].expand(b, -1) < pad
        sl = slice(pad, total)
    out = []
    for t in (q, k, v):
        big = t.new_zeros(b, h, total, t.shape[-1])
        big[..., sl, :] = t
        out.append(fill_padding(big, mask, value))
    return (*out, mask, sl)


def length_mask(lengths, total):
    """The ``key_padding_mask (len(lengths), total)`` of right-padded sequences."""
    return torch.arange(total)[None] >= torch.tensor(lengths)[:, None]


# Packed sequences (cu_seqlens): lengths with an empty sequence and one of length 1, and
# the float64 tolerance of a packed call against each sequence alone.
PACKED_LENGTHS = [5, 1, 0, 8, 2]
PACKED_TOL = dict(rtol=1e-10, atol=1e-12)


def cu_seqlens_of(lengths):
    """The int32 ``cu_seqlens (N + 1,)`` offsets of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def spans_of(lengths):
    """``[(start, end)]`` of each packed sequence."""
    out, s = [], 0
    for n in lengths:
        out.append((s, s + n))
        s += n
    return out


def check_grad_shapes(out, *leaves):
    """Backward from ``out.sum()``: each leaf's gradient is None or of the leaf's shape."""
    out.sum().backward()
    for t in leaves:
        assert t.grad is None or t.grad.shape == t.shape
