"""Each validation error names the argument and shows the shapes it got."""

import math

import pytest
import torch

import linattn
from conftest import projection, randn

Q = randn(2, 3, 5, 4)
W = projection(8, 4)


def call(**kw):
    args = {"q": Q, "k": Q, "v": Q, "projection": W}
    args.update(kw)
    q, k, v, w = (args.pop(n) for n in ("q", "k", "v", "projection"))
    return linattn.favor_attention(q, k, v, w, **args)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"q": randn(5)}, ValueError, r"q must have at least 2 dimensions, got shape \(5\)"),
        (
            {"k": randn(2, 3, 5, 6), "v": randn(2, 3, 5, 6)},
            ValueError,
            r"same head_dim.*q \(2, 3, 5, 4\), k \(2, 3, 5, 6\)",
        ),
        ({"k": randn(3, 3, 5, 4)}, ValueError, r"leading \(batch, heads\).*k \(3, 3, 5, 4\)"),
        ({"v": randn(2, 3, 6, 4)}, ValueError, r"k and v must have the same length"),
        ({"k": randn(2, 3, 5, 4)[None]}, ValueError, r"same number of dimensions"),
        ({"q": Q.float()}, TypeError, r"share a dtype"),
        ({"q": Q.long()}, TypeError, r"q must be a floating tensor"),
        ({"q": "x"}, TypeError, r"q must be a torch.Tensor, got str"),
        (
            {"projection": projection(8, 5)},
            ValueError,
            r"projection must have shape \(num_features, head_dim\) = \(m, 4\).*got \(8, 5\)",
        ),
        ({"projection": None}, ValueError, r"kernel='softmax' uses random features"),
        (
            {"key_padding_mask": torch.zeros(2, 5)},
            TypeError,
            r"key_padding_mask must have "
            r"dtype torch.bool",
        ),
        (
            {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)},
            ValueError,
            r"key_padding_mask must have shape \(batch, Lk\) = \(2, 5\).*got \(2, 4\)",
        ),
        (
            {"causal": True, "k": randn(2, 3, 6, 4), "v": randn(2, 3, 6, 4)},
            ValueError,
            r"causal=True needs Lq == Lk.*q \(2, 3, 5, 4\), k \(2, 3, 6, 4\)",
        ),
        ({"causal": 1}, TypeError, r"causal must be a bool"),
        ({"kernel": "cosine"}, ValueError, r"kernel must be one of 'softmax'.*got 'cosine'"),
        (
            {"kernel": "softmax_opt", "causal": True},
            ValueError,
            r"'softmax_opt' depends on every query and key",
        ),
        ({"scale": -1.0}, ValueError, r"scale must be a finite number > 0, got -1.0"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1, got 0"),
    ],
    ids=[
        "rank",
        "head-dim",
        "batch",
        "kv-length",
        "ranks-differ",
        "dtype-mix",
        "int-dtype",
        "not-tensor",
        "proj-width",
        "proj-missing",
        "mask-dtype",
        "mask-shape",
        "causal-cross",
        "causal-type",
        "kernel-name",
        "opt-causal",
        "scale",
        "chunk",
    ],
)
def test_favor_attention_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


def test_recurrent_state_errors():
    _, state = linattn.favor_recurrent(Q, Q, Q, W)
    with pytest.raises(ValueError, match=r"state.kv must have shape \(B, H, M, dv \+ 1\)"):
        linattn.favor_recurrent(Q, Q, randn(2, 3, 5, 3), W, state=state)
    with pytest.raises(TypeError, match="state must be a FavorState"):
        linattn.favor_recurrent(Q, Q, Q, W, state=(state.kv, state.stab, 1))
    with pytest.raises(ValueError, match=r"\(B, H, n, d\)"):
        linattn.favor_recurrent(Q[0], Q[0], Q[0], W)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("shape", [(), (3,)], ids=["scalar", "per-head"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_linear_factor_must_be_finite(bad, shape, causal):
    # NaN fails `< 0`, so it used to pass the check and give NaN outputs silently.
    lf = torch.ones(shape, dtype=torch.float64)
    lf.view(-1)[0] = bad
    with pytest.raises(ValueError, match=r"linear_factor must be finite"):
        call(causal=causal, window=1, linear_factor=lf)
    with pytest.raises(ValueError, match=r"linear_factor must be finite"):
        linattn.favor_recurrent(Q, Q, Q, W, window=1, linear_factor=lf)


# ------------------------------------------------------------------ validation found up front (issue 15)
def _qkv(lq=4, lk=4, d=8):
    return randn(1, 2, lq, d, seed=0), randn(1, 2, lk, d, seed=1), randn(1, 2, lk, d, seed=2)


def _state(kv_shape=(1, 2, 16, 9), stab_shape=(1, 2), dtype=torch.float64):
    return linattn.FavorState(
        torch.zeros(kv_shape, dtype=dtype), torch.zeros(stab_shape, dtype=dtype)
    )


FUNCTIONAL_BAD = {
    "scale-inf": (
        lambda: linattn.favor_attention(*_qkv(), projection(16, 8), scale=math.inf),
        ValueError,
        "scale must be a finite number > 0",
    ),
    "scale-nan": (
        lambda: linattn.favor_attention(*_qkv(), projection(16, 8), scale=math.nan),
        ValueError,
        "scale",
    ),
    "linformer-scale-inf": (
        lambda: linattn.linformer_attention(*_qkv(), randn(3, 8), scale=math.inf),
        ValueError,
        "scale",
    ),
    "lq-0": (
        lambda: linattn.favor_attention(*_qkv(lq=0), projection(16, 8)),
        ValueError,
        "at least one query",
    ),
    "lq-0-linformer": (
        lambda: linattn.linformer_attention(*_qkv(lq=0), randn(3, 8)),
        ValueError,
        "at least one query",
    ),
    "d-0": (lambda: linattn.favor_attention(*_qkv(d=0), randn(16, 0)), ValueError, "head_dim"),
    "projection-0-rows": (
        lambda: linattn.favor_attention(*_qkv(), randn(0, 8)),
        ValueError,
        "m >= 1",
    ),
    "draw-int64": (
        lambda: linattn.draw_projection(16, 8, dtype=torch.int64),
        TypeError,
        "floating",
    ),
    "draw-bool": (lambda: linattn.draw_projection(16, 8, dtype=torch.bool), TypeError, "floating"),
    "state-type": (
        lambda: linattn.favor_recurrent(*_qkv(lq=1, lk=1), projection(16, 8), state=(1, 2)),
        TypeError,
        "FavorState",
    ),
    "state-kv-shape": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(kv_shape=(1, 2, 8, 9))
        ),
        ValueError,
        "state.kv",
    ),
    "state-stab-shape": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(stab_shape=(2,))
        ),
        ValueError,
        "state.stab",
    ),
    "state-dtype": (
        lambda: linattn.favor_recurrent(
            *_qkv(lq=1, lk=1), projection(16, 8), state=_state(dtype=torch.int64)
        ),
        TypeError,
        "state.kv",
    ),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_BAD), ids=list(FUNCTIONAL_BAD))
def test_functional_bad_input_is_named_up_front(case):
    call, exc, match = FUNCTIONAL_BAD[case]
    with pytest.raises(exc, match=match):
        call()
