"""A ``transformers`` cache that keeps FAVOR+'s recurrent state instead of keys and values.

With :class:`FavorCache`, a converted decoder's ``generate()`` costs the same per token
whatever the context length: each layer keeps ``(B, H, M, d + 1)`` numbers (plus, with a
window ``w``, the last ``w`` keys and values, and with ``sinks=s`` up to ``s`` sink keys
and values and a count of real tokens per sequence; under grouped-query attention those
once per key/value head), not a key/value cache that grows with every token. :func:`~.convert.convert` makes it the
default cache of a converted causal model's ``generate()``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ...functional import FavorState
from .attention import NAME
from .state import converted_layers


def _check_cache_parts(cache_layer, parts: tuple) -> None:
    """A cache layer records the attention parts (near, far, slots: see
    :meth:`~.state.FavorLayerState._held_parts`) it was filled under; going on under others
    would mix two models in one state: refused."""
    held = getattr(cache_layer, "parts", None)
    if held is None:
        cache_layer.parts = parts
    elif held != parts:

        def say(p):
            slots = "off" if p[2] is None else "{} ({} rule, interval {})".format(*p[2])
            return f"near={p[0]}, far={p[1]}, slots={slots}"

        raise ValueError(
            f"this FavorCache was filled with attention parts {say(held)} but the model "
            f"now runs {say(parts)}: start a new cache (e.g. FavorCache(model)) after "
            "set_attention_parts or set_slots, or switch back"
        )


class FavorCacheLayer(CacheLayerMixin):
    """One layer's recurrent FAVOR+ state (``state``, a :class:`linattn.FavorState`,
    or None before the first token) and the number of tokens it has absorbed."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: FavorState | None = None
        self.seen = 0
        # The attention parts (near, far) the state was built under (see
        # linattn.integrations.hf.set_attention_parts); None before the first token.
        self.parts: tuple[bool, bool] | None = None
        # Keys, values, padding and position ids ``(k (B, H_kv, n, d), v, mask (B, n) or
        # None, positions (B, n) or None)`` not yet folded into ``state``: a lazy prefill
        # (positions kept for far_rope=False), or a converted DynamicCache's content
        # (three entries: no positions).
        self.pending: tuple | None = None
        # A first call runs the parallel form and keeps its keys/values in ``pending``.
        self.lazy = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        # Only the new tokens: the attention function folds them into the state.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False
        self.parts, self.pending = None, None

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a recurrent FAVOR+ state cannot be cropped (it does not keep the tokens): "
            "assisted or speculative decoding is not supported on a FAVOR+-converted "
            "decoder (a DynamicCache passed to it becomes a FavorCache)"
        )

    def _map(self, fn) -> None:
        # Every per-sequence tensor of the state (the sums, their stabilizer and, with a
        # window, the last keys/values and their padding; with sinks, the sink slots and
        # the real-token count) follows the batch reordering.
        if self.state is not None:
            self.state = _map_state(self.state, fn)
        if self.pending is not None:
            self.pending = tuple(None if t is None else fn(t) for t in self.pending)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def state_bytes(self) -> int:
        held = [] if self.state is None else _tensors(self.state)
        held += [t for t in self.pending or () if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


def _tensors(state) -> list[torch.Tensor]:
    return [t for t in state if isinstance(t, torch.Tensor)]


def _map_state(state: FavorState, fn) -> FavorState:
    """``state`` with ``fn`` applied to each tensor field whose first axis is the batch
    (that of ``state.kv``); other fields are kept."""
    batch = state.kv.shape[0]
    return type(state)(
        *(
            fn(t) if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else t
            for t in state
        )
    )


class FavorCache(Cache):
    """Cache of a FAVOR+-converted decoder: one recurrent state per layer.

    Args:
        model: a model converted with ``method="favor"``.
        lazy: False (default): every call folds its tokens into the state. True: a first
            call runs the parallel form (the outputs of a forward without cache) and
            keeps its keys and values; they are folded into the state when a next call
            continues the cache (a converted decoder's forward creates such a cache where
            it would have created a ``DynamicCache`` without being asked for one).

    A converted decoder makes one itself: ``generate()`` and ``forward(use_cache=True)``
    without a cache create a ``FavorCache``, which ``out.cache`` (``out.past_key_values``
    before transformers 5.25) hands back for the next call. Pass one explicitly as
    ``cache=`` (``past_key_values=`` before 5.25). Its size does not grow with the
    context: :meth:`state_bytes` tells how much it holds.
    """

    def __init__(self, model: nn.Module, *, lazy: bool = False) -> None:
        states = {}
        for module in converted_layers(model):
            if module.linattn.method != "favor":
                raise ValueError("FavorCache needs a model converted with method='favor'")
            states[module.layer_idx] = module.linattn
        if not states or sorted(states) != list(range(len(states))):
            raise ValueError(
                "FavorCache needs converted attention modules numbered 0..N-1 by "
                f"layer_idx; found {sorted(states)}"
            )
        super().__init__(layers=[FavorCacheLayer() for _ in states])
        self._states = [states[i] for i in range(len(states))]
        self._config = getattr(model, "config", None)
        for layer in self.layers:
            layer.lazy = bool(lazy)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        impl = getattr(self._config, "_attn_implementation", NAME)
        if impl != NAME:
            # An exact attention would take the returned new tokens for the whole context.
            raise ValueError(
                f"FavorCache holds FAVOR+'s recurrent state, but the model now runs "
                f"attn_implementation={impl!r}: pass a transformers DynamicCache (or none) "
                f"for exact attention, or select {NAME!r} again"
            )
        layer = self.layers[layer_idx]
        state = self._states[layer_idx]
        # Before anything changes: a refused call leaves the cache as it was.
        _check_cache_parts(layer, state._held_parts())
        # The model calls its attention function right after this; the state module
        # hands it this layer so that it continues the recurrent state.
        state.pending_cache = layer
        return layer.update(key_states, value_states)

    def state_bytes(self) -> int:
        """Bytes held by all layers' recurrent states."""
        return sum(layer.state_bytes() for layer in self.layers)


def _layer_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` of a ``transformers`` key/value cache (the
    ``layers`` of transformers >= 4.56, the ``key_cache``/``value_cache`` lists before)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover - old transformers


def favor_cache_from(model: nn.Module, cache: Cache, attention_mask=None) -> FavorCache:
    """A :class:`FavorCache` continuing what the key/value ``cache`` (a
    ``transformers.DynamicCache``) holds: its keys and values (rotary already applied,
    ``(B, H_kv, n, d)`` per layer) are folded into the recurrent state by the next call.

    ``attention_mask``: None, or the call's ``(B, n + new)`` mask (1 = real token), whose
    first ``n`` columns are the cached tokens' padding. The ``cache`` is marked: passing
    it again raises a ``ValueError`` (it does not see the tokens the FavorCache absorbs;
    continue with the returned cache, ``out.cache``).
    """
    if getattr(cache, "_linattn_converted", False):
        raise ValueError(
            "this DynamicCache was already turned into a FavorCache by an earlier call of "
            "the converted model and holds none of the tokens since: pass the cache the "
            "model returned (out.cache / out.past_key_values), or a new FavorCache(model)"
        )
    favor = FavorCache(model)
    seen = cache.get_seq_length()
    tensors = _layer_tensors(cache) if seen else []
    if seen and len(tensors) != len(favor.layers):
        raise ValueError(
            f"the DynamicCache holds {len(tensors)} layers, the converted model has "
            f"{len(favor.layers)}"
        )
    padding = None
    if seen and attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(
                "converting a DynamicCache needs a 2-D attention_mask (batch, kv_length) or None"
            )
        keep = attention_mask[:, :seen].to(torch.bool)
        padding = None if bool(keep.all()) else ~keep
    for layer, (keys, values) in zip(favor.layers, tensors):
        layer.pending, layer.seen = (keys, values, padding), seen
    cache._linattn_converted = True
    return favor
