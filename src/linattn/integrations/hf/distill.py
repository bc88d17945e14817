"""Measure how closely a converted model follows the original, and distill it back.

* Encoders: sentence embeddings (masked mean of the last hidden states, L2-normalized,
  as sentence-transformers does) from the exact and the converted model, compared by
  cosine similarity.
* Decoders: perplexity of both models on the same text, the ratio, the KL divergence
  of the converted model's next-token distribution from the original's, and how often
  their top-1 predictions agree.

:func:`distill` fine-tunes the converted model (the student) to match the original (the
teacher): last hidden states and embeddings for encoders, next-token distributions for
decoders. AdamW with linear warm-up and cosine decay, a tqdm bar, agreement measured on
held-out text every ``eval_every`` steps into ``log.jsonl``, and checkpoints saved with
:func:`~.convert.save_converted`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..._checks import check_positive_int, check_real
from ..._io import write_json
from ..._schedule import warmup_cosine
from .convert import save_converted
from .state import converted_layers


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder with a language-model head (else an encoder)."""
    return hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")


def _batches(texts: list[str], batch_size: int, progress: bool = False, desc: str = ""):
    starts = range(0, len(texts), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield texts[i : i + batch_size]


def tokenize(tokenizer, texts: list[str], max_length: int, device=None) -> dict[str, Tensor]:
    """Padded, truncated batch: ``input_ids``, ``attention_mask`` of shape ``(B, L)``."""
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def embedding_agreement(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "measure",
) -> dict[str, float]:
    """Cosine similarity between the two models' sentence embeddings of ``texts``
    (``mean_cosine``, ``min_cosine``, ``p05_cosine``: 5th percentile) and the relative
    error of the last hidden states over real tokens (``hidden_rel_error``).
    ``progress``: a tqdm bar over the batches, titled ``desc``."""
    device = next(student.parameters()).device
    sims, err, norm = [], 0.0, 0.0
    for chunk in _batches(texts, batch_size, progress, desc):
        batch = tokenize(tokenizer, chunk, max_length, device)
        ht = teacher(**batch).last_hidden_state.double()
        hs = student(**batch).last_hidden_state.double()
        real = batch["attention_mask"].bool()
        err += ((hs - ht) ** 2).sum(-1)[real].sum().item()
        norm += (ht**2).sum(-1)[real].sum().item()
        am = batch["attention_mask"]
        sims.append((_pool(ht, am) * _pool(hs, am)).sum(-1).float().cpu())
    s = torch.cat(sims)
    return {
        "mean_cosine": s.mean().item(),
        "min_cosine": s.min().item(),
        "p05_cosine": torch.quantile(s, 0.05).item(),
        "hidden_rel_error": math.sqrt(err / norm),
        "texts": len(texts),
    }


#: Logit elements (rows x tokens x vocabulary) one forward of :func:`lm_agreement` may
#: hold: a batch is measured in slices of rows under it (results are the same).
LOGITS_BUDGET = 1 << 25


def _lm_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).logits[:, :-1].float()


@torch.no_grad()
def lm_agreement(
    teacher: nn.Module | None,
    student: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "measure",
) -> dict[str, float]:
    """Perplexity of ``student`` on ``texts`` (next-token, real tokens only) and, with a
    ``teacher``: its perplexity, the ratio, mean KL(teacher || student) per token and
    the top-1 agreement. ``progress``: a tqdm bar over the batches, titled ``desc``."""
    device = next(student.parameters()).device
    vocab = int(getattr(getattr(student, "config", None), "vocab_size", 0) or 0)
    nll_s = nll_t = kl = agree = 0.0
    count = 0
    for chunk in _batches(texts, batch_size, progress, desc):
        full = tokenize(tokenizer, chunk, max_length, device)
        # (rows, L, vocab) float32 logits per model, and a few temporaries of that size:
        # rows bounded so they stay near LOGITS_BUDGET elements (a 135M decoder's batch of
        # 32 x 512 tokens x 49 152 would need some 10 GB).
        width = full["input_ids"].shape[1]
        rows = max(1, LOGITS_BUDGET // max(1, width * vocab)) if vocab else len(chunk)
        for r in range(0, len(chunk), rows):
            batch = {k: t[r : r + rows] for k, t in full.items()}
            ids, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
            mask = mask & batch["attention_mask"][:, :-1].bool()
            ls = F.log_softmax(_lm_logits(student, batch), -1)
            nll_s += -ls.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[mask].sum().item()
            if teacher is not None:
                lt = F.log_softmax(_lm_logits(teacher, batch), -1)
                nll_t += -lt.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[mask].sum().item()
                kl += (lt.exp() * (lt - ls)).sum(-1)[mask].sum().item()
                agree += (lt.argmax(-1) == ls.argmax(-1))[mask].sum().item()
                del lt
            del ls
            count += int(mask.sum())
    out = {"ppl": math.exp(nll_s / count), "tokens": count, "texts": len(texts)}
    if teacher is not None:
        out.update(
            {
                "ppl_exact": math.exp(nll_t / count),
                "kl": kl / count,
                "top1_agreement": agree / count,
            }
        )
        out["ppl_ratio"] = out["ppl"] / out["ppl_exact"]
    return out


def agreement(
    teacher,
    student,
    tokenizer,
    texts,
    *,
    max_length: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "measure",
) -> dict:
    """:func:`lm_agreement` for decoders, :func:`embedding_agreement` for encoders
    (``progress``: a tqdm bar over the batches, titled ``desc``)."""
    fn = lm_agreement if is_causal_lm(student) else embedding_agreement
    return fn(
        teacher,
        student,
        tokenizer,
        texts,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )


def check_run_settings(config) -> None:
    """The checks :class:`DistillConfig` and :class:`~.transfer.TransferConfig` share:
    whole ``steps``, ``warmup``, ``checkpoint_every``, ``seed`` >= 0 (``steps=0``: no
    training, the converted model is measured and saved as it is); ``batch_size``,
    ``max_length``, ``eval_every``, ``eval_batch_size`` >= 1; ``lr`` in (0, inf),
    ``weight_decay`` in [0, inf)."""
    for name, minimum in (
        ("steps", 0),
        ("batch_size", 1),
        ("max_length", 1),
        ("eval_every", 1),
        ("eval_batch_size", 1),
        ("warmup", 0),
        ("checkpoint_every", 0),
        ("seed", 0),
    ):
        setattr(config, name, check_positive_int(name, getattr(config, name), minimum=minimum))
    # Stored as the Python numbers the checks return (NumPy values are not JSON).
    config.lr = check_real("lr", config.lr, 0.0, math.inf)
    config.weight_decay = check_real(
        "weight_decay", config.weight_decay, 0.0, math.inf, low_inclusive=True
    )


#: What :func:`distill` trains (``DistillConfig.train``).
TRAIN_CHOICES = ("all", "attention", "lora")
#: Where ``train="lora"`` puts its adapters (``DistillConfig.lora_targets``).
LORA_TARGETS = ("attention", "blocks")


@dataclass
class DistillConfig:
    """Distillation settings. The defaults are ``linattn convert --recipe distill``'s;
    :data:`linattn.experiments.convert.RECIPES` holds the other recipes' settings.

    Attributes:
        steps: optimizer steps; batch_size: texts per step; max_length: tokens per text.
        lr, weight_decay, warmup: AdamW with linear warm-up over ``warmup`` steps, then
            cosine decay to 10% of ``lr``.
        train: ``"all"`` parameters, only the ``"attention"`` modules', or ``"lora"``:
            low-rank adapters (``peft``'s LoRA, rank ``lora_rank``, ``alpha = 2 rank``) on
            the linear layers inside the converted attention modules, plus the
            linear-attention parameters (learned feature maps, window factors); the
            adapters are folded into the weights at the end (and in every checkpoint), so
            the result is a plain converted model. LoRA keeps the pretrained weights in
            place, which limits drift away from what the distillation texts cover.
        lora_rank: the adapters' rank (``train="lora"`` only).
        lora_targets: where the adapters go (``train="lora"`` only): ``"attention"``,
            the linear layers inside the converted attention modules; ``"blocks"``, every
            linear layer of the Transformer blocks that hold them (attention, its output
            projection and the MLP; not the embeddings, pooler or LM head).
        eval_every: measure agreement on the held-out texts every this many steps (and at
            the end); checkpoint_every: save the student every this many steps (0: only at
            the end, when an output directory is given).
        dropout: keep the model's dropout active while distilling (off by default: the
            student then matches the teacher's inference-time function).
        seed: batch order.
    """

    steps: int = 300
    batch_size: int = 16
    max_length: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 30
    train: str = "all"
    lora_rank: int = 8
    lora_targets: str = "attention"
    eval_every: int = 50
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    dropout: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_run_settings(self)
        self.lora_rank = check_positive_int("lora_rank", self.lora_rank)
        if self.train not in TRAIN_CHOICES:
            raise ValueError(
                f"train must be one of {', '.join(map(repr, TRAIN_CHOICES))}, got {self.train!r}"
            )
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(
                f"lora_targets must be one of {', '.join(map(repr, LORA_TARGETS))}, "
                f"got {self.lora_targets!r}"
            )


def distill_loss(teacher: nn.Module, student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Decoders: KL(teacher || student) of the next-token distributions, averaged over
    real tokens. Encoders: the last hidden states' squared error (over real tokens,
    relative to the teacher's mean square) plus ``1 - cos`` of the sentence embeddings."""
    mask = batch["attention_mask"].bool()
    if is_causal_lm(student):
        with torch.no_grad():
            lt = F.log_softmax(teacher(**batch).logits.float(), -1)
        ls = F.log_softmax(student(**batch).logits.float(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        return kl[mask].mean()
    with torch.no_grad():
        ht = teacher(**batch).last_hidden_state.float()
    hs = student(**batch).last_hidden_state.float()
    mse = ((hs - ht) ** 2).mean(-1)[mask].mean() / (ht**2).mean(-1)[mask].mean()
    am = batch["attention_mask"]
    return mse + (1 - (_pool(ht, am) * _pool(hs, am)).sum(-1)).mean()


def optimizer_step(loss: Tensor, opt, sched, params, running: float | None) -> float:
    """One clipped AdamW/scheduler step on ``loss``; returns the running (EMA 0.9) loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    value = loss.item()
    return value if running is None else 0.9 * running + 0.1 * value


def log_row(step: int, loss: float | None, sched, start: float) -> dict:
    """What every evaluation row of a training log starts with: ``step``, the running
    ``loss`` (None before training), ``lr`` (``sched``'s current one) and ``elapsed_s``,
    seconds since ``start`` (a ``time.perf_counter()`` reading), to 0.01 s."""
    return {
        "step": step,
        "loss": loss,
        "lr": sched.get_last_lr()[0],
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


def _trainable(student: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "all":
        return [p for p in student.parameters() if p.requires_grad]
    if train == "lora":
        params = {id(p): p for n, p in student.named_parameters() if "lora_" in n}
        params.update({id(p): p for m in converted_layers(student) for p in m.linattn.parameters()})
        return list(params.values())
    params = {id(p): p for m in converted_layers(student) for p in m.parameters()}
    return list(params.values())


def _blocks_of(model: nn.Module, layers: set[int]) -> list[str]:
    # The Transformer block of each converted attention module: its ancestor that is an
    # item of an nn.ModuleList (BERT: encoder.layer.3; Llama: model.layers.3).
    names = {id(m): n for n, m in model.named_modules()}
    lists = {
        f"{n}.{i}" if n else str(i)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        for i in range(len(m))
    }
    blocks = []
    for layer in layers:
        parts = names[layer].split(".")
        prefix = next(
            (".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in lists),
            names[layer],
        )
        if prefix not in blocks:
            blocks.append(prefix)
    return blocks


def lora_targets(model: nn.Module, where: str = "attention") -> list[str]:
    """Names of the ``nn.Linear`` layers LoRA adapts in ``model``: ``where="attention"``,
    those inside the converted attention modules (BERT: ``query``, ``key``, ``value``;
    Llama: ``q_proj`` ... ``o_proj``); ``"blocks"``, those of the Transformer blocks that
    hold the converted attention modules (the attention's, its output projection's and
    the MLP's; BERT: also ``attention.output.dense``, ``intermediate.dense``,
    ``output.dense``; Llama: also ``gate_proj``, ``up_proj``, ``down_proj``)."""
    if where not in LORA_TARGETS:
        raise ValueError(
            f"where must be one of {', '.join(map(repr, LORA_TARGETS))}, got {where!r}"
        )
    layers = {id(m) for m in converted_layers(model)}
    if where == "blocks":
        roots = _blocks_of(model, layers)
    else:
        roots = [n for n, m in model.named_modules() if id(m) in layers]
    return [
        f"{root}.{sub}"
        for root in roots
        for sub, child in model.get_submodule(root).named_modules()
        if sub and isinstance(child, nn.Linear)
    ]


def add_lora(model: nn.Module, rank: int, where: str = "attention") -> None:
    """Inject LoRA adapters of ``rank`` (``alpha = 2 rank``, zero-initialized ``B``, so
    the model's function is unchanged) into :func:`lora_targets` of ``model`` (``where``),
    in place. Needs ``peft``."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("train='lora' needs peft: pip install 'linattn[hf]'") from exc
    targets = lora_targets(model, where)
    if not targets:
        raise ValueError(
            "train='lora' needs a converted model with linear layers in its attention modules"
        )
    flags = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets), model
    )
    # peft freezes what it did not add; only the optimizer decides what moves here.
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base layer's weight and put the base
    layer back in its place (in place); returns ``model``."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.get_base_layer())
    return model


def _save_student(student: nn.Module, path: Path, tokenizer, lora: bool) -> None:
    if lora:  # a plain converted model: the adapters merged into a copy
        student = merge_lora(copy.deepcopy(student))
    save_converted(student, path, tokenizer=tokenizer)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    train_texts: list[str],
    eval_texts: list[str],
    config: DistillConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune ``student`` (converted) to match ``teacher`` (the original) on
    ``train_texts``; returns the log (one dict per evaluation, also written to
    ``out_dir/log.jsonl``). The student is updated in place and saved to
    ``out_dir/checkpoint`` every ``checkpoint_every`` steps and at the end."""
    cfg = config or DistillConfig()
    if not train_texts or not eval_texts:
        raise ValueError("distill needs non-empty train_texts and eval_texts")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "distill_config.json", asdict(cfg))
        log_file = (out / "log.jsonl").open("w")
    # The checkpoint carries the tokenizer when it can be saved (a transformers one).
    saved_tokenizer = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    lora = cfg.train == "lora"
    if lora:
        add_lora(student, cfg.lora_rank, cfg.lora_targets)
    params = _trainable(student, cfg.train)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, 0.1))
    device = next(student.parameters()).device
    order = random.Random(cfg.seed)
    pool: list[str] = []
    log: list[dict] = []
    start = time.perf_counter()

    def evaluate(step: int, loss: float | None) -> None:
        student.eval()
        row = log_row(step, loss, sched, start)
        row.update(
            agreement(
                teacher,
                student,
                tokenizer,
                eval_texts,
                max_length=cfg.max_length,
                batch_size=cfg.eval_batch_size,
            )
        )
        log.append(row)
        if out is not None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    bar = tqdm(total=cfg.steps, desc="distill", disable=not progress)
    evaluate(0, None)
    running = None
    try:
        for step in range(1, cfg.steps + 1):
            student.train(cfg.dropout)
            if len(pool) < cfg.batch_size:
                fresh = list(train_texts)
                order.shuffle(fresh)
                pool.extend(fresh)
            texts, pool = pool[: cfg.batch_size], pool[cfg.batch_size :]
            batch = tokenize(tokenizer, texts, cfg.max_length, device)
            loss = distill_loss(teacher, student, batch)
            running = optimizer_step(loss, opt, sched, params, running)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step, running)
                key = "ppl_ratio" if "ppl_ratio" in log[-1] else "mean_cosine"
                bar.set_postfix(loss=f"{running:.4f}", **{key: f"{log[-1][key]:.4f}"})
            if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_student(student, out / "checkpoint", saved_tokenizer, lora)
    finally:
        bar.close()
        if out is not None:
            log_file.close()
        if lora:
            merge_lora(student)
    student.eval()
    if out is not None:
        save_converted(student, out / "checkpoint", tokenizer=saved_tokenizer)
    return log
