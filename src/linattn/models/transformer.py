"""Pre-LayerNorm Transformer encoder, sequence classifier and causal language model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import LinformerProjection, PerformerAttention
from ..positional import sinusoidal_table
from .attention import build_attention
from .config import ModelConfig


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + ff(ln2(x))`` (pre-LayerNorm)."""

    def __init__(self, cfg: ModelConfig, layer: int, shared=None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(cfg, layer, shared)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ff = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim), nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask))
        return x + self.drop(self.ff(self.ln2(x)))

    def step(self, x: Tensor, cache, offset: int):
        a, cache = self.attn.step(self.ln1(x), cache, offset)
        x = x + a
        return x + self.ff(self.ln2(x)), cache


class Encoder(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final LayerNorm.

    ``forward(ids: (B, L) long, key_padding_mask: (B, L) bool | None) -> (B, L, dim)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Rows of norm ~1 (not nn.Embedding's N(0, 1), norm ~sqrt(dim)): with tied
        # embeddings the initial logits then have unit scale and a cross-entropy near
        # log(vocab), instead of starting many nats above it.
        nn.init.normal_(self.tok.weight, std=cfg.dim ** -0.5)
        self.pos = None
        if cfg.position == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.dim)
            nn.init.normal_(self.pos.weight, std=cfg.dim ** -0.5)
        elif cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.dim),
                                 persistent=False)
        self.shared = None
        if cfg.attention == "linformer" and cfg.linformer_sharing == "layerwise":
            # One projection for every layer, owned here (DDP sees it once).
            self.shared = LinformerProjection(
                cfg.max_seq_len, cfg.proj_dim, cfg.heads, cfg.dim // cfg.heads,
                kind=cfg.linformer_projection, sharing="layerwise", seed=cfg.seed,
            )
        self.blocks = nn.ModuleList(Block(cfg, i, self.shared) for i in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def performer_layers(self) -> list[PerformerAttention]:
        return [m for m in self.modules() if isinstance(m, PerformerAttention)]

    def redraw_tick(self) -> None:
        """One training step for feature redraws (called once per forward in training)."""
        for m in self.performer_layers():
            m.tick()

    def embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a (batch, seq) long tensor, got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        n = ids.shape[1]
        if offset + n > self.cfg.max_seq_len and self.cfg.position in ("learned", "sinusoidal"):
            raise ValueError(f"sequence of {offset + n} tokens exceeds max_seq_len="
                             f"{self.cfg.max_seq_len}")
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(offset, offset + n, device=ids.device))
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[offset:offset + n].to(x.dtype)
        return self.drop(x)

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.training:
            self.redraw_tick()
        x = self.embed(ids)
        for block in self.blocks:
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask)
        return self.ln(x)

    def step(self, ids: Tensor, caches: list | None, offset: int):
        """Causal incremental pass over new tokens ``ids: (B, n)`` at ``offset``."""
        x = self.embed(ids, offset)
        caches = caches or [None] * len(self.blocks)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, cache, offset)
            new.append(cache)
        return self.ln(x), new


class _Saveable(nn.Module):
    cfg: ModelConfig

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.pt`` (the ``state_dict``) to ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(
            {"class": type(self).__name__, "config": self.cfg.to_dict()}, indent=2))
        torch.save(self.state_dict(), d / "model.pt")


class SequenceClassifier(_Saveable):
    """Encoder + padding-aware pooling (masked mean, or the first token) + linear head.

    ``forward(ids, key_padding_mask=None) -> logits (B, num_classes)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.num_classes:
            raise ValueError("SequenceClassifier needs cfg.num_classes >= 2")
        if cfg.causal:
            raise ValueError("SequenceClassifier needs a bidirectional encoder "
                             "(cfg.causal=False)")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.encoder(ids, key_padding_mask)
        if self.cfg.pooling == "cls":
            pooled = h[:, 0]
        elif key_padding_mask is None:
            pooled = h.mean(1)
        else:
            keep = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)


class CausalLM(_Saveable):
    """Decoder-only language model with ``generate()``.

    With FAVOR+ attention, generation carries each layer's recurrent state (``(M, d+1)``
    per head, plus the last ``window`` keys and values with a window), so a new token
    costs the same however long the context is. The exact model uses a key/value cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.causal:
            raise ValueError("CausalLM needs cfg.causal=True")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.encoder.tok.weight

    def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``ids: (B, L)`` -> logits ``(B, L, vocab)``."""
        return self.lm_head(self.encoder(ids, key_padding_mask))

    def loss(self, ids: Tensor) -> Tensor:
        """Next-token cross-entropy of ``ids: (B, L)`` (mean over ``B (L - 1)``)."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    @torch.no_grad()
    def step_logits(self, ids: Tensor, caches, offset: int):
        """Logits of new tokens ``ids: (B, n)`` after ``caches`` (None to start)."""
        h, caches = self.encoder.step(ids, caches, offset)
        return self.lm_head(h), caches

    @torch.no_grad()
    def generate(
        self,
        ids: Tensor,
        max_new_tokens: int,
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``ids: (B, L)`` (unpadded prompts) by ``max_new_tokens`` tokens.

        ``greedy`` takes the argmax; otherwise samples from ``softmax(logits /
        temperature)`` restricted to the ``top_k`` most likely tokens and/or the smallest
        set whose probability reaches ``top_p``, drawing from ``generator``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()
        try:
            logits, caches = self.step_logits(ids, None, 0)
            out = [ids]
            offset = ids.shape[1]
            for _ in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], greedy=greedy, temperature=temperature,
                                  top_k=top_k, top_p=top_p, generator=generator)
                out.append(nxt)
                logits, caches = self.step_logits(nxt, caches, offset)
                offset += 1
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


def sample_next(logits: Tensor, *, greedy: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """One token per row from ``logits: (B, V)``; returns ``(B, 1)``."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (keeps >= 1 token).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


MODEL_CLASSES = {cls.__name__: cls for cls in (SequenceClassifier, CausalLM)}


def load_model(directory: str | Path, map_location=None) -> nn.Module:
    """Rebuild a model saved with ``.save(directory)``; weights load with
    ``torch.load(..., weights_only=True)``."""
    d = Path(directory)
    meta = json.loads((d / "config.json").read_text())
    if meta.get("class") not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {meta.get('class')!r} in {d / 'config.json'}")
    model = MODEL_CLASSES[meta["class"]](ModelConfig.from_dict(meta["config"]))
    state = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model
