"""Attention transfer: train a converted model's feature maps to reproduce each layer's
original attention (the first stage of a Hedgehog / LoLCATs-style conversion).

Only the linear-attention parameters move (learned projections ``W_h`` and the window
factors ``log_linear_factor``; a trainable FAVOR+ projection too): the model's own
weights stay as they are. Each batch runs one forward pass in *transfer mode*
(:func:`attention_transfer_mode`): every converted layer computes both the exact softmax
attention and its linear attention on the same ``q, k, v`` (detached), records their
difference, and returns the **exact** output, so that every layer is trained on the
original model's inputs to that layer (teacher forcing). The loss is the mean over layers
of the relative squared error ``|linear - exact|^2 / |exact|^2`` over real (unpadded)
query positions: normalized per layer, so that every layer counts the same whatever the
scale of its outputs (LoLCATs multiplies an unnormalized MSE by 1000 instead).

The second stage is the end-to-end distillation of :mod:`.distill`.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..._io import torch_save, write_json, write_jsonl
from ..._plotting import curve, finish, optional_pyplot
from ..._schedule import warmup_cosine
from .convert import save_converted
from .distill import (
    agreement,
    check_run_settings,
    is_causal_lm,
    log_row,
    optimizer_step,
    tokenize,
)
from .state import FavorLayerState, converted_layers

STATE_FILE = "transfer_state.pt"


class TransferRecorder:
    """Collects, for each converted layer a forward pass goes through, the squared error
    of its linear attention against the exact one and the exact one's squared norm (sums
    over real query positions, heads and channels)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Tensor, Tensor]] = []

    def record(
        self, module: nn.Module, approx: Tensor, exact: Tensor, key_padding_mask: Tensor | None
    ) -> None:
        """``approx, exact: (B, H, Lq, d)``; ``key_padding_mask: (B, Lk)`` True = padding
        (padded queries, when ``Lq == Lk``, do not count)."""
        diff = (approx - exact.to(approx.dtype)).square()
        ref = exact.to(approx.dtype).square()
        if key_padding_mask is not None and key_padding_mask.shape[-1] == approx.shape[-2]:
            real = (~key_padding_mask)[:, None, :, None].to(approx.dtype)
            diff, ref = diff * real, ref * real
        self.rows.append((int(module.layer_idx), diff.sum(), ref.sum()))

    def clear(self) -> None:
        self.rows.clear()

    def loss(self) -> Tensor:
        """Mean over the recorded layers of ``|linear - exact|^2 / |exact|^2``."""
        if not self.rows:
            raise ValueError(
                "no converted layer ran in transfer mode: is the model "
                "converted with method='favor'?"
            )
        return torch.stack([e / r.clamp_min(1e-30) for _, e, r in self.rows]).mean()


@contextmanager
def attention_transfer_mode(model: nn.Module):
    """Within the block, every FAVOR-converted layer of ``model`` returns the exact
    softmax attention and records its linear attention's error into the yielded
    :class:`TransferRecorder`."""
    states = [m.linattn for m in converted_layers(model) if isinstance(m.linattn, FavorLayerState)]
    if not states:
        raise ValueError("attention transfer needs a model converted with method='favor'")
    recorder = TransferRecorder()
    for s in states:
        s.transfer = recorder
    try:
        yield recorder
    finally:
        for s in states:
            s.__dict__.pop("transfer", None)


def transfer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable linear-attention parameters of ``model``: learned projections and
    window factors (and a FAVOR+ projection converted with ``learn_projection=True``)."""
    params: dict[int, nn.Parameter] = {}
    for m in converted_layers(model):
        for p in m.linattn.parameters():
            params[id(p)] = p
    return list(params.values())


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> None:
    # The base model only: a decoder's vocabulary projection is not needed here.
    base = getattr(model, "base_model", model)
    if is_causal_lm(model):
        base(**batch, use_cache=False)
    else:
        base(**batch)


@torch.no_grad()
def attention_errors(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
) -> dict:
    """Teacher-forced relative L2 error of each converted layer's attention output,
    ``sqrt(sum |linear - exact|^2 / sum |exact|^2)`` over ``texts`` (real tokens):
    ``attn_rel_error`` (mean over layers) and ``attn_rel_error_layers`` (layer order)."""
    device = next(model.parameters()).device
    err: dict[int, float] = {}
    ref: dict[int, float] = {}
    was_training = model.training
    model.eval()
    with attention_transfer_mode(model) as rec:
        for i in range(0, len(texts), batch_size):
            rec.clear()
            _forward(model, tokenize(tokenizer, texts[i : i + batch_size], max_length, device))
            for layer, e, r in rec.rows:
                err[layer] = err.get(layer, 0.0) + e.item()
                ref[layer] = ref.get(layer, 0.0) + r.item()
    model.train(was_training)
    layers = [math.sqrt(err[k] / max(ref[k], 1e-30)) for k in sorted(err)]
    return {"attn_rel_error": sum(layers) / len(layers), "attn_rel_error_layers": layers}


@dataclass
class TransferConfig:
    """Attention-transfer settings. The defaults are ``linattn convert --recipe
    transfer``'s first stage (docs/results/hf_transfer.md's MiniLM recipe).

    Attributes:
        steps: optimizer steps (0: none); batch_size: texts per step; max_length: tokens
            per text.
        lr, weight_decay, warmup: AdamW (LoLCATs: lr 1e-2) with linear warm-up over
            ``warmup`` steps, then cosine decay to 10% of ``lr``.
        eval_every: measure on the held-out texts every this many steps (and at the end);
        eval_batch_size: texts per evaluation batch.
        checkpoint_every: save the model (``checkpoint/``) and the training state
            (``transfer_state.pt``, for ``resume``) every this many steps (0: at the end).
        seed: batch order.
    """

    steps: int = 400
    batch_size: int = 4
    max_length: int = 512
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup: int = 3
    eval_every: int = 100
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_run_settings(self)


def batch_texts(texts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The texts of (1-based) ``step``: consecutive slices of seeded per-epoch
    permutations, so a resumed run sees the same batches as an uninterrupted one."""
    n = len(texts)
    out = []
    for index in range((step - 1) * batch_size, step * batch_size):
        epoch, pos = divmod(index, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(texts[perm[pos]])
    return out


def _save_state(path: Path, model: nn.Module, opt, sched, step: int, log: list[dict]) -> None:
    state = {
        "step": step,
        "log": log,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "linattn": {k: v for k, v in model.state_dict().items() if ".linattn." in k},
    }
    torch_save(state, path)


def transfer(
    model: nn.Module,
    tokenizer,
    train_texts: list[str],
    eval_texts: list[str],
    config: TransferConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train ``model``'s linear-attention parameters (in place) so that each converted
    layer's attention output matches the exact attention on the same inputs.

    Args:
        model: a model converted with ``method="favor"`` whose states have trainable
            parameters (a learned kernel such as ``"hedgehog"``, or
            ``learn_projection=True``).
        tokenizer: its tokenizer; train_texts, eval_texts: real text.
        config: :class:`TransferConfig`.
        teacher: the original model; if given, every evaluation also measures the
            end-to-end agreement (:func:`~.distill.agreement`) of ``model`` with it.
        out_dir: writes ``log.jsonl`` (one row per evaluation), ``transfer.png``,
            ``transfer_config.json``, ``checkpoint/`` (:func:`~.convert.save_converted`)
            and ``transfer_state.pt`` (what ``resume`` needs).
        resume: continue from ``out_dir/transfer_state.pt`` if it exists (same batches,
            schedule and optimizer state as an uninterrupted run).

    Returns:
        the log: per evaluation ``step``, ``loss`` (running mean of the training loss),
        ``lr``, ``elapsed_s``, ``attn_rel_error`` (mean over layers, teacher-forced, on
        ``eval_texts``), ``attn_rel_error_layers`` and, with a ``teacher``, the
        agreement metrics.
    """
    cfg = config or TransferConfig()
    if not train_texts or not eval_texts:
        raise ValueError("transfer needs non-empty train_texts and eval_texts")
    params = transfer_parameters(model)
    if not params:
        raise ValueError(
            "the converted model has no trainable linear-attention parameters: "
            "convert with kernel='hedgehog' (or learn_projection=True)"
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "transfer_config.json", asdict(cfg))
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.warmup, max(cfg.steps, 1), 0.1)
    )
    log: list[dict] = []
    first = 1
    state_path = out / STATE_FILE if out is not None else None
    if resume and state_path is not None and state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["linattn"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        log, first = saved["log"], saved["step"] + 1
    # Only the linear-attention parameters take gradients; the rest is restored after.
    own = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in own and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if teacher is not None:
        teacher.eval()
    start = time.perf_counter() - (log[-1]["elapsed_s"] if log else 0.0)

    def evaluate(step: int, loss: float | None) -> None:
        model.eval()
        row = log_row(step, loss, sched, start)
        row.update(
            attention_errors(
                model,
                tokenizer,
                eval_texts,
                max_length=cfg.max_length,
                batch_size=cfg.eval_batch_size,
            )
        )
        if teacher is not None:
            row.update(
                agreement(
                    teacher,
                    model,
                    tokenizer,
                    eval_texts,
                    max_length=cfg.max_length,
                    batch_size=cfg.eval_batch_size,
                )
            )
        log.append(row)
        if out is not None:
            write_jsonl(out / "log.jsonl", log)

    def checkpoint(step: int) -> None:
        if out is None:
            return
        save_converted(model, out / "checkpoint")
        _save_state(state_path, model, opt, sched, step, log)

    bar = tqdm(total=cfg.steps, initial=first - 1, desc="attention transfer", disable=not progress)
    running = log[-1]["loss"] if log else None
    try:
        if not log:
            evaluate(0, None)
        for step in range(first, cfg.steps + 1):
            model.eval()  # no dropout: the exact outputs are the targets
            texts = batch_texts(train_texts, step, cfg.batch_size, cfg.seed)
            batch = tokenize(tokenizer, texts, cfg.max_length, device)
            with attention_transfer_mode(model) as rec:
                _forward(model, batch)
                loss = rec.loss()
            running = optimizer_step(loss, opt, sched, params, running)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step, running)
                bar.set_postfix(loss=f"{running:.4f}", attn_err=f"{log[-1]['attn_rel_error']:.3f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    if out is not None:
        checkpoint(cfg.steps)
        plot_transfer(log, out / "transfer.png")
    return log


def plot_transfer(log: list[dict], path: Path, *, title: str = "attention transfer") -> None:
    """Per-layer attention-output error (and the end-to-end agreement, if measured)
    against transfer steps."""
    plt = optional_pyplot()
    if plt is None:
        return
    steps = [r["step"] for r in log]
    extra = next((k for k in ("mean_cosine", "ppl_ratio") if k in log[0]), None)
    fig, axes = plt.subplots(
        1, 2 if extra else 1, figsize=(10 if extra else 5.5, 3.6), squeeze=False
    )
    ax = axes[0][0]
    layers = len(log[0]["attn_rel_error_layers"])
    for i in range(layers):
        ax.plot(
            steps,
            [r["attn_rel_error_layers"][i] for r in log],
            lw=1,
            alpha=0.6,
            label=f"layer {i}" if layers <= 8 else None,
        )
    ax.plot(steps, [r["attn_rel_error"] for r in log], "k-o", lw=2, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("transfer step")
    ax.set_ylabel("attention output rel. error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if extra:
        curve(
            axes[0][1],
            steps,
            [r[extra] for r in log],
            xlabel="transfer step",
            ylabel=extra.replace("_", " "),
            marker="o",
        )
    finish(fig, path, title=title)


__all__ = [
    "TransferConfig",
    "TransferRecorder",
    "attention_errors",
    "attention_transfer_mode",
    "batch_texts",
    "transfer",
    "transfer_parameters",
]
