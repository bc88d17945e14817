"""The slot hybrid of a converted causal layer (``slots > 0``): the parallel prefill and
the decoding steps through :func:`~linattn.ops.favor.slots.favor_slots_step`, continuing a
cache layer's :class:`~linattn.ops.favor.slots.SlotState`; and the check of the slot
options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..._checks import check_choice, check_positive_int, is_int
from ..._dtype import compute_dtype
from ...features import get_feature_map
from ...ops.favor.slots import RULES, SlotState, favor_slots_step
from ...ops.favor.slots.common import MASS_RULES
from ._layer import as_query_heads, pending_entry

if TYPE_CHECKING:
    from .state import FavorLayerState


def check_slots(
    slots: object, rule: object, interval: object, *, window: object
) -> tuple[int, str, int | None]:
    """``(slots, rule, interval)`` checked (see :class:`FavorLayerState`): ``slots`` an
    int >= 0 that needs a ``window`` >= 1, ``rule`` one of
    :data:`~linattn.ops.favor.slots.RULES`, ``interval`` None or an int >= 1."""
    if not is_int(slots) or slots < 0:
        raise ValueError(f"slots must be an int >= 0, got {slots!r}")
    rule = check_choice("slot_rule", rule, RULES)
    interval = None if interval is None else check_positive_int("slot_interval", interval)
    if slots and (window is None or not is_int(window) or window < 1):
        raise ValueError(
            f"slots={slots} needs a window >= 1 (the slots hold keys that leave "
            f"the window), got window={window!r}"
        )
    return int(slots), rule, interval


def slots_forward(
    layer: FavorLayerState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    kw: dict,
    cache_layer,
) -> Tensor:
    """The slot hybrid (causal): ``q, k, v: (B, H, L, d)``, continuing
    ``cache_layer``'s :class:`~linattn.ops.favor.slots.SlotState` if one is given."""
    if mask is not None:
        raise ValueError(
            f"slots={layer.slots}: exact key-value slots are chosen per position and "
            "work on unpadded sequences only; run padded texts one at a time (or "
            "convert with slots=0)"
        )
    state = None
    if cache_layer is not None:
        if cache_layer.pending is not None:
            # Keys and values of a converted DynamicCache: decided on as they leave
            # the window; the error rule reads the keys and values only.
            pk, pv, pmask, _ = pending_entry(cache_layer.pending)
            cache_layer.pending = None
            if pmask is not None:
                raise ValueError(
                    f"slots={layer.slots}: the cached tokens are padded; slots work on "
                    "unpadded sequences only"
                )
            if layer.slot_rule in MASS_RULES:
                raise ValueError(
                    f"slot_rule={layer.slot_rule!r} scores keys by the attention their queries gave "
                    "them, which a DynamicCache does not keep: start from a FavorCache "
                    "(the converted model's forward(use_cache=True) makes one)"
                )
            pk, pv = as_query_heads(pk, pv, q)
            pkw = dict(kw)
            if "far_k" in kw:
                fk = layer._far_inputs(pk, pk, None, None)["far_k"]
                pkw.update(far_q=fk.new_zeros(fk.shape), far_k=fk)
            _, state = slots_step(layer, pk.new_zeros(pk.shape), pk, pv, None, pkw)
        else:
            state = cache_layer.state
    elif q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"slots={layer.slots}: {q.shape[-2]} queries against {k.shape[-2]} keys "
            "(a key/value cache the model kept itself); decode through a FavorCache"
        )
    out, state = slots_step(layer, q, k, v, state, kw)
    if cache_layer is not None:
        cache_layer.state = state
    return out


def slots_step(
    layer: FavorLayerState, q: Tensor, k: Tensor, v: Tensor, state: SlotState | None, kw: dict
) -> tuple[Tensor, SlotState]:
    """:func:`~linattn.ops.favor.slots.favor_slots_step` with this layer's feature
    map, in float32 for half-precision inputs; returns ``(out in q's dtype, state)``."""
    dtype = q.dtype
    cd = compute_dtype(dtype)
    q, k, v = (t.to(cd) for t in (q, k, v))
    scale = kw["scale"]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    fm = get_feature_map(layer.kernel)
    params = fm.prepare(layer.projection.to(cd), q, k, None, scale)
    lf = kw["linear_factor"]
    far = {
        name: kw[name].to(cd) if kw.get(name) is not None else None
        for name in ("decay", "far_q", "far_k")
    }
    out, state = favor_slots_step(
        q,
        k,
        v,
        fm,
        params,
        state,
        window=kw["window"],
        slots=layer.slots,
        sinks=kw["sinks"],
        interval=layer.slot_interval,
        rule=layer.slot_rule,
        linear_factor=None if lf is None else lf.to(cd),
        compiled=layer.compile_step,
        **far,
    )
    return out.to(dtype), state
