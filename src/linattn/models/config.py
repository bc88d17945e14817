"""Model configuration (a dataclass, saved as JSON beside the weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from .._checks import is_int
from ..features import KERNELS, Kernel
from ..nn.linformer import PROJ_KINDS, SHARING, LinformerOptions, ProjKind, Sharing
from ..nn.performer import LEARNED_KERNELS, FavorOptions

#: Attention kinds by name: exact softmax attention, FAVOR+ (with a ``kernel``), Linformer.
Attention = Literal["exact", "favor", "linformer"]
ATTENTIONS: tuple[Attention, ...] = get_args(Attention)
POSITIONS = ("rotary", "learned", "sinusoidal", "none")
POOLINGS = ("mean", "cls")


class JsonConfig:
    """``to_dict`` / ``from_dict`` for config dataclasses; unknown keys are an error."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class ModelConfig(JsonConfig):
    """Sizes and choices of a :mod:`linattn.models` Transformer.

    ``attention``: ``"exact"`` (exact softmax attention, ``scaled_dot_product_attention``),
    ``"favor"`` (FAVOR+, its feature map named by ``kernel``: ``"softmax"``, ``"relu"``,
    ``"hedgehog"``, ... from :data:`linattn.KERNELS`) or ``"linformer"`` (bidirectional
    only). ``window`` (FAVOR+ only): None for pure linear attention, or ``w >= 0`` for the
    sliding-window hybrid (exact scores for the ``w`` nearest keys, see
    :class:`linattn.PerformerAttention`). ``sinks`` (FAVOR+ only): the first ``sinks``
    unpadded keys scored exactly by every query (attention sinks; 0: none).
    ``num_features``: ``m`` of FAVOR+ (default
    ``d log d``; ``d`` for ``"hedgehog"``). ``proj_dim``, ``linformer_sharing``,
    ``proj_kind``: Linformer's settings (:class:`linattn.LinformerOptions`, whose
    ``sharing`` is ``linformer_sharing`` here). ``position``: rotary (applied to q and k;
    exact and FAVOR+ only), learned or sinusoidal absolute embeddings, or none.
    """

    vocab_size: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    max_seq_len: int = 1024
    attention: Attention = "favor"
    kernel: Kernel = FavorOptions.kernel
    window: int | None = FavorOptions.window
    sinks: int = FavorOptions.sinks
    causal: bool = False
    num_features: int | None = FavorOptions.num_features
    redraw_interval: int | None = FavorOptions.redraw_interval
    proj_dim: int = LinformerOptions.proj_dim
    linformer_sharing: Sharing = LinformerOptions.sharing
    proj_kind: ProjKind = LinformerOptions.proj_kind
    position: str = "rotary"
    dropout: float = 0.0
    num_classes: int | None = None
    pooling: str = "mean"
    tie_embeddings: bool = True
    checkpointing: bool = False
    seed: int = 0

    def favor_options(self) -> FavorOptions:
        """The FAVOR+ settings of ``attention="favor"`` layers (the rest at their
        :class:`linattn.nn.FavorOptions` defaults)."""
        return FavorOptions.of(self, "num_features", "kernel", "window", "sinks", "redraw_interval")

    def linformer_options(self) -> LinformerOptions:
        """The Linformer settings of ``attention="linformer"`` layers."""
        return LinformerOptions(
            proj_dim=self.proj_dim, sharing=self.linformer_sharing, proj_kind=self.proj_kind
        )

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "ff_mult", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name, choices in (
            ("attention", ATTENTIONS),
            ("position", POSITIONS),
            ("pooling", POOLINGS),
            ("linformer_sharing", SHARING),
            ("proj_kind", PROJ_KINDS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(repr, choices))}; "
                    f"got {getattr(self, name)!r}"
                )
        if self.kernel not in KERNELS:
            raise ValueError(
                f"kernel must be one of {', '.join(map(repr, KERNELS))}; got {self.kernel!r}"
            )
        if self.attention != "favor" and self.kernel != "softmax":
            raise ValueError(
                f"kernel={self.kernel!r} names a FAVOR+ feature map; it needs "
                f"attention='favor', got attention={self.attention!r}"
            )
        if self.window is not None:
            if self.attention != "favor":
                raise ValueError(
                    f"window applies to attention='favor' only, got attention={self.attention!r}"
                )
            if not is_int(self.window) or self.window < 0:
                raise ValueError(f"window must be None or an int >= 0, got {self.window!r}")
            object.__setattr__(self, "window", int(self.window))
        if not is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")
        object.__setattr__(self, "sinks", int(self.sinks))
        if self.sinks and self.attention != "favor":
            raise ValueError(
                f"sinks applies to attention='favor' only, got attention={self.attention!r}"
            )
        if self.attention == "favor" and self.causal and not KERNELS[self.kernel].causal_ok:
            raise ValueError(f"kernel={self.kernel!r} is bidirectional only; it cannot be causal")
        if self.redraw_interval is not None and self.kernel in LEARNED_KERNELS:
            raise ValueError(
                f"kernel={self.kernel!r} is learned: its projection is trained, "
                "not redrawn (redraw_interval must be None)"
            )
        if self.attention == "linformer" and self.causal:
            raise ValueError(
                "attention='linformer' cannot be causal: Linformer's projection along the "
                "sequence mixes future keys into every position; use 'favor' or 'exact'"
            )
        if self.attention == "linformer" and self.position == "rotary":
            raise ValueError(
                "rotary positions are not defined for Linformer (keys are compressed along "
                "the sequence); use position='learned' or 'sinusoidal'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("causal", "tie_embeddings", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (True/False), got {getattr(self, name)!r}")
        # None means the default; 0 must not silently mean it too.
        for name in ("num_features", "redraw_interval", "proj_dim"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"{name} must be a positive int (or None for the default), got {value!r}"
                )
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 2
        ):
            raise ValueError(
                f"num_classes must be None (language model) or an int >= 2, got "
                f"{self.num_classes!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
