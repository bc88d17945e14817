"""Argument checks of the functional forms: projection, window, sinks, linear_factor,
the state, packed offsets; and the inputs prepared for the eager paths.

Shape legend as :mod:`linattn.functional`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import (
    check_cu_seqlens,
    check_key_padding_mask,
    check_qkv,
    check_scale,
    check_tensor,
    is_int,
    shape_str,
)
from ._dtype import compute_dtype
from .features import FeatureMap, get_feature_map
from .ops.favor import FavorState
from .ops.favor.recurrent import sink_ring, window_ring


def _as_4d(x: Tensor) -> Tensor:
    # (..., L, d) -> (B, H, L, d) with the leading dims after the batch folded into H.
    if x.dim() == 2:
        return x.unsqueeze(0).unsqueeze(0)
    if x.dim() == 3:
        return x.unsqueeze(1)
    # The head count spelled out, not -1: an empty batch (B = 0) has no elements to infer
    # it from.
    return x.reshape(x.shape[0], math.prod(x.shape[1:-2]), *x.shape[-2:])


def _check_projection(projection: object, fm: FeatureMap, q: Tensor) -> Tensor | None:
    if projection is None:
        if fm.needs_projection:
            raise ValueError(
                f"kernel={fm.name!r} uses random features: pass projection=W of shape "
                f"(num_features, {q.shape[-1]}), e.g. linattn.draw_projection(256, "
                f"{q.shape[-1]})"
            )
        return None
    w = check_tensor("projection", projection, min_dim=2)
    heads = _as_4d(q).shape[1]
    d = q.shape[-1]
    cols = fm.weight_cols(d)
    if (
        w.dim() not in (2, 3)
        or w.shape[-1] != cols
        or w.shape[-2] == 0
        or (w.dim() == 3 and w.shape[0] != heads)
    ):
        what, dims = ("head_dim", f"{d}") if cols == d else ("2 head_dim", f"2*{d}")
        untied = (
            f" (kernel={fm.name!r}: the key and the query projections side by side)"
            if fm.untied
            else ""
        )
        raise ValueError(
            f"projection must have shape (num_features, {what}) = (m, {dims}) with m >= 1, "
            f"or one per head (heads, m, {what}) = ({heads}, m, {dims}){untied}, for q "
            f"{shape_str(q)}, got {shape_str(w)}"
        )
    if w.shape[-2] == 0:
        raise ValueError(f"projection must have at least one row, got {shape_str(w)}")
    if w.device != q.device:
        raise ValueError(f"projection is on {w.device} but q is on {q.device}")
    return w


def _zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x: (B, ..., L, d)`` with the positions where ``mask: (B, L)`` is True set to 0.

    A select, not a product (``NaN * 0`` is NaN): padding contents never reach the math.
    """
    if mask is None:
        return x
    return x.masked_fill(mask.view(mask.shape[0], *([1] * (x.dim() - 3)), mask.shape[1], 1), 0)


def _check_window(window: object, causal: bool, q: Tensor, k: Tensor) -> int | None:
    if window is None:
        return None
    if not is_int(window):
        raise TypeError(f"window must be an int >= 0 or None, got {type(window).__name__}")
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0 (or None for pure linear), got {window}")
    if not causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"window={window} needs Lq == Lk (self-attention: the window is centred on the "
            f"query's own position); got q {shape_str(q)}, k {shape_str(k)}"
        )
    return window


def _check_sinks(sinks: object) -> int:
    if not is_int(sinks):
        raise TypeError(f"sinks must be an int >= 0, got {type(sinks).__name__}")
    sinks = int(sinks)
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 (0: no sink keys), got {sinks}")
    return sinks


def _check_hybrid_lengths(sinks: int, causal: bool, q: Tensor, k: Tensor) -> None:
    # The bidirectional hybrid (window or sinks) works on blocks of aligned q and k.
    if sinks and not causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"sinks={sinks} needs Lq == Lk (self-attention; the hybrid's blocks pair query "
            f"and key positions); got q {shape_str(q)}, k {shape_str(k)}"
        )


def _per_head(name: str, value: object, q4: Tensor) -> Tensor:
    """``value`` checked as a scalar tensor or one value per head ``(H,)`` of ``q4: (B, H,
    L, d)``, on q4's device."""
    t = check_tensor(name, value, min_dim=0)
    heads = q4.shape[1]
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != heads):
        raise ValueError(
            f"{name} must be a scalar tensor or have shape (heads,) = ({heads},), got "
            f"{shape_str(t)}"
        )
    if t.device != q4.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q4.device}")
    return t


def _check_decay(decay: object, q4: Tensor, causal: bool, hybrid: bool) -> Tensor | None:
    """``decay`` (``ln gamma``: ``(H,)`` or ``()``, finite, ``<= 0``) for a causal hybrid
    call with ``q4: (B, H, L, d)``, in q4's dtype; None passes through."""
    if decay is None:
        return None
    dec = _per_head("decay", decay, q4)
    if not causal or not hybrid:
        raise ValueError(
            "decay weighs the far (feature-map) scores of a causal hybrid by gamma^(i - j): "
            "it needs causal=True and a window or sinks"
        )
    if not torch.compiler.is_compiling() and not _factor_checked(dec):
        # As linear_factor: a decoding loop passes one tensor at every step, checked once.
        bad = dec.detach()
        if not bool((torch.isfinite(bad) & (bad <= 0)).all()):
            raise ValueError(
                "decay must be finite and <= 0 (ln gamma for a per-token factor gamma in "
                f"(0, 1]; e.g. -1 / 2048), got {bad.tolist()}"
            )
        _remember_factor(dec)
    # A fixed decay: no gradient (the block form's hand-written backward has none).
    return dec.detach().to(q4.dtype)


def _check_far_inputs(
    far_q: object, far_k: object, q: Tensor, k: Tensor, hybrid: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``far_q``/``far_k``: the queries and keys the far part scores, each None or shaped
    and typed as ``q``/``k``; only for a hybrid call (a window or sinks)."""
    out = []
    for name, x, like in (("far_q", far_q, q), ("far_k", far_k, k)):
        if x is None:
            out.append(None)
            continue
        x = check_tensor(name, x, min_dim=2)
        if not hybrid:
            raise ValueError(
                f"{name} gives the far (feature-map) part of the hybrid its own inputs: it "
                "needs a window or sinks (without them every score is a feature-map score: "
                "pass those inputs as q and k)"
            )
        if x.shape != like.shape:
            base = "q" if name == "far_q" else "k"
            raise ValueError(
                f"{name} must have {base}'s shape {shape_str(like)}, got {shape_str(x)}"
            )
        if x.device != like.device or x.dtype != like.dtype:
            raise ValueError(
                f"{name} must be on {like.device} with dtype {like.dtype} like "
                f"{'q' if name == 'far_q' else 'k'}, got {x.device} / {x.dtype}"
            )
        out.append(x)
    return out[0], out[1]


def _far_4d(x: Tensor | None, dtype: torch.dtype, mask: Tensor | None) -> Tensor | None:
    """A far input (``far_q``/``far_k``, checked by :func:`_check_far_inputs`) as ``(B, H,
    L, d)`` in ``dtype``, zeroed where ``mask: (B, L)`` marks padding (as the keys are);
    None stays None."""
    if x is None:
        return None
    x = _as_4d(x).to(dtype)
    return x if mask is None else x.masked_fill(mask[:, None, :, None], 0.0)


def _check_linear_factor(linear_factor: object, q4: Tensor) -> Tensor | None:
    if linear_factor is None:
        return None
    lf = _per_head("linear_factor", linear_factor, q4)
    if not torch.compiler.is_compiling() and not _factor_checked(lf):
        # NaN fails every comparison, so `lf >= 0` alone lets it through: check finiteness.
        # One host synchronization for both conditions; the message tells which failed.
        bad = lf.detach()
        if not bool((torch.isfinite(bad) & (bad >= 0)).all()):
            if not bool(torch.isfinite(bad).all()):
                raise ValueError(
                    "linear_factor must be finite (e.g. exp of a finite log-weight), got "
                    f"{bad.tolist()}"
                )
            raise ValueError(
                f"linear_factor must be non-negative (e.g. exp of a log-weight), got {bad.tolist()}"
            )
        _remember_factor(lf)
    return lf.to(q4.dtype)


#: linear_factor tensors found finite and non-negative, each with its version counter
#: then: a decoding loop passes the same tensor at every token and layer step, and
#: checking it again would cost a host synchronization per call. Any in-place change
#: bumps the version and the tensor is checked again.
_CHECKED_FACTORS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _tensor_version(t: Tensor) -> int | None:
    """``t``'s version counter, or None for tensors without one (inference tensors)."""
    if t.is_inference():
        return None
    return t._version


def _factor_checked(lf: Tensor) -> bool:
    version = _tensor_version(lf)
    return version is not None and _CHECKED_FACTORS.get(lf) == version


def _remember_factor(lf: Tensor) -> None:
    version = _tensor_version(lf)
    if version is not None:
        _CHECKED_FACTORS[lf] = version


def _checked_inputs(
    q, k, v, key_padding_mask, *, allow_empty: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v checked (:func:`check_qkv`, the mask's shape) with the padded keys and
    values zeroed: the one place padding is zeroed, before any path sees the inputs.
    Padded keys and values may hold anything (NaN, inf, 1e30) and take no part.
    ``allow_empty``: a piece of no tokens (after a state) is allowed."""
    q, k, v = check_qkv(q, k, v, allow_empty=allow_empty)
    mask = check_key_padding_mask(key_padding_mask, k)
    return q, _zero_padding(k, mask), _zero_padding(v, mask)


def _check_causal_kernel(fm: FeatureMap) -> None:
    if not fm.causal_ok:
        raise ValueError(
            f"kernel={fm.name!r} depends on every query and key of the call, so it cannot be "
            "causal; use kernel='softmax' or 'softmax_hyp' with causal=True"
        )


def _prepare(q, k, v, projection, kernel, causal, key_padding_mask, scale):
    """Feature map, its per-call parameters and the inputs as ``(B, H, L, d)`` in the
    compute dtype, for q, k, v from :func:`_checked_inputs`."""
    q, k, v = check_qkv(q, k, v)
    fm = get_feature_map(kernel)
    weight = _check_projection(projection, fm, q)
    # k and v come with their padding zeroed (_checked_inputs, once per call).
    mask = check_key_padding_mask(key_padding_mask, k)
    scale = check_scale(scale, q.shape[-1])
    if causal:
        _check_causal_kernel(fm)
    cdt = compute_dtype(q.dtype)
    q4, k4, v4 = (_as_4d(t).to(cdt) for t in (q, k, v))
    w = None if weight is None else weight.to(cdt)
    params = fm.prepare(w, q4, k4, mask, scale)
    return fm, params, q4, k4, v4, mask


def _expand_kv_groups(
    q: object, k: object, v: object, far_k: object
) -> tuple[object, object, object, object, int]:
    """Grouped-query inputs ``q: (B, H, n, d)``, ``k, far_k: (B, H_kv, n, d)``, ``v: (B,
    H_kv, n, dv)`` (``H`` a multiple of ``H_kv``) with ``k, v, far_k`` repeated to the
    ``H`` query heads (head ``h`` from key/value head ``h // g``), and ``g = H / H_kv``;
    other inputs as they are with ``g = 1`` (the usual checks then judge them)."""
    if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)):
        return q, k, v, far_k, 1
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads == heads and v.shape[1] == heads:
        return q, k, v, far_k, 1
    if v.shape[1] != kv_heads:
        raise ValueError(
            "k and v must have the same number of heads (the key/value heads); got "
            f"k {shape_str(k)}, v {shape_str(v)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q's {heads} heads must be a multiple of k's and v's {kv_heads} key/value heads "
            f"(grouped-query attention); got q {shape_str(q)}, k {shape_str(k)}"
        )
    groups = heads // kv_heads
    if far_k is not None:
        if not isinstance(far_k, Tensor) or far_k.dim() != 4 or far_k.shape[1] != kv_heads:
            got = shape_str(far_k) if isinstance(far_k, Tensor) else type(far_k).__name__
            raise ValueError(
                f"far_k must have k's shape {shape_str(k)} (its {kv_heads} key/value heads), "
                f"got {got}"
            )
        far_k = far_k.repeat_interleave(groups, dim=1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v, far_k, groups


def _check_state(
    state: object,
    m: int,
    q4: Tensor,
    dv: int,
    window: int | None,
    sinks: int,
    *,
    name: str = "state",
    dtype: torch.dtype | None = None,
    far: bool | None = None,
    kv_groups: int = 1,
) -> FavorState:
    """``state`` checked against the call (``q4: (B, H, L, d)``, ``M = m`` features per
    token, value width ``dv``, the window and sinks; the ring and sink slots with ``H /
    kv_groups`` heads), its tensors cast to ``dtype`` (default q4's)."""
    if not isinstance(state, FavorState):
        raise TypeError(f"{name} must be a FavorState or None, got {type(state).__name__}")
    bsz, heads, _, d = q4.shape
    dtype = dtype or q4.dtype
    want = (bsz, heads, m, dv + 1)
    for field in ("kv", "stab"):
        t = getattr(state, field)
        check_tensor(f"{name}.{field}", t, min_dim=0)
        if t.device != q4.device:
            raise ValueError(f"{name}.{field} is on {t.device} but q is on {q4.device}")
    if tuple(state.kv.shape) != want:
        raise ValueError(
            f"{name}.kv must have shape (B, H, M, dv + 1) = {want}, got {shape_str(state.kv)}"
        )
    if tuple(state.stab.shape) != want[:2]:
        raise ValueError(
            f"{name}.stab must have shape (B, H) = {want[:2]}, got {shape_str(state.stab)}"
        )
    if window is None and not sinks:
        if state.keys is not None:
            raise ValueError(f"{name} carries a window's keys but window=None was passed")
        if state.sink_keys is not None:
            raise ValueError(f"{name} carries sink keys but sinks=0 was passed")
        return FavorState(kv=state.kv.to(dtype), stab=state.stab.to(dtype))
    # sinks without a window: the hybrid's state with an empty window.
    band = window_ring(state, 0 if window is None else window)
    # Grouped-query attention: the ring and the sink slots once per key/value head.
    heads //= kv_groups
    shapes = {
        "keys": (bsz, heads, band, d),
        "values": (bsz, heads, band, dv),
        "padding": (bsz, band),
    }
    if sinks:
        # The sink slots grow up to `sinks` with the tokens that leave the window.
        slots = sink_ring(state, sinks)
        shapes.update(
            {
                "sink_keys": (bsz, heads, slots, d),
                "sink_values": (bsz, heads, slots, dv),
                "sink_padding": (bsz, slots),
                "seen": (bsz,),
            }
        )
    elif state.sink_keys is not None:
        raise ValueError(f"{name} carries sink keys but sinks=0 was passed")
    if far is not None:
        if far and state.far_keys is None:
            raise ValueError(
                f"{name} has no far_keys but far_k was passed: start from a state made "
                "with far_q/far_k (the far keys of its window ring are needed)"
            )
        if not far and state.far_keys is not None:
            raise ValueError(
                f"{name} carries far_keys (made with far_q/far_k) but no far_k was passed"
            )
        if far:
            shapes["far_keys"] = (bsz, heads, band, d)
    for field, shape in shapes.items():
        t = getattr(state, field)
        if t is None or tuple(t.shape) != shape:
            got = "None" if t is None else shape_str(t)
            raise ValueError(
                f"{name}.{field} must have shape {shape} for window={window}, sinks={sinks}, "
                f"got {got} (pass the state returned by the previous call with the same "
                "window, sinks and key/value heads)"
            )
    floating = ("kv", "stab", "keys", "values", "sink_keys", "sink_values", "far_keys")
    return state._replace(
        **{f: getattr(state, f).to(dtype) for f in floating if getattr(state, f) is not None}
    )


def _check_cu_seqlens(
    cu_seqlens: object, q: object, k: object, v: object, key_padding_mask: object
) -> list[int]:
    """Validate packed-sequence offsets for q, k, v of shape ``(1, H, T, d)``
    (:func:`~linattn._checks.check_cu_seqlens`); returns them as Python ints."""
    if key_padding_mask is not None:
        raise ValueError(
            "cu_seqlens and key_padding_mask cannot be combined: packed sequences hold no "
            "padding (pass the sequences back to back instead)"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, min_dim=0)
        if t.dim() != 4 or t.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, {name} must have shape (1, H, T, d): the sequences packed "
                f"along T in a batch of 1, got {shape_str(t)}"
            )
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(
            "with cu_seqlens, q, k and v must have the same length T (each sequence attends "
            f"to itself); got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    return check_cu_seqlens(cu_seqlens, q.shape[2], q.device)
