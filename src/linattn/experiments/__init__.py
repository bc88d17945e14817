"""Application code above the library: the packaged pretrained models
(:mod:`.pretrained`) and the conversion experiments behind ``linattn convert`` and its
recipes (:mod:`.convert`, needs the ``[hf]`` extra).

``load_pretrained`` loads the packaged models (``"minilm"``, ``"smollm2"``) or a local
folder, offline."""

from .pretrained import PACKAGES, available, load_pretrained, package_dir

__all__ = ["PACKAGES", "available", "load_pretrained", "package_dir"]
