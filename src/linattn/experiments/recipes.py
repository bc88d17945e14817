"""The recipes of ``linattn convert --recipe``: the FAVOR+ settings a pretrained model is
converted with and the settings of its training stages (:data:`RECIPES`, their decoder
forms :data:`DECODER_RECIPES`), and the command line's defaults read from them
(:func:`recipe_defaults`). Needs the ``[hf]`` extra."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..integrations.hf.distill import DistillConfig
from ..integrations.hf.transfer import TransferConfig
from ..nn.performer import FavorOptions


@dataclass(frozen=True)
class Recipe:
    """A ``linattn convert --recipe``: the FAVOR+ settings it converts with and the
    settings of its training stages (``transfer`` None: no attention transfer). The
    command line's defaults are these values; a flag replaces one."""

    favor: FavorOptions
    distill: DistillConfig
    transfer: TransferConfig | None = None
    #: the training text: one corpus of :data:`CORPORA`, or several mixed in equal parts
    #: (:func:`mixed_training_texts`).
    corpora: tuple[str, ...] = ("gcide",)

    def favor_options(self) -> dict:
        """The FAVOR+ settings as ``convert(model, "favor", **options)`` takes them."""
        return vars(self.favor).copy()


RECIPES = {
    # End-to-end distillation: the defaults of FavorOptions and DistillConfig.
    "distill": Recipe(FavorOptions(), DistillConfig()),
    # docs/results/hf_transfer.md's MiniLM recipe: hedgehog maps with m = 64 rows per
    # head (LoLCATs' feature_dim; 2 x MiniLM's head_dim), a 16-key window and one exact
    # sink key, TransferConfig's 400 attention-transfer steps, then 600 LoRA distillation
    # steps, on GCIDE and Python documentation text mixed.
    "transfer": Recipe(
        FavorOptions(kernel="hedgehog", num_features=64, window=16, sinks=1),
        DistillConfig(
            steps=600,
            batch_size=4,
            max_length=512,
            lr=1e-3,
            warmup=10,
            eval_every=100,
            train="lora",
        ),
        TransferConfig(),
        corpora=("gcide", "python-docs"),
    ),
}

#: Recipes whose settings differ for decoders (causal LMs). ``transfer``: the
#: SmolLM2-135M recipe of docs/results/hf_transfer.md: a 64-key window (a decoder's
#: attention does not survive a 16-key one), 200 attention-transfer steps, then 60 LoRA
#: distillation steps at lr 1e-4 (a decoder's KL loss on 4 x 512 tokens; about 2 h on
#: one CPU thread).
_TRANSFER = RECIPES["transfer"]
DECODER_RECIPES = {
    "transfer": dataclasses.replace(
        _TRANSFER,
        favor=dataclasses.replace(_TRANSFER.favor, window=64),
        distill=dataclasses.replace(_TRANSFER.distill, steps=60, lr=1e-4, eval_every=30),
        transfer=dataclasses.replace(
            _TRANSFER.transfer, steps=200, eval_every=50, checkpoint_every=50
        ),
    ),
}


def recipe_for(name: str, decoder: bool = False) -> Recipe:
    """The recipe ``name`` of :data:`RECIPES`, or for a decoder (``decoder=True``) its
    :data:`DECODER_RECIPES` form where there is one."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return DECODER_RECIPES.get(name, RECIPES[name]) if decoder else RECIPES[name]


# `linattn convert` flags whose defaults follow --recipe: flag -> (part, field) of a
# :class:`Recipe`. The values are written there, once.
RECIPE_FLAGS = {
    "kernel": ("favor", "kernel"),
    "num_features": ("favor", "num_features"),
    "window": ("favor", "window"),
    "sinks": ("favor", "sinks"),
    "corpus": (None, "corpora"),
    "steps": ("distill", "steps"),
    "batch_size": ("distill", "batch_size"),
    "max_length": ("distill", "max_length"),
    "lr": ("distill", "lr"),
    "warmup": ("distill", "warmup"),
    "eval_every": ("distill", "eval_every"),
    "train": ("distill", "train"),
    "lora_rank": ("distill", "lora_rank"),
    "lora_targets": ("distill", "lora_targets"),
    "checkpoint_every": ("distill", "checkpoint_every"),
    "transfer_steps": ("transfer", "steps"),
    "transfer_batch_size": ("transfer", "batch_size"),
    "transfer_max_length": ("transfer", "max_length"),
    "transfer_lr": ("transfer", "lr"),
    "transfer_warmup": ("transfer", "warmup"),
}


def recipe_defaults(recipe: str, decoder: bool = False) -> dict:
    """The defaults of the `linattn convert` flags under ``--recipe recipe`` (flag
    destination -> value) for an encoder or (``decoder``) a causal LM, read from
    :func:`recipe_for`."""
    chosen = recipe_for(recipe, decoder)
    out = {}
    for flag, (part, field) in RECIPE_FLAGS.items():
        stage = chosen if part is None else getattr(chosen, part)
        if stage is not None:
            value = getattr(stage, field)
            out[flag] = list(value) if isinstance(value, tuple) else value
    return out
