"""Convert a loaded ``transformers`` model to linear attention, save it and load it back."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import shutil
import types
from dataclasses import fields
from pathlib import Path

import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..._checks import check_int, check_positive_int
from ..._dtype import compute_dtype
from ..._io import CheckpointError, atomic_directory, read_json
from ...features import KERNELS
from ...nn.linformer import LinformerOptions
from ...nn.performer import FavorOptions
from .attention import NAME, register
from .hooks import _cache_key as _cache_key
from .hooks import (
    _favor_cache_on_forward,
    _positions_from_mask_on_rotary,
    _prepare_cache,
)
from .hooks import linattn_in_force as linattn_in_force
from .state import (
    FavorLayerState,
    LinformerLayerState,
    check_far_decay,
    check_slots,
    converted_layers,
)

CONFIG_KEY = "linattn_conversion"

#: Each method's options: the algorithm's settings (their defaults in the dataclass), then
#: what the conversion adds (defaults: the layer states', ``max_seq_len`` the model's).
OPTIONS = {"favor": FavorOptions, "linformer": LinformerOptions}
STATE_OPTIONS = {
    "favor": (
        "seed",
        "chunk_size",
        "learn_projection",
        "slots",
        "slot_rule",
        "slot_interval",
        "far_rope",
        "far_decay",
    ),
    "linformer": ("seed", "max_seq_len"),
}


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call ``transformers``' attention interface: named ``*Attention``,
    with a ``scaling`` and a ``layer_idx`` (Llama-, BERT-, Mistral-, Qwen-style ...)."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if (
            name.endswith("Attention")
            and hasattr(module, "scaling")
            and hasattr(module, "layer_idx")
            and hasattr(module, "config")
        ):
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


def _split_options(method: str, options: dict) -> tuple[FavorOptions | LinformerOptions, dict]:
    """``options`` as the method's options dataclass and the conversion's own ones."""
    own = [f.name for f in fields(OPTIONS[method])]
    allowed = own + [n for n in STATE_OPTIONS[method] if n not in own]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"convert(method={method!r}) got unknown option(s) {unknown}; it takes {list(allowed)}"
        )
    # Checked up front: 0 must not silently mean "the default", nor "a" fail deep inside.
    for name in ("num_features", "max_seq_len", "proj_dim", "redraw_interval", "chunk_size"):
        if options.get(name) is not None:
            options[name] = check_positive_int(name, options[name])
    if "seed" in options:
        options["seed"] = check_int("seed", options["seed"])
    return (
        OPTIONS[method](**{k: v for k, v in options.items() if k in own}),
        {k: v for k, v in options.items() if k not in own},
    )


def convert(model: nn.Module, method: str = "favor", **options) -> nn.Module:
    """Switch a loaded ``transformers`` model to linear attention, in place.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``transformers``'
            attention interface (BERT-family encoders, Llama-family decoders, ...).
        method: ``"favor"`` (Performer FAVOR+; encoders and decoders) or ``"linformer"``
            (encoders only: Linformer cannot be causal).
        options:
            for ``"favor"``: ``num_features`` (projection rows ``m``, default ``d log d``;
            ``d`` for learned maps; ``"softmax_hyp"``, ``"softmax_trig"`` and the hedgehog
            maps give ``2m`` features per token), ``kernel`` (``"softmax"``; ``"hedgehog"``: a learned map, one
            trainable projection per head, see :class:`~.state.FavorLayerState`),
            ``window`` (None: pure linear attention; ``w``: exact softmax scores for the
            keys within ``w`` positions of each query, the model's own attention kept
            there), ``sinks`` (0: none; ``s``: the first ``s`` unpadded tokens of each
            text, e.g. ``[CLS]`` or BOS, keep the model's exact scores for every query,
            with or without a window), ``orthogonal``, ``scaling``, ``seed`` (layer ``i`` draws from
            ``(seed, i)``), ``redraw_interval``, ``chunk_size``, ``learn_projection``
            (train the projection; default True for learned maps);
            for ``"linformer"``: ``proj_dim``, ``sharing`` (``"headwise"``, ``"none"``,
            ``"kv"``, ``"layerwise"``), ``proj_kind`` (``"linear"``, ``"random"``,
            ``"mean"``, ``"max"``, ``"conv"``), defaults :class:`linattn.LinformerOptions`';
            ``max_seq_len`` (default the model's ``max_position_embeddings``), ``seed``.
            The FAVOR+ settings' defaults are :class:`linattn.FavorOptions`'.

    Returns:
        ``model``, with its weights untouched: each attention module gains a ``linattn``
        child (FAVOR+ projection buffers, or Linformer ``E``/``F`` parameters) and the
        model's attention implementation becomes ``"linattn"``. Padding masks keep
        working exactly, grouped-query attention repeats key/value heads, causal models
        stay causal, and a converted decoder's ``generate()`` and ``forward(
        use_cache=True)`` keep the FAVOR+ recurrent state (:class:`~.cache.FavorCache`)
        instead of a growing key/value cache (a ``DynamicCache`` passed in is converted
        into one), while ``"linattn"`` is the attention implementation in force
        (``model.set_attn_implementation("sdpa")`` goes back to exact attention and its
        own cache). :func:`~.ablation.set_attention_parts` switches the hybrid's
        parts. The conversion is recorded in ``model.config`` so that
        :func:`save_converted` / :func:`load_converted` reproduce it.
    """
    if method not in ("favor", "linformer"):
        raise ValueError(f"method must be 'favor' or 'linformer', got {method!r}")
    algorithm, extra = _split_options(method, options)
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
    state_dtype = compute_dtype(first.dtype)
    config = model.config
    shared = None
    for index, module in enumerate(modules):
        layer = module.layer_idx if isinstance(module.layer_idx, int) else index
        head_dim = _head_dim(module)
        if method == "favor":
            state = FavorLayerState(
                head_dim,
                num_heads=_num_heads(module),
                **vars(algorithm),
                **extra,
                layer_index=layer,
                device=device,
            )
            if not causal and (state.far_decay is not None or not state.far_rope):
                raise ValueError(
                    "far_decay and far_rope=False are for causal decoders; "
                    f"{type(model).__name__} is bidirectional"
                )
            if not state.far_rope:
                state._rotary = (_rotary_module(model),)
            if state.slots and not causal:
                raise ValueError(
                    f"slots={state.slots} are for causal decoders (keys are decided on as "
                    f"they leave a query's causal window); {type(model).__name__} is "
                    "bidirectional: convert it with slots=0"
                )
            if causal and not KERNELS[state.kernel].causal_ok:
                raise ValueError(
                    f"kernel={state.kernel!r} has no causal form; a decoder needs e.g. "
                    "kernel='softmax', 'softmax_hyp' or 'relu'"
                )
        else:
            max_len = extra.get("max_seq_len")
            if max_len is None:
                max_len = getattr(config, "max_position_embeddings", None)
            if not max_len:
                raise ValueError(
                    "pass max_seq_len: the model's config has no max_position_embeddings"
                )
            sharing = algorithm.sharing
            heads = config.num_attention_heads
            kw = {
                **vars(algorithm),
                "seed": extra.get("seed", 0) + (0 if sharing == "layerwise" else layer),
            }
            if sharing == "layerwise" and shared is not None:
                state = LinformerLayerState(heads, head_dim, max_len, shared=shared, **kw)
            else:
                state = LinformerLayerState(
                    heads, head_dim, max_len, device=device, dtype=state_dtype, **kw
                )
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
    if method == "favor" and causal:
        _favor_cache_on_forward(model)
    if method == "favor":
        _positions_from_mask_on_rotary(model)
    return model


def _rotary_module(model: nn.Module) -> nn.Module:
    """The model's rotary embedding module (``cos, sin = rotary(x, position_ids)``, as
    transformers' Llama-family models keep it in ``model.rotary_emb``), for
    ``far_rope=False``."""
    for module in model.modules():
        rotary = getattr(module, "rotary_emb", None)
        if isinstance(rotary, nn.Module) and hasattr(rotary, "inv_freq"):
            return rotary
    raise ValueError(
        f"far_rope=False undoes a rotary position embedding, and {type(model).__name__} "
        "has none that linattn can find (a 'rotary_emb' module with 'inv_freq', as in "
        "the Llama family): convert it with far_rope=True"
    )


def set_far_decay(model: nn.Module, far_decay: float | None) -> nn.Module:
    """Set every layer's ``far_decay`` (see :class:`~.state.FavorLayerState`) of a
    FAVOR+-converted decoder, in place, and record it in the config (so that
    :func:`save_converted` keeps it). The decay holds no parameters: it can be changed on
    a trained model (what it was trained with is what it fits best). Returns ``model``."""
    modules = _favor_layers(model, "set_far_decay")
    if not any(bool(getattr(m, "is_causal", False)) for m in modules):
        raise ValueError("far_decay is for causal decoders; this model is bidirectional")
    far_decay = check_far_decay(far_decay)
    first = modules[0].linattn
    if far_decay is not None and first.window is None and not first.sinks:
        raise ValueError(
            "far_decay weighs the hybrid's far scores: this model has no window or sinks"
        )
    for module in modules:
        module.linattn.far_decay = far_decay
    spec = getattr(model.config, CONFIG_KEY, None)
    if isinstance(spec, dict) and isinstance(spec.get("options"), dict):
        spec["options"]["far_decay"] = far_decay
    return model


def set_compiled_decoding(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the one-token decoding steps of a FAVOR+-converted decoder's window hybrid
    through ``torch.compile`` (``enabled=True``) or eagerly (``False``, the default of a
    converted model), in place; a runtime switch, not saved. The compiled step computes
    the same as the eager one up to rounding and fuses its many small tensor ops, which
    dominate a decoding step on CPU; it is made on the first step after the window has
    filled (seconds, once per process) and needs a working ``torch.compile`` (on CPU a
    C++ compiler). With slots (``slots > 0``) the steps stay eager, and it is the slot
    decisions on a full cache that are compiled, in the prefill and in decoding alike
    (they dominate a long slot prefill: :func:`linattn.ops.favor.slots.favor_slots_step`
    ``compiled=True``). Prefill without slots, steps before the window fills and steps
    that build a gradient are unaffected. Returns ``model``."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    modules = _favor_layers(model, "set_compiled_decoding")
    for module in modules:
        module.linattn.compile_step = enabled
    return model


def _favor_layers(model: nn.Module, what: str) -> list[nn.Module]:
    """The converted attention modules of ``model``; a ``ValueError`` naming ``what``
    unless every one is FAVOR+-converted."""
    modules = list(converted_layers(model))
    if not modules or any(m.linattn.method != "favor" for m in modules):
        raise ValueError(f"{what} needs a model converted with method='favor'")
    return modules


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def linear_attention_states(model: nn.Module) -> list[nn.Module]:
    """The per-layer ``linattn`` state modules of a converted model, in layer order."""
    return [m.linattn for m in converted_layers(model)]


def set_slots(
    model: nn.Module, slots: int, *, rule: str = "error", interval: int | None = None
) -> nn.Module:
    """Give every layer of a FAVOR+-converted decoder ``slots`` exact key-value slots per
    head (0: none), kept by ``rule``, decided every ``interval`` keys (default: the
    window), in place; see :class:`~.state.FavorLayerState`. The slots hold no parameters:
    a model trained without them (e.g. by attention transfer) can use them at inference.
    The conversion recorded in ``model.config`` follows, so that :func:`save_converted`
    keeps them. Returns ``model``.

    Raises:
        ValueError: the model is not converted with ``method="favor"``, is not causal, has
            no window, or an option is out of range (nothing is changed then).
    """
    modules = _favor_layers(model, "set_slots")
    if not any(bool(getattr(m, "is_causal", False)) for m in modules):
        raise ValueError("slots are for causal decoders; this model is bidirectional")
    # Checked before anything changes.
    first = modules[0].linattn
    slots, rule, interval = check_slots(slots, rule, interval, window=first.window)
    for module in modules:
        state = module.linattn
        state.slots, state.slot_rule, state.slot_interval = slots, rule, interval
    spec = getattr(model.config, CONFIG_KEY, None)
    if isinstance(spec, dict) and isinstance(spec.get("options"), dict):
        spec["options"].update(slots=slots, slot_rule=rule, slot_interval=interval)
    return model


def redraw_projections(model: nn.Module) -> None:
    """Draw fresh FAVOR+ projections in every converted layer (deterministic per layer;
    learned maps are left as they are)."""
    for state in linear_attention_states(model):
        if state.method == "favor" and not state.learned:
            state.redraw_projection()


# Files a save_pretrained of the model writes (or stale ones of an earlier save); other
# files already in the target folder (a tokenizer, notes) are kept when it is replaced.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)


def _carry_over(old: Path, new: Path) -> None:
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if (new / entry.name).exists() or any(
            fnmatch.fnmatch(entry.name, pat) for pat in _MODEL_FILES
        ):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def save_converted(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, **kwargs) -> None:
    """``model.save_pretrained(path)``; the linear-attention state is saved with the
    weights and the conversion settings in ``config.json``, so :func:`load_converted`
    reproduces the outputs exactly.

    The save is atomic: everything is written to a temporary folder beside ``path``,
    which then replaces ``path`` in one step (files already in ``path`` that are not
    model files, e.g. a tokenizer, are kept). An interrupted save leaves the previous
    content of ``path`` (or nothing). ``tokenizer``: saved into the same folder."""
    if getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("model is not converted; save it with save_pretrained()")
    with atomic_directory(path) as tmp:
        _save_pretrained(model, tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _carry_over(Path(path), tmp)


def _save_pretrained(model: nn.Module, path: Path, **kwargs) -> None:
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


# What reading a damaged Hugging Face folder raises, depending on the file and version.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError)


def load_converted(path: str | os.PathLike, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved by :func:`save_converted`.

    Args:
        path: the directory written by :func:`save_converted`.
        model_class: the ``transformers`` class to load with (default: the first entry of
            ``config.architectures``).
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises :class:`linattn.CheckpointError` (a ``ValueError``) naming the folder or file
    when the folder is missing, or its config or weights are missing or damaged.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: no such folder (load_converted takes a folder written by save_converted)"
        )
    raw = read_json(os.path.join(path, "config.json"), "model config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: not a JSON object")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"{path}: no *.safetensors weights file (an interrupted save, "
            "or not a folder written by save_converted)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except _LOAD_ERRORS as exc:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')}: not a usable "
            f"transformers config ({str(exc).strip()[:300]})"
        ) from exc
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        raise CheckpointError(
            f"{path} holds no linattn conversion ({CONFIG_KEY} missing from "
            "config.json); load it with from_pretrained()"
        )
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("options"), dict)
        or spec.get("method") not in ("favor", "linformer")
    ):
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')}: malformed {CONFIG_KEY} {spec!r}"
        )
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch or "", None)
        if model_class is None:
            raise ValueError(
                f"cannot tell the model class from config.architectures="
                f"{config.architectures!r}; pass model_class"
            )
    delattr(config, CONFIG_KEY)
    # The linattn tensors are not part of the original architecture: loaded below.
    hf_logger = logging.getLogger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        model = model_class.from_pretrained(path, config=config, **kwargs)
        saved = {}
        for file in files:
            saved.update({k: v for k, v in load_file(file).items() if ".linattn." in k})
    except _LOAD_ERRORS as exc:
        raise CheckpointError(
            f"{path}: the weights cannot be loaded (truncated, damaged or "
            f"not matching config.json): {str(exc).strip()[:300]}"
        ) from exc
    finally:
        hf_logger.setLevel(level)
    options = dict(spec["options"])
    if spec["method"] == "linformer" and "projection" in options:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')}: a Linformer conversion saved before 0.2.0 "
            f"(its option 'projection' is now 'proj_kind'): rename that key in "
            f"{CONFIG_KEY}.options to load it"
        )
    try:
        convert(model, spec["method"], **options)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')}: its {CONFIG_KEY} options "
            f"cannot be applied: {exc}"
        ) from exc
    own = {k for k in model.state_dict() if ".linattn." in k}
    missing = sorted(own - set(saved))
    if missing:
        raise CheckpointError(f"{path} lacks linear-attention tensors, e.g. {missing[:3]}")
    try:
        result = model.load_state_dict(saved, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the linear-attention tensors do not fit the "
            f"conversion in config.json: {str(exc).strip()[:300]}"
        ) from exc
    if result.unexpected_keys:
        raise CheckpointError(
            f"{path}: unexpected linear-attention tensors {result.unexpected_keys[:3]}"
        )
    return model


__all__ = [
    "convert",
    "converted_layers",
    "linear_attention_states",
    "load_converted",
    "redraw_projections",
    "save_converted",
]
