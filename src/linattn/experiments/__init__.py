"""Application code above the library: the packaged pretrained models
(:mod:`.pretrained`), the conversion experiments behind ``linattn convert``
(:mod:`.convert`) and its recipes (:mod:`.recipes`); these two need the ``[hf]`` extra.

``load_pretrained`` loads the packaged models (``"minilm"``, ``"smollm2"``) or a local
folder, offline."""

from .pretrained import PACKAGES, available, load_pretrained, package_dir

__all__ = ["PACKAGES", "available", "load_pretrained", "package_dir"]
