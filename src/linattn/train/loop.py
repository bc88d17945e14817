"""The training loop: single process or ``torchrun`` (DistributedDataParallel).

Under ``torchrun --nproc_per_node=N`` (environment variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) the process group starts with NCCL on GPUs and gloo on CPUs. Each rank
takes its slice of the same global batch, so N processes follow the single-process run
with the same ``batch_size``. Rank 0 alone logs, evaluates into the logs and writes
checkpoints. FAVOR+ redraws derive from ``(seed, layer, draw)``, so every rank draws the
same matrices without communicating.

Outputs in ``out``: ``config.json``, ``metrics.jsonl`` (one JSON object per log line:
``{"step", "split": "train", "loss", "lr", "step_s", "tokens_per_s"}`` and evaluation
rows with ``"split": "val"``/``"test"``), ``curves.png``, ``summary.json``,
``checkpoint.pt`` (model, optimizer, scheduler, step and RNG states; loaded with
``weights_only=True``) and ``model/`` (:func:`linattn.models.load_model`). Every file
is written atomically (:mod:`linattn._io`): a run killed at any point leaves each file
either as it was or complete.

Resuming (``resume=True``) continues from ``checkpoint.pt``. The settings must be those
the checkpoint was written with, except :data:`RESUMABLE_FIELDS` (evaluation, logging and
checkpoint intervals, evaluation size), which only change what is recorded; any other
change is refused before a file is touched, naming each field (old -> new). The metrics
log is cut back to the checkpoint's step, so the steps the interrupted run took after its
last checkpoint are not recorded twice. Resuming a finished run does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .._io import CheckpointError, folder_lock, torch_load, torch_save, write_json, write_jsonl
from .._plotting import curve, finish, optional_pyplot
from .._schedule import warmup_cosine
from .config import LEGACY_VALUES, TrainConfig
from .tasks import build_task


def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# Settings that may differ between a run and its resumption: they change what is
# evaluated, logged or checkpointed, not the training trajectory.
RESUMABLE_FIELDS = ("eval_every", "eval_batches", "log_every", "checkpoint_every")
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "rng", "config")


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    state = torch_load(path, "training checkpoint", map_location=device)
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(
            f"{path}: not a linattn training checkpoint (missing {', '.join(missing)})"
        )
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: the stored config is not a mapping")
    return state


def resume_changes(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """The settings of ``cfg`` that differ from the ``saved`` config of a checkpoint,
    ``{field: (old, new)}``, other than :data:`RESUMABLE_FIELDS`."""
    defaults = TrainConfig.__dataclass_fields__
    new = cfg.to_dict()

    def norm(v):
        return list(v) if isinstance(v, tuple | list) else v

    changes = {}
    for name in sorted(set(saved) | set(new)):
        if name in RESUMABLE_FIELDS:
            continue
        old = (
            saved[name]
            if name in saved
            else LEGACY_VALUES.get(name, getattr(defaults.get(name), "default", None))
        )
        if norm(old) != norm(new.get(name)):
            changes[name] = (old, new.get(name))
    return changes


def _cut_metrics(path: Path, step: int) -> list[dict]:
    """Rows of ``path`` up to ``step`` (the checkpoint's), without test rows; ``path`` is
    rewritten (atomically) to hold just them."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line torn by the interruption: nothing after it was written cleanly.
                break
            if (
                isinstance(row, dict)
                and row.get("split") != "test"
                and isinstance(row.get("step"), int)
                and row["step"] <= step
            ):
                rows.append(row)
    write_jsonl(path, rows)
    return rows


def _finished_summary(out: Path, step: int, cfg: TrainConfig) -> dict | None:
    """The recorded summary when the run in ``out`` already finished, else None."""
    if (
        step < cfg.steps
        or not (out / "summary.json").is_file()
        or not (out / "model" / "model.pt").is_file()
    ):
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or not summary.get("finished"):
        return None
    return {**summary, "losses": [], "steps_run": 0, "already_finished": True}


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    task=None,
    stop_after: int | None = None,
) -> dict:
    """Train ``cfg`` and write the outputs to ``out``; returns the summary.

    ``resume=True`` continues from ``out/checkpoint.pt`` when it exists: the model,
    optimizer, scheduler, step, redraw counters and RNG states are restored, and batches
    depend only on the step, so the continued run takes the same steps the uninterrupted
    one would. ``stop_after`` ends the run after that many steps (a checkpoint is written
    there), to interrupt it on purpose.

    On resume, settings other than :data:`RESUMABLE_FIELDS` that differ from the
    checkpoint's raise ``ValueError`` (each named, old -> new) before anything is written;
    a damaged checkpoint raises :class:`linattn.CheckpointError`; a run that already
    finished is left untouched and its recorded summary returned, with
    ``"already_finished": True``.

    The run owns ``out`` while it lasts (:func:`linattn._io.folder_lock`, taken by rank
    0): another run into the same folder raises :class:`linattn._io.FolderInUseError`
    at once, naming the folder and this run's pid.
    """
    # Rank 0 writes the files, so it alone owns the folder (RANK as _dist_setup reads it).
    owner = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(out) if owner else contextlib.nullcontext():
        return _train(
            cfg, Path(out), resume=resume, progress=progress, task=task, stop_after=stop_after
        )


def _train(
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    task,
    stop_after: int | None,
) -> dict:
    rank, world, device = _dist_setup()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    out = Path(out)
    main = rank == 0
    ckpt = out / "checkpoint.pt"
    state = None
    if resume and ckpt.exists():
        state = _load_checkpoint(ckpt, device)
        changes = resume_changes(state["config"], cfg)
        if changes:
            raise ValueError(
                f"cannot resume {out} with changed settings: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                + f" (only {', '.join(RESUMABLE_FIELDS)} may change on resume; train into "
                "a new --out for other settings); the run was left untouched"
            )
        done = _finished_summary(out, int(state["step"]), cfg)
        if done is not None:
            return done
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            # A fresh run: a summary or checkpoint left by an earlier run in ``out`` no
            # longer applies (a later --resume must not take the old checkpoint).
            (out / "summary.json").unlink(missing_ok=True)
            ckpt.unlink(missing_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    task = task or build_task(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    model = task.build_model().to(device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )
    start = 0
    last_eval = None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["step"])
            torch.set_rng_state(state["rng"]["cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{ckpt}: does not fit this run's model or optimizer ({str(exc).strip()[:300]})"
            ) from exc
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        del state
        if main:
            kept = _cut_metrics(out / "metrics.jsonl", start)
            last_eval = next((r for r in reversed(kept) if r["split"] == "val"), None)
    metrics = (out / "metrics.jsonl").open("a" if start else "w") if main else None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    def log(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def evaluate(step: int, split: str) -> dict:
        net.eval()
        row = {"step": step, "split": split, **task.evaluate(model, split, rank, world, device)}
        log(row)
        return row

    bar = None
    if main and progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "linattn train shows its progress with tqdm: pip install "
                "'linattn[train]' (or pass progress=False)"
            ) from exc

        bar = tqdm(
            total=cfg.steps, initial=start, desc=f"{cfg.task}/{cfg.attention}", file=sys.stderr
        )
    step_times: list[float] = []
    losses: list[float] = []
    try:
        for step in range(start, end):
            batch = task.batch(step, rank, world, device)
            net.train()
            t0 = time.perf_counter()
            loss = task.loss(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            losses.append(value.item())
            tokens = batch["x"].numel() * world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / dt:.0f}")
            if (step + 1) % cfg.log_every == 0 or step == start:
                log(
                    {
                        "step": step + 1,
                        "split": "train",
                        "loss": losses[-1],
                        "lr": sched.get_last_lr()[0],
                        "step_s": dt,
                        "tokens_per_s": tokens / dt,
                    }
                )
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                last_eval = evaluate(step + 1, "val")
            if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
                torch_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step + 1,
                        "rng": _rng_state(device),
                        "config": cfg.to_dict(),
                    },
                    ckpt,
                )
        finished = end == cfg.steps
        test = evaluate(cfg.steps, "test") if finished else None
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    summary = {
        "config": cfg.to_dict(),
        "world_size": world,
        "device": str(device),
        "steps_run": end - start,
        "finished": finished,
        "losses": losses,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "peak_memory_mb": _peak_memory_mb(device),
        "val": last_eval,
        "test": test,
        "metric": task.metric,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if main:
        if finished:
            model.save(out / "model")
            plot_curves(
                out / "metrics.jsonl",
                out / "curves.png",
                task.metric,
                title=f"{cfg.task} / {cfg.attention}",
            )
        # The summary goes last: a finished summary.json means every other file is complete.
        write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "losses"})
    return summary


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line torn by an interruption ends them."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def plot_curves(metrics_file: Path, path: Path, metric: str, *, title: str) -> None:
    """Training loss and the validation metric against steps."""
    plt = optional_pyplot()
    if plt is None:
        return
    rows = read_metrics(metrics_file)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    curve(
        axes[0],
        [r["step"] for r in train],
        [r["loss"] for r in train],
        xlabel="step",
        ylabel="training loss",
    )
    curve(
        axes[1],
        [r["step"] for r in val],
        [r[metric] for r in val],
        xlabel="step",
        ylabel=f"validation {metric.replace('_', ' ')}",
        marker="o",
    )
    finish(fig, path, title=title)
