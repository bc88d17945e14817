"""Training tasks: byte-level language modelling on GCIDE, LRA ListOps, fortunes topics.

A task builds its model and serves batches that depend only on ``(seed, step)``: every
rank of a distributed job draws the same global batch and takes its own slice, and a
resumed run sees exactly the batches the uninterrupted one would have.

With ``cfg.pack`` the classification tasks (:data:`PACKABLE_TASKS`) pack whole examples
back to back into one row with ``cu_seqlens`` (:func:`pack_documents`) instead of padding
each to the longest; the loss is the mean over the packed examples, each classified from
its own tokens. Evaluation is the same padded pass over the same examples either way, so
packed and padded runs compare directly.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import CausalLM, ModelConfig, SequenceClassifier

TASKS = ("bytes", "listops", "fortunes")
# Tasks made of whole documents of varying length, which ``pack`` can put back to back
# (``bytes`` draws fixed windows from one continuous text: nothing to pack).
PACKABLE_TASKS = ("listops", "fortunes")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator determined by (seed, step, stream) alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def shard(x: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of a global batch (``x.shape[0] % world == 0``)."""
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


def pack_documents(
    sizes: list[int], rows: int, budget: int, generator: torch.Generator
) -> list[list[int]]:
    """Documents drawn at random (indices into ``sizes``, with replacement, from
    ``generator``) and packed whole, in the order drawn, into ``rows`` rows of at most
    ``budget`` tokens each: a row closes at the first document that does not fit, which
    opens the next row; the draw ends when the last row is full. Returns each row's
    indices. Every size must be in ``[1, budget]``."""
    out: list[list[int]] = [[]]
    used = 0
    while True:
        for i in torch.randint(0, len(sizes), (64,), generator=generator).tolist():
            n = sizes[i]
            if not 1 <= n <= budget:
                raise ValueError(f"document {i} has {n} tokens; packing needs 1..{budget}")
            if used + n > budget:
                if len(out) == rows:
                    return out
                out.append([])
                used = 0
            out[-1].append(i)
            used += n


def _model_config(c, **task) -> ModelConfig:
    """The model of run config ``c`` (sizes, attention, dropout, seed); ``task``: the
    settings the task chooses itself (vocabulary, causality, positions, ...)."""
    return ModelConfig(
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        ff_mult=c.ff_mult,
        max_seq_len=c.seq_len,
        attention=c.attention,
        kernel=c.kernel,
        window=c.window,
        sinks=c.sinks,
        num_features=c.num_features,
        redraw_interval=c.redraw_interval,
        dropout=c.dropout,
        seed=c.seed,
        **task,
    )


def _all_sum(values: list[float], device) -> list[float]:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()
    return values


class ByteLM:
    """Next-byte prediction on GCIDE (the enwik8 setting): random windows of
    ``seq_len + 1`` bytes; evaluation in bits per byte on held-out text."""

    name = "bytes"
    metric = "bits_per_byte"
    higher_is_better = False

    def __init__(self, cfg, data: dict | None = None):
        from ..data.bytes_lm import gcide_bytes

        self.cfg = cfg
        self.data = data if data is not None else gcide_bytes()

    def model_config(self) -> ModelConfig:
        return _model_config(self.cfg, vocab_size=256, causal=True, position="rotary")

    def build_model(self) -> nn.Module:
        return CausalLM(self.model_config())

    def batch(self, step: int, rank: int, world: int, device) -> dict:
        from ..data.bytes_lm import random_windows

        x, y = random_windows(
            self.data["train"],
            self.cfg.batch_size,
            self.cfg.seq_len,
            step_generator(self.cfg.seed, step),
        )
        return {"x": shard(x, rank, world).to(device), "y": shard(y, rank, world).to(device)}

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        logits = model(batch["x"])
        return F.cross_entropy(logits.reshape(-1, 256).float(), batch["y"].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, rank: int, world: int, device) -> dict:
        from ..data.bytes_lm import eval_windows

        windows = eval_windows(
            self.data[split],
            self.cfg.seq_len,
            max_windows=self.cfg.eval_batches * self.cfg.batch_size,
        )
        mine = windows[rank::world]
        nll, count = 0.0, 0
        for i in range(0, mine.shape[0], self.cfg.batch_size):
            w = mine[i : i + self.cfg.batch_size].to(device)
            logits = model(w[:, :-1]).float()
            nll += F.cross_entropy(
                logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += w[:, 1:].numel()
        nll, count = _all_sum([nll, float(count)], device)
        return {
            "bits_per_byte": nll / count / math.log(2),
            "loss": nll / count,
            "tokens": int(count),
        }


class _Classification:
    """Padded batches of token sequences with ``key_padding_mask``; accuracy."""

    metric = "accuracy"
    higher_is_better = True
    vocab_size: int
    num_classes: int
    splits: dict[str, list[tuple[list[int], int]]]

    def model_config(self) -> ModelConfig:
        c = self.cfg
        # Learned absolute positions for every attention kind, so that Linformer (which
        # has no rotary form) is compared on equal terms.
        return _model_config(
            c,
            vocab_size=self.vocab_size,
            causal=False,
            proj_dim=c.proj_dim,
            linformer_sharing=c.linformer_sharing,
            position="learned",
            num_classes=self.num_classes,
            pooling="mean",
        )

    def build_model(self) -> nn.Module:
        return SequenceClassifier(self.model_config())

    def _collate(self, rows: list[tuple[list[int], int]], device) -> dict:
        width = max(len(r[0]) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        pad = torch.ones(len(rows), width, dtype=torch.bool)
        for i, (ids, _) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            pad[i, : len(ids)] = False
        y = torch.tensor([r[1] for r in rows])
        return {"x": x.to(device), "mask": pad.to(device), "y": y.to(device)}

    def batch(self, step: int, rank: int, world: int, device) -> dict:
        if getattr(self.cfg, "pack", False):
            return self._packed_batch(step, rank, world, device)
        train = self.splits["train"]
        idx = torch.randint(
            0, len(train), (self.cfg.batch_size,), generator=step_generator(self.cfg.seed, step)
        )
        rows = [train[i] for i in shard(idx, rank, world).tolist()]
        return self._collate(rows, device)

    def _packed_batch(self, step: int, rank: int, world: int, device) -> dict:
        """Whole training examples packed into one row per rank of ``batch_size / world
        * seq_len`` tokens (:func:`pack_documents`, the same draw on every rank);
        ``scale`` = ``world / examples in the global batch``, so that the loss summed
        over this rank's examples times ``scale``, averaged over the ranks (as DDP
        averages gradients), is the mean over every example of the global batch."""
        train = self.splits["train"]
        if not hasattr(self, "_train_sizes"):
            self._train_sizes = [len(ids) for ids, _ in train]
        budget = self.cfg.batch_size // world * self.cfg.seq_len
        rows = pack_documents(self._train_sizes, world, budget, step_generator(self.cfg.seed, step))
        mine = [train[i] for i in rows[rank]]
        x = torch.tensor([t for ids, _ in mine for t in ids], dtype=torch.long)
        cu = torch.tensor([0, *itertools.accumulate(len(ids) for ids, _ in mine)])
        y = torch.tensor([label for _, label in mine])
        return {
            "x": x.unsqueeze(0).to(device),
            "cu_seqlens": cu.to(device=device, dtype=torch.int32),
            "y": y.to(device),
            "scale": world / sum(len(r) for r in rows),
        }

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        if "cu_seqlens" in batch:
            logits = model(batch["x"], cu_seqlens=batch["cu_seqlens"]).float()
            return F.cross_entropy(logits, batch["y"], reduction="sum") * batch["scale"]
        return F.cross_entropy(model(batch["x"], batch["mask"]).float(), batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, rank: int, world: int, device) -> dict:
        rows = self.splits[split][: self.cfg.eval_batches * self.cfg.batch_size]
        mine = rows[rank::world]
        correct, loss, count = 0.0, 0.0, 0
        for i in range(0, len(mine), self.cfg.batch_size):
            b = self._collate(mine[i : i + self.cfg.batch_size], device)
            logits = model(b["x"], b["mask"]).float()
            loss += F.cross_entropy(logits, b["y"], reduction="sum").item()
            correct += (logits.argmax(-1) == b["y"]).sum().item()
            count += len(b["y"])
        correct, loss, count = _all_sum([correct, loss, float(count)], device)
        return {"accuracy": correct / count, "loss": loss / count, "examples": int(count)}


class ListOps(_Classification):
    """LRA ListOps (10 classes), token ids with a leading ``<cls>``."""

    name = "listops"
    num_classes = 10

    def __init__(self, cfg, splits: dict | None = None):
        from ..data import listops

        self.cfg = cfg
        self.vocab_size = len(listops.VOCAB)
        if splits is None:
            self.splits = listops.encoded_splits(
                train=cfg.listops_train,
                val=cfg.listops_eval,
                test=cfg.listops_eval,
                seed=0,
                min_length=cfg.listops_min_len,
                max_length=min(cfg.listops_max_len, cfg.seq_len - 1),
            )
            return
        self.splits = {k: [(listops.encode(t), y) for t, y in v] for k, v in splits.items()}


class Fortunes(_Classification):
    """Topic of a fortune quotation, from its UTF-8 bytes (ids ``byte + 2``; 0 pads,
    1 is ``<cls>``), truncated to ``seq_len``."""

    name = "fortunes"

    def __init__(self, cfg, dataset: dict | None = None):
        from ..data.fortunes import topic_dataset

        self.cfg = cfg
        d = dataset if dataset is not None else topic_dataset(seed=0)
        self.labels = d["labels"]
        self.num_classes = len(self.labels)
        self.vocab_size = 258

        def enc(text: str) -> list[int]:
            return [1, *(b + 2 for b in text.encode("utf-8")[: cfg.seq_len - 1])]

        self.splits = {
            "train": [(enc(t), y) for t, y in d["train"]],
            "val": [(enc(t), y) for t, y in d["test"]],
            "test": [(enc(t), y) for t, y in d["test"]],
        }


def build_task(cfg, **data):
    """The task named ``cfg.task`` (data may be injected for tests)."""
    if cfg.task == "bytes":
        return ByteLM(cfg, data.get("data"))
    if cfg.task == "listops":
        return ListOps(cfg, data.get("splits"))
    if cfg.task == "fortunes":
        return Fortunes(cfg, data.get("dataset"))
    raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
