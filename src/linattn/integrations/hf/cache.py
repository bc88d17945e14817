"""A ``transformers`` cache that keeps FAVOR+'s recurrent state instead of keys and values.

With :class:`FavorCache`, a converted decoder's ``generate()`` costs the same per token
whatever the context length: each layer keeps ``(B, H, M, d + 1)`` numbers (plus, with a
window ``w``, the last ``w`` keys and values, and with ``sinks=s`` the ``s`` sink keys and
values and a count of real tokens per sequence), not a key/value cache that grows with
every token. :func:`~.convert.convert` makes it the
default cache of a converted causal model's ``generate()``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ...functional import FavorState
from .attention import NAME
from .state import converted_layers


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
        self.parts = None

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a recurrent FAVOR+ state cannot be cropped (it does not keep the tokens); "
            "assisted or speculative decoding needs a key/value cache: pass "
            "past_key_values=transformers.DynamicCache() to generate()"
        )

    def _map(self, fn) -> None:
        # Every per-sequence tensor of the state (the sums, their stabilizer and, with a
        # window, the last keys/values and their padding; with sinks, the sink slots and
        # the real-token count) follows the batch reordering.
        if self.state is not None:
            self.state = _map_state(self.state, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def state_bytes(self) -> int:
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in _tensors(self.state))


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

    Use it like any ``transformers`` cache (``generate(past_key_values=FavorCache(
    model))``, or a manual loop passing ``past_key_values``). Its size does not grow
    with the context: :meth:`state_bytes` tells how much it holds.
    """

    def __init__(self, model: nn.Module) -> None:
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
        # The model calls its attention function right after this; the state module
        # hands it this layer so that it continues the recurrent state.
        self._states[layer_idx].pending_cache = layer
        return layer.update(key_states, value_states)

    def state_bytes(self) -> int:
        """Bytes held by all layers' recurrent states."""
        return sum(layer.state_bytes() for layer in self.layers)
