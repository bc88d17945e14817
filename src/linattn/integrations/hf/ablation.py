"""Ablations of a FAVOR+-converted model: switch the exact (near) or the feature-map (far)
part of every converted layer's hybrid attention off, or its exact key-value slots, at
inference, without touching the weights.

The switches are runtime state of each layer's :class:`~.state.FavorLayerState`
(``near``, ``far``, ``use_slots``), read by its forward on every call, in the parallel forward and in
recurrent decoding through :class:`~.cache.FavorCache` alike. They are not saved by
:func:`~.convert.save_converted` (a loaded model runs the full hybrid).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .state import FavorLayerState, converted_layers


def _favor_layers(model: nn.Module) -> list[nn.Module]:
    modules = list(converted_layers(model))
    if not modules:
        raise ValueError(
            f"{type(model).__name__} is not converted to linear attention: "
            "call linattn.integrations.hf.convert(model, 'favor', ...) first"
        )
    if not all(isinstance(m.linattn, FavorLayerState) for m in modules):
        raise ValueError(
            "attention parts can be switched only in a model converted with method='favor' "
            "(Linformer has no window or feature-map part)"
        )
    return modules


def _has_exact_part(module: nn.Module) -> bool:
    state = module.linattn
    if state.sinks:
        return True
    if state.window is None:
        return False
    # A causal window w scores i - w < j <= i: w = 0 holds no key (bidirectional: |i - j|
    # <= 0 keeps the query's own key).
    return state.window > 0 or not bool(getattr(module, "is_causal", False))


def set_attention_parts(
    model: nn.Module, *, near: bool = True, far: bool = True, slots: bool = True
) -> tuple[bool, bool, bool]:
    """Choose which parts of the hybrid attention every converted layer of ``model`` uses.

    Args:
        model: a model converted with ``convert(model, "favor", ...)``.
        near: keep the exact part (the window's keys and the sinks). ``False``:
            linear-only, the plain feature-map attention, as the model converted with
            ``window=None, sinks=0`` and the same feature maps.
        far: keep the feature-map part (the keys outside the window). ``False``:
            window-only, exact softmax attention over each query's window and the sinks
            (the far keys weigh 0 under the one normalizer; with slots, the slots stay
            exact unless ``slots=False`` too).
        slots: keep the exact key-value slots of a model converted with ``slots > 0``
            (no effect without). ``False``: the plain window hybrid, every key that
            leaves the window going to the feature-map part.

    Returns:
        the previous ``(near, far, slots)`` (of the first converted layer; this function
        sets all layers alike).

    Raises:
        TypeError: ``near`` or ``far`` is not a bool.
        ValueError: the model is not converted with ``method="favor"``; both parts off;
            or ``far=False`` where a layer has no exact part (no window and no sinks, or
            a causal window of 0 without sinks): its queries would see no key.

    A :class:`~.cache.FavorCache` records the parts it was filled under and refuses to go
    on under others (start a new cache after switching). ``near=True, far=True`` is the
    converted model as built.
    """
    for name, value in (("near", near), ("far", far), ("slots", slots)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    modules = _favor_layers(model)
    if not near and not far:
        raise ValueError("near=False and far=False leave no attention at all; keep one part")
    if not far:
        bare = [m for m in modules if not _has_exact_part(m)]
        if bare:
            state = bare[0].linattn
            raise ValueError(
                f"far=False (window-only) needs an exact part, but {len(bare)} converted "
                f"layer(s) have window={state.window}, sinks={state.sinks}: their queries "
                "would see no key (convert with a window >= 1 or sinks >= 1)"
            )
    first = modules[0].linattn
    previous = (bool(first.near), bool(first.far), bool(first.use_slots))
    for module in modules:
        module.linattn.near, module.linattn.far = near, far
        module.linattn.use_slots = slots
    return previous


@contextmanager
def attention_parts(
    model: nn.Module, *, near: bool = True, far: bool = True, slots: bool = True
) -> Iterator[None]:
    """Context manager: run ``model`` with :func:`set_attention_parts` ``(near, far, slots)``
    inside the block and restore the previous setting on leaving it (also on an
    exception)::

        with attention_parts(model, far=False):      # window-only
            logits = model(ids).logits
    """
    previous = set_attention_parts(model, near=near, far=far, slots=slots)
    try:
        yield
    finally:
        set_attention_parts(model, near=previous[0], far=previous[1], slots=previous[2])
