"""Convert a loaded ``transformers`` model to linear attention, save it and load it back."""

from __future__ import annotations

import glob
import logging
import os
import types

import transformers
from safetensors.torch import load_file
from torch import nn

from ...features import KERNELS
from ...functional import _compute_dtype
from .attention import NAME, register
from .cache import FavorCache
from .state import FavorLayerState, LinformerLayerState, converted_layers

CONFIG_KEY = "linattn_conversion"

FAVOR_OPTIONS = ("num_features", "kernel", "window", "orthogonal", "scaling", "seed",
                 "redraw_interval", "chunk_size", "learn_projection")
LINFORMER_OPTIONS = ("proj_dim", "projection", "sharing", "max_seq_len", "seed")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call ``transformers``' attention interface: named ``*Attention``,
    with a ``scaling`` and a ``layer_idx`` (Llama-, BERT-, Mistral-, Qwen-style ...)."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if (name.endswith("Attention") and hasattr(module, "scaling")
                and hasattr(module, "layer_idx") and hasattr(module, "config")):
            found.append(module)
    return found


def _head_dim(module: nn.Module) -> int:
    for attr in ("head_dim", "attention_head_size"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    cfg = module.config
    return cfg.hidden_size // cfg.num_attention_heads


def _num_heads(module: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return module.config.num_attention_heads


def _check_options(method: str, options: dict) -> None:
    allowed = FAVOR_OPTIONS if method == "favor" else LINFORMER_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"convert(method={method!r}) got unknown option(s) {unknown}; it takes "
            f"{list(allowed)}"
        )


def convert(model: nn.Module, method: str = "favor", **options) -> nn.Module:
    """Switch a loaded ``transformers`` model to linear attention, in place.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``transformers``'
            attention interface (BERT-family encoders, Llama-family decoders, ...).
        method: ``"favor"`` (Performer FAVOR+; encoders and decoders) or ``"linformer"``
            (encoders only: Linformer cannot be causal).
        options:
            for ``"favor"``: ``num_features`` (default ``d log d``; ``d`` for learned
            maps), ``kernel`` (``"softmax"``; ``"hedgehog"``: a learned map, one
            trainable projection per head, see :class:`~.state.FavorLayerState`),
            ``window`` (None: pure linear attention; ``w``: exact softmax scores for the
            keys within ``w`` positions of each query, the model's own attention kept
            there), ``orthogonal``, ``scaling``, ``seed`` (layer ``i`` draws from
            ``(seed, i)``), ``redraw_interval``, ``chunk_size``, ``learn_projection``
            (train the projection; default True for learned maps);
            for ``"linformer"``: ``proj_dim`` (128), ``projection`` (``"linear"``,
            ``"random"``, ``"mean"``, ``"max"``, ``"conv"``), ``sharing`` (``"headwise"``,
            ``"none"``, ``"kv"``, ``"layerwise"``), ``max_seq_len`` (default the model's
            ``max_position_embeddings``), ``seed``.

    Returns:
        ``model``, with its weights untouched: each attention module gains a ``linattn``
        child (FAVOR+ projection buffers, or Linformer ``E``/``F`` parameters) and the
        model's attention implementation becomes ``"linattn"``. Padding masks keep
        working exactly, grouped-query attention repeats key/value heads, causal models
        stay causal, and a converted decoder's ``generate()`` keeps the FAVOR+
        recurrent state (:class:`~.cache.FavorCache`) instead of a growing key/value
        cache. The conversion is recorded in ``model.config`` so that
        :func:`save_converted` / :func:`load_converted` reproduce it.
    """
    if method not in ("favor", "linformer"):
        raise ValueError(f"method must be 'favor' or 'linformer', got {method!r}")
    _check_options(method, options)
    if getattr(getattr(model, "config", None), CONFIG_KEY, None) is not None:
        raise ValueError("model is already converted to linear attention")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"found no attention module in {type(model).__name__} that calls transformers' "
            "attention interface (a '*Attention' module with 'scaling' and 'layer_idx')"
        )
    cross = [m for m in modules if getattr(m, "is_cross_attention", False)]
    if cross:
        raise ValueError(
            f"{type(cross[0]).__name__} is cross-attention; converting encoder-decoder "
            "models is not supported"
        )
    causal = any(bool(getattr(m, "is_causal", False)) for m in modules)
    if method == "linformer" and causal:
        raise ValueError(
            f"{type(model).__name__} is a causal (decoder) model; Linformer cannot be causal "
            "because its projection along the sequence mixes future keys into every "
            "position. Use method='favor'."
        )
    first = next(model.parameters())
    device = first.device
    # Linformer's E/F follow the model's precision (float32 under half precision).
    state_dtype = _compute_dtype(first.dtype)
    config = model.config
    shared = None
    for index, module in enumerate(modules):
        layer = module.layer_idx if isinstance(module.layer_idx, int) else index
        head_dim = _head_dim(module)
        if method == "favor":
            state = FavorLayerState(
                head_dim, num_heads=_num_heads(module),
                num_features=options.get("num_features"),
                kernel=options.get("kernel", "softmax"), window=options.get("window"),
                orthogonal=options.get("orthogonal", True),
                scaling=options.get("scaling", "chi"), seed=options.get("seed", 0),
                layer_index=layer, redraw_interval=options.get("redraw_interval"),
                chunk_size=options.get("chunk_size", 64),
                learn_projection=options.get("learn_projection"), device=device,
            )
            if causal and not KERNELS[state.kernel].causal_ok:
                raise ValueError(
                    f"kernel={state.kernel!r} has no causal form; a decoder needs e.g. "
                    "kernel='softmax', 'softmax_hyp' or 'relu'"
                )
        else:
            max_len = options.get("max_seq_len") or getattr(config, "max_position_embeddings",
                                                            None)
            if not max_len:
                raise ValueError("pass max_seq_len: the model's config has no "
                                 "max_position_embeddings")
            sharing = options.get("sharing", "headwise")
            heads = config.num_attention_heads
            kw = {"proj_dim": options.get("proj_dim", 128),
                  "projection": options.get("projection", "linear"), "sharing": sharing,
                  "seed": options.get("seed", 0) + (0 if sharing == "layerwise" else layer)}
            if sharing == "layerwise" and shared is not None:
                state = LinformerLayerState(heads, head_dim, max_len, shared=shared, **kw)
            else:
                state = LinformerLayerState(heads, head_dim, max_len, device=device,
                                            dtype=state_dtype, **kw)
                if sharing == "layerwise":
                    shared = state.projection
        module.linattn = state
    resolved = {**modules[0].linattn.options(), "seed": options.get("seed", 0)}
    register()
    _set_attn_implementation(model, NAME)
    config_dict = {"method": method, "options": resolved}
    setattr(model.config, CONFIG_KEY, config_dict)
    if method == "favor" and causal and hasattr(model, "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache, model)
    return model


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def _prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """``generate()`` hook of a converted decoder: unless the caller chose a cache, use a
    :class:`~.cache.FavorCache` (constant size) instead of a growing key/value cache."""
    if (model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None):
        model_kwargs["past_key_values"] = FavorCache(self)
    return type(self)._prepare_cache_for_generation(
        self, generation_config, model_kwargs, *args, **kwargs
    )


def linear_attention_states(model: nn.Module) -> list[nn.Module]:
    """The per-layer ``linattn`` state modules of a converted model, in layer order."""
    return [m.linattn for m in converted_layers(model)]


def redraw_projections(model: nn.Module) -> None:
    """Draw fresh FAVOR+ projections in every converted layer (deterministic per layer;
    learned maps are left as they are)."""
    for state in linear_attention_states(model):
        if state.method == "favor" and not state.learned:
            state.redraw_projection()


def save_converted(model: nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(path)``; the linear-attention state is saved with the
    weights and the conversion settings in ``config.json``, so :func:`load_converted`
    reproduces the outputs exactly."""
    if getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("model is not converted; save it with save_pretrained()")
    # Layerwise Linformer sharing registers its projection once (layer 0), so the saved
    # tensors have no aliases.
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        # transformers dequantizes GGUF files when it loads them: the weights in memory are
        # plain tensors (the distilled ones), which save as an ordinary checkpoint.
        model.hf_quantizer = None
        qconfig = model.config.__dict__.pop("quantization_config", None)
        try:
            model.save_pretrained(path, **kwargs)
        finally:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig
        return
    model.save_pretrained(path, **kwargs)


def load_converted(path: str | os.PathLike, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved by :func:`save_converted`.

    Args:
        path: the directory written by :func:`save_converted`.
        model_class: the ``transformers`` class to load with (default: the first entry of
            ``config.architectures``).
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    config = transformers.AutoConfig.from_pretrained(path)
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        raise ValueError(f"{path} holds no linattn conversion ({CONFIG_KEY} missing from "
                         "config.json); load it with from_pretrained()")
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch or "", None)
        if model_class is None:
            raise ValueError(f"cannot tell the model class from config.architectures="
                             f"{config.architectures!r}; pass model_class")
    delattr(config, CONFIG_KEY)
    # The linattn tensors are not part of the original architecture: loaded below.
    hf_logger = logging.getLogger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        model = model_class.from_pretrained(path, config=config, **kwargs)
    finally:
        hf_logger.setLevel(level)
    convert(model, spec["method"], **spec["options"])
    own = {k for k in model.state_dict() if ".linattn." in k}
    saved = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        saved.update({k: v for k, v in load_file(file).items() if ".linattn." in k})
    missing = sorted(own - set(saved))
    if missing:
        raise ValueError(f"{path} lacks linear-attention tensors, e.g. {missing[:3]}")
    result = model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected linear-attention tensors {result.unexpected_keys[:3]}")
    return model


__all__ = [
    "convert",
    "converted_layers",
    "linear_attention_states",
    "load_converted",
    "redraw_projections",
    "save_converted",
]
