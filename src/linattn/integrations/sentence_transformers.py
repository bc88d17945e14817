"""sentence-transformers integration: convert a ``SentenceTransformer`` to linear attention.

A converted sentence-transformers model is used as before::

    from sentence_transformers import SentenceTransformer
    from linattn.integrations.sentence_transformers import (
        convert_sentence_transformer, load_sentence_transformer)

    model = convert_sentence_transformer(SentenceTransformer(path), "favor", num_features=128)
    emb = model.encode(["a sentence", "another one"])
    model.save("minilm-favor")                     # sentence-transformers' own save
    model = load_sentence_transformer("minilm-favor")

:func:`convert_sentence_transformer` converts the ``transformers`` model inside every
``Transformer`` module with :func:`linattn.integrations.hf.convert` (same methods and
options). ``model.save()`` then writes the conversion settings into that module's
``config.json`` and the linear-attention tensors beside the weights.
``SentenceTransformer(folder)`` alone would load the exact-attention model (and warn
about the unused ``linattn`` tensors); :func:`load_sentence_transformer` loads through
``SentenceTransformer`` and restores the conversion, giving the same embeddings.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path

try:
    import sentence_transformers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "linattn.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'linattn[st]'"
    ) from exc

from safetensors.torch import load_file

from .hf import convert
from .hf.convert import CONFIG_KEY

__all__ = ["convert_sentence_transformer", "load_sentence_transformer"]


def _transformer_modules(model) -> list[tuple[str, object]]:
    """``(name, module)`` of the modules that hold a ``transformers`` model."""
    return [
        (name, m)
        for name, m in model.named_children()
        if hasattr(m, "auto_model") and hasattr(m.auto_model, "config")
    ]


def convert_sentence_transformer(model, method: str = "favor", **options):
    """Convert every ``transformers`` model inside a ``SentenceTransformer``, in place.

    Args:
        model: a ``sentence_transformers.SentenceTransformer``.
        method, options: as for :func:`linattn.integrations.hf.convert` (``"favor"`` with
            ``num_features``, ``kernel``, ``seed``...; or ``"linformer"``).

    Returns:
        ``model``. ``model.encode()`` now runs linear attention; ``model.save(path)``
        keeps the conversion and :func:`load_sentence_transformer` restores it.
    """
    if not isinstance(model, sentence_transformers.SentenceTransformer):
        raise TypeError(
            f"model must be a sentence_transformers.SentenceTransformer, got {type(model).__name__}"
        )
    modules = _transformer_modules(model)
    if not modules:
        raise ValueError("found no Transformer module (one with .auto_model) in the model")
    for _, module in modules:
        convert(module.auto_model, method, **options)
    return model


def _restore(hf_model, folder: Path) -> None:
    spec = getattr(hf_model.config, CONFIG_KEY)
    delattr(hf_model.config, CONFIG_KEY)  # convert() records it again
    convert(hf_model, spec["method"], **spec["options"])
    own = {k for k in hf_model.state_dict() if ".linattn." in k}
    saved = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        saved.update({k: v for k, v in load_file(file).items() if ".linattn." in k})
    missing = sorted(own - set(saved))
    if missing:
        raise ValueError(f"{folder} lacks linear-attention tensors, e.g. {missing[:3]}")
    result = hf_model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{folder}: unexpected linear-attention tensors {result.unexpected_keys[:3]}"
        )


def load_sentence_transformer(path: str | os.PathLike, **kwargs):
    """``SentenceTransformer(path, **kwargs)`` with the linear-attention conversion that
    :func:`convert_sentence_transformer` + ``model.save(path)`` stored restored (same
    embeddings as the saved model). A folder without a conversion loads unchanged."""
    path = Path(path)
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a saved sentence-transformers model (no modules.json)"
        )
    entries = {
        str(e["name"]): e.get("path", "") for e in json.loads((path / "modules.json").read_text())
    }
    # The linattn tensors are not part of the original architecture: restored below.
    hf_logger = logging.getLogger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        model = sentence_transformers.SentenceTransformer(str(path), **kwargs)
    finally:
        hf_logger.setLevel(level)
    for name, module in _transformer_modules(model):
        if getattr(module.auto_model.config, CONFIG_KEY, None) is not None:
            _restore(module.auto_model, path / entries.get(name, ""))
    return model
