"""The hooks a FAVOR+-converted decoder runs: ``generate()``'s cache (a
:class:`~.cache.FavorCache` instead of a growing key/value cache), the decoder stack's
forward pre-hook that hands one out, and positions from the mask on rotary models."""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import Tensor, nn

from .attention import NAME
from .cache import FavorCache, favor_cache_from


def _positions_from_mask_on_rotary(model: nn.Module) -> None:
    # Rotary models (Llama family) are exact under left padding without position_ids only
    # because exact attention depends on positions through i - j alone: every row's
    # positions start at 0 at the first *pad*, a shift that exact attention ignores. FAVOR+
    # features of rotated q and k are not shift-invariant (the random projection is
    # fixed), so a left-padded row would differ from the sequence alone. Derive positions
    # from the mask (as transformers' generate() does) when the caller gives none.
    for module in model.modules():
        if isinstance(getattr(module, "rotary_emb", None), nn.Module) and not getattr(
            module, "_linattn_positions_hook", False
        ):
            module.register_forward_pre_hook(_positions_from_mask, with_kwargs=True)
            module._linattn_positions_hook = True


def _positions_from_mask(module, args, kwargs):
    """Forward pre-hook: ``position_ids = cumsum(attention_mask) - 1`` for the new tokens
    when ``position_ids`` is None and some row is left-padded (2-D mask)."""
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    if bool(mask[:, 0].all()):
        # No row starts with padding: the default positions are already the real ones.
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None:
        return None
    length = x.shape[1]
    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
    return args, kwargs


def _cache_key(model: nn.Module) -> str:
    # Newer transformers name generate()'s cache "cache" (past_key_values is deprecated):
    # the key its model_kwargs use is the one prepare_inputs_for_generation takes.
    params = inspect.signature(type(model).prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def linattn_in_force(model: nn.Module) -> bool:
    """Whether ``model`` runs the linear attention now (its attention implementation is
    ``"linattn"``), not an exact one selected again after :func:`convert`."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def _prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """``generate()`` hook of a converted decoder: unless the caller chose a cache, use a
    :class:`~.cache.FavorCache` (constant size) instead of a growing key/value cache,
    while the linear attention is in force (after ``set_attn_implementation("sdpa")``
    the exact attention needs ``transformers``' own key/value cache)."""
    if (
        linattn_in_force(self)
        and model_kwargs.get("past_key_values") is None
        and model_kwargs.get("cache") is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
    ):
        model_kwargs[_cache_key(self)] = FavorCache(self)
    return type(self)._prepare_cache_for_generation(
        self, generation_config, model_kwargs, *args, **kwargs
    )


_CACHE_NAMES = ("cache", "past_key_values")


def _favor_cache_on_forward(model: nn.Module) -> None:
    # The module that would create a DynamicCache: the decoder stack (LlamaModel inside
    # LlamaForCausalLM; the model itself when it is the stack). Its callers pass the cache
    # through and hand back what it returns.
    base = getattr(model, "base_model", model)
    if not isinstance(base, nn.Module) or getattr(base, "_linattn_cache_hook", False):
        return
    params = list(inspect.signature(type(base).forward).parameters)[1:]
    if not any(name in params for name in _CACHE_NAMES):
        return
    base.register_forward_pre_hook(_favor_cache_hook, with_kwargs=True)
    base._linattn_cache_hook = True


def _favor_cache_hook(module, args, kwargs):
    """Forward pre-hook of a converted decoder stack (while ``"linattn"`` is in force):
    where ``transformers`` would create a ``DynamicCache`` (``use_cache`` true, no cache
    given), pass a :class:`~.cache.FavorCache` (lazy unless ``use_cache=True`` was asked
    for: a plain forward keeps the parallel form); a ``DynamicCache`` passed in becomes
    a ``FavorCache`` holding its tokens (:func:`~.cache.favor_cache_from`); other caches
    are refused."""
    if not linattn_in_force(module):
        return None
    if args:
        # Keyword form, so that the cache and use_cache are found by name.
        params = list(inspect.signature(type(module).forward).parameters)[1:]
        kwargs = {**dict(zip(params, args)), **kwargs}
        args = ()
    key = next((n for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
    if key is None:
        use_cache = kwargs.get("use_cache")
        asked = use_cache is True
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        # transformers turns the cache off under gradient checkpointing (the checkpointed
        # layers run twice): no state to update twice either.
        checkpointing = (
            getattr(module, "gradient_checkpointing", False)
            and module.training
            and torch.is_grad_enabled()
        )
        if not use_cache or checkpointing:
            return (args, kwargs)
        params = inspect.signature(type(module).forward).parameters
        for name in _CACHE_NAMES:
            kwargs.pop(name, None)
        kwargs["cache" if "cache" in params else "past_key_values"] = FavorCache(
            module, lazy=not asked
        )
        return args, kwargs
    cache = kwargs[key]
    if isinstance(cache, FavorCache):
        return args, kwargs
    if isinstance(cache, transformers.DynamicCache):
        kwargs[key] = favor_cache_from(module, cache, kwargs.get("attention_mask"))
        return args, kwargs
    raise ValueError(
        f"a FAVOR+-converted decoder keeps a recurrent state (FavorCache), not a "
        f"{type(cache).__name__}: pass FavorCache(model) or no cache (use_cache=True "
        "creates one); a DynamicCache is converted"
    )
