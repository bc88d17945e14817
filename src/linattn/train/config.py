"""Training configuration: a dataclass, readable from a JSON file and from flags."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .._checks import check_choice, check_positive_int, check_real
from ..features import Kernel
from ..models.config import ATTENTIONS, Attention, JsonConfig, ModelConfig
from ..nn.linformer import SHARING, LinformerOptions, Sharing
from ..nn.performer import FavorOptions
from .tasks import PACKABLE_TASKS, TASKS

# Fields added to TrainConfig after runs were saved without them, and the value those
# runs used (their models were built with it): linformer_sharing came in 0.2.0, when
# Linformer's default became "none"; runs before it had ModelConfig's "headwise".
LEGACY_VALUES = {"linformer_sharing": "headwise"}


@dataclass
class TrainConfig(JsonConfig):
    """Everything a run depends on (saved beside its results).

    Model: ``attention`` (``exact``, ``favor``, ``linformer``), ``kernel`` (the FAVOR+
    feature map: ``softmax``, ``relu``, ``hedgehog``, ...), ``window`` (FAVOR+
    sliding-window hybrid: None, or the number of nearest keys scored exactly), ``sinks``
    (FAVOR+: the first ``sinks`` keys scored exactly by every query; 0: none), ``dim``,
    ``depth``, ``heads``, ``ff_mult``, ``num_features`` (FAVOR+), ``proj_dim`` and
    ``linformer_sharing`` (Linformer), ``redraw_interval``, ``dropout``. Data: ``task`` (``bytes``,
    ``listops``, ``fortunes``), ``seq_len`` (window for ``bytes``, maximum tokens for the
    classification tasks), ``batch_size`` (the global batch, split over ranks),
    ``listops_train`` / ``listops_eval`` (LRA: 96000 / 2000) and
    ``listops_min_len`` / ``listops_max_len`` (LRA: 500 / 2000 tokens; sequences longer
    than ``seq_len - 1`` are not generated), ``pack`` (classification tasks: build each
    training batch by packing whole examples back to back, up to ``batch_size *
    seq_len`` tokens in one row with ``cu_seqlens``, instead of padding each to the
    longest; evaluation stays padded, on the same examples). Optimization: AdamW
    (``lr``, ``weight_decay``, ``betas``), ``warmup`` steps of linear warm-up then cosine
    decay to ``min_lr_ratio * lr``, ``grad_clip``, ``steps``. Bookkeeping:
    ``eval_every``, ``eval_batches`` (batches per evaluation), ``log_every``,
    ``checkpoint_every``, ``seed``.
    """

    task: str = "bytes"
    attention: Attention = "favor"
    kernel: Kernel = FavorOptions.kernel
    window: int | None = FavorOptions.window
    sinks: int = FavorOptions.sinks
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    num_features: int | None = FavorOptions.num_features
    proj_dim: int = LinformerOptions.proj_dim
    linformer_sharing: Sharing = LinformerOptions.sharing
    redraw_interval: int | None = FavorOptions.redraw_interval
    dropout: float = 0.0
    seq_len: int = 512
    batch_size: int = 16
    listops_train: int = 96_000
    listops_eval: int = 2_000
    listops_min_len: int = 500
    listops_max_len: int = 2000
    pack: bool = False
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 16
    log_every: int = 10
    checkpoint_every: int = 500
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A saved config: fields it predates take the value such runs used
        (:data:`LEGACY_VALUES`), not today's default."""
        return super().from_dict({**LEGACY_VALUES, **data})

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("linformer_sharing", self.linformer_sharing, SHARING)
        if self.task == "bytes" and self.attention == "linformer":
            raise ValueError(
                "task='bytes' is causal language modelling; Linformer cannot be "
                "causal (use exact or favor)"
            )
        if not isinstance(self.pack, bool):
            raise TypeError(f"pack must be a bool, got {self.pack!r}")
        if self.pack and self.task not in PACKABLE_TASKS:
            raise ValueError(
                f"pack=True needs a task of whole documents of varying length "
                f"({', '.join(PACKABLE_TASKS)}); task={self.task!r} draws windows of "
                "exactly seq_len + 1 bytes from one continuous text, so there is no "
                "padding to save and no document boundary to pack at"
            )
        for name in (
            "dim",
            "depth",
            "heads",
            "seq_len",
            "batch_size",
            "steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
        ):
            setattr(self, name, check_positive_int(name, getattr(self, name)))
        for name in (
            "ff_mult",
            "proj_dim",
            "listops_train",
            "listops_eval",
            "listops_min_len",
            "listops_max_len",
        ):
            setattr(self, name, check_positive_int(name, getattr(self, name)))
        for name in ("num_features", "redraw_interval"):
            if getattr(self, name) is not None:
                setattr(self, name, check_positive_int(name, getattr(self, name)))
        self.warmup = check_positive_int("warmup", self.warmup, minimum=0)
        self.seed = check_positive_int("seed", self.seed, minimum=0)
        if self.listops_min_len > self.listops_max_len:
            raise ValueError(
                f"listops_min_len ({self.listops_min_len}) must be <= "
                f"listops_max_len ({self.listops_max_len})"
            )
        # Real numbers: (name, low, high, low inclusive, high inclusive).
        for name, lo, hi, lo_in, hi_in in (
            ("lr", 0.0, math.inf, False, False),
            ("weight_decay", 0.0, math.inf, True, False),
            ("min_lr_ratio", 0.0, 1.0, True, True),
            ("grad_clip", 0.0, math.inf, True, False),
            ("dropout", 0.0, 1.0, True, False),
        ):
            # Stored as the Python number check_real returns (NumPy values are not JSON).
            value = check_real(
                name, getattr(self, name), lo, hi, low_inclusive=lo_in, high_inclusive=hi_in
            )
            setattr(self, name, value)
        if (
            not isinstance(self.betas, tuple | list)
            or len(self.betas) != 2
            or not all(
                not isinstance(b, bool) and isinstance(b, int | float) and 0.0 <= b < 1.0
                for b in self.betas
            )
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        # The model's checks of attention, kernel, window and redraws, written once there
        # (its window and sinks are Python ints).
        model = ModelConfig(
            vocab_size=2,
            dim=self.dim,
            heads=self.heads,
            attention=self.attention,
            kernel=self.kernel,
            window=self.window,
            sinks=self.sinks,
            causal=self.task == "bytes",
            redraw_interval=self.redraw_interval,
            position="rotary" if self.task == "bytes" else "learned",
        )
        self.window, self.sinks = model.window, model.sinks
        self.betas = tuple(self.betas)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
