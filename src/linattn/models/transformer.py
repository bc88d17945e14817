"""Pre-LayerNorm Transformer encoder, sequence classifier and causal language model."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._io import CheckpointError, read_json, torch_load, torch_save, write_json
from ..functional import packed_positions
from ..nn import LinformerProjection, PerformerAttention
from ..positional import sinusoidal_table
from .attention import build_attention
from .config import ModelConfig

# Marks a model.pt written by _Saveable.save (weights + the config they belong to).
WEIGHTS_FORMAT = "linattn.model/1"


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + ff(ln2(x))`` (pre-LayerNorm)."""

    def __init__(self, cfg: ModelConfig, layer: int, shared=None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(cfg, layer, shared)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ff = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask, cu_seqlens))
        return x + self.drop(self.ff(self.ln2(x)))

    def step(self, x: Tensor, cache, offset: int):
        a, cache = self.attn.step(self.ln1(x), cache, offset)
        x = x + a
        return x + self.ff(self.ln2(x)), cache


class Encoder(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final LayerNorm.

    ``forward(ids: (B, L) long, key_padding_mask: (B, L) bool | None) -> (B, L, dim)``;
    ``forward(ids: (1, T), cu_seqlens=c)`` with int32 ``c: (N + 1,)``: ``N`` sequences
    packed back to back, each attending only to itself, positions restarting at 0 for
    each (as if each ran alone).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Rows of norm ~1 (not nn.Embedding's N(0, 1), norm ~sqrt(dim)): with tied
        # embeddings the initial logits then have unit scale and a cross-entropy near
        # log(vocab), instead of starting many nats above it.
        nn.init.normal_(self.tok.weight, std=cfg.dim**-0.5)
        self.pos = None
        if cfg.position == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.dim)
            nn.init.normal_(self.pos.weight, std=cfg.dim**-0.5)
        elif cfg.position == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.max_seq_len, cfg.dim), persistent=False
            )
        self.shared = None
        if cfg.attention == "linformer" and cfg.linformer_sharing == "layerwise":
            # One projection for every layer, owned here (DDP sees it once).
            self.shared = LinformerProjection(
                cfg.max_seq_len,
                cfg.proj_dim,
                cfg.heads,
                cfg.dim // cfg.heads,
                proj_kind=cfg.proj_kind,
                sharing="layerwise",
                seed=cfg.seed,
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

    def embed(self, ids: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(
                f"ids must be a (batch, seq) long tensor, got {tuple(ids.shape)} {ids.dtype}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"ids must be token ids in [0, {self.cfg.vocab_size}), got values "
                f"in [{int(ids.min())}, {int(ids.max())}]"
            )
        n = ids.shape[1]
        longest = offset + n
        if positions is None:
            positions = torch.arange(offset, offset + n, device=ids.device)
        elif n:
            # Packed documents: the longest one must fit the position table.
            longest = int(positions.max()) + 1
        if longest > self.cfg.max_seq_len and self.cfg.position in ("learned", "sinusoidal"):
            raise ValueError(
                f"sequence of {longest} tokens exceeds max_seq_len={self.cfg.max_seq_len}"
            )
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        return self.drop(x)

    def forward(
        self,
        ids: Tensor,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        positions = None
        if cu_seqlens is not None:
            if ids.dim() != 2 or ids.shape[0] != 1:
                raise ValueError(
                    f"with cu_seqlens, ids must be one packed row (1, T), got {tuple(ids.shape)}"
                )
            if key_padding_mask is not None:
                raise ValueError(
                    "cu_seqlens and key_padding_mask cannot be combined: packed sequences "
                    "hold no padding"
                )
            positions = packed_positions(cu_seqlens, ids.shape[1])
        if self.training:
            self.redraw_tick()
        x = self.embed(ids, positions=positions)
        for block in self.blocks:
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_padding_mask, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, key_padding_mask, cu_seqlens)
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
        """Write ``config.json`` and ``model.pt`` to ``directory``, each atomically.

        ``model.pt`` holds the ``state_dict`` together with the class name and config,
        so :func:`load_model` refuses a directory whose two files come from different
        saves (an interrupted save over another model) instead of loading it wrong."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "config": self.cfg.to_dict()}
        # Weights first: a save killed in between leaves the old config.json beside the new
        # model.pt, which load_model detects from the config stored in model.pt.
        torch_save(
            {"format": WEIGHTS_FORMAT, **meta, "state_dict": self.state_dict()}, d / "model.pt"
        )
        write_json(d / "config.json", meta)


class SequenceClassifier(_Saveable):
    """Encoder + padding-aware pooling (masked mean, or the first token) + linear head.

    ``forward(ids, key_padding_mask=None) -> logits (B, num_classes)``;
    ``forward(ids: (1, T), cu_seqlens=c) -> logits (N, num_classes)``: ``N`` sequences
    packed back to back (int32 ``c: (N + 1,)``), each pooled over its own tokens, as if
    each ran alone.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes is None or cfg.num_classes < 2:
            raise ValueError(
                f"SequenceClassifier needs cfg.num_classes >= 2, got {cfg.num_classes!r}"
            )
        if cfg.causal:
            raise ValueError("SequenceClassifier needs a bidirectional encoder (cfg.causal=False)")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(
        self,
        ids: Tensor,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        h = self.encoder(ids, key_padding_mask, cu_seqlens)
        if cu_seqlens is not None:
            return self.head(self._packed_pool(h[0], cu_seqlens))
        if self.cfg.pooling == "cls":
            pooled = h[:, 0]
        elif key_padding_mask is None:
            pooled = h.mean(1)
        else:
            keep = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)

    def _packed_pool(self, h: Tensor, cu_seqlens: Tensor) -> Tensor:
        """``h: (T, dim)`` of packed sequences -> ``(N, dim)``: each sequence's first
        token (``cls``) or the mean of its tokens (an empty sequence pools to zeros)."""
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens.diff().long()
        if self.cfg.pooling == "cls":
            if not h.shape[0]:
                return h.new_zeros(starts.shape[0], h.shape[1])
            first = h[starts.clamp_max(h.shape[0] - 1)]
            return first * (lengths > 0).unsqueeze(-1).to(h.dtype)
        # [T] the sequence of each token, then per-sequence sums over their lengths.
        owner = torch.arange(starts.shape[0], device=h.device).repeat_interleave(
            lengths, output_size=h.shape[0]
        )
        sums = h.new_zeros(starts.shape[0], h.shape[1]).index_add_(0, owner, h)
        return sums / lengths.clamp_min(1).unsqueeze(-1).to(h.dtype)


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

    def forward(
        self,
        ids: Tensor,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """``ids: (B, L)`` -> logits ``(B, L, vocab)``. ``cu_seqlens`` (int32
        ``(N + 1,)``): ``ids: (1, T)`` holds ``N`` documents packed back to back, each
        attending only to itself with positions from 0 (as if each ran alone)."""
        return self.lm_head(self.encoder(ids, key_padding_mask, cu_seqlens))

    def loss(self, ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy of ``ids: (B, L)`` (mean over ``B (L - 1)``).

        With ``cu_seqlens`` (packed documents in ``ids: (1, T)``): the mean over every
        document's own next-token predictions (``n_i - 1`` per document), none across a
        boundary; equal to the token-weighted mean of each document's loss alone."""
        if cu_seqlens is None:
            logits = self(ids[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        logits = self(ids, cu_seqlens=cu_seqlens)[0, :-1]
        targets = ids[0, 1:]
        # Position t predicts t + 1 only inside one document: drop each document's last.
        last = cu_seqlens[1:].long() - 1
        last = last[(last >= 0) & (last < targets.shape[0])]
        keep = torch.ones_like(targets, dtype=torch.bool)
        keep[last] = False
        return F.cross_entropy(logits[keep], targets[keep])

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
        check_generate_args(
            ids, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p
        )
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise ValueError(
                f"ids must be token ids in [0, {self.cfg.vocab_size}), got values "
                f"in [{int(ids.min())}, {int(ids.max())}]"
            )
        was_training = self.training
        self.eval()
        try:
            logits, caches = self.step_logits(ids, None, 0)
            out = [ids]
            offset = ids.shape[1]
            for _ in range(max_new_tokens):
                nxt = sample_next(
                    logits[:, -1],
                    greedy=greedy,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                )
                out.append(nxt)
                logits, caches = self.step_logits(nxt, caches, offset)
                offset += 1
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


def check_generate_args(
    ids: object,
    max_new_tokens: object,
    *,
    greedy: object,
    temperature: object,
    top_k: object,
    top_p: object,
) -> None:
    """ValueError/TypeError naming the argument, before any work (``generate``)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a (batch, length) tensor of token ids, got {got}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must hold integer token ids (int64), got {ids.dtype}")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(
            f"ids must hold at least one prompt token per row, got shape "
            f"{tuple(ids.shape)} (generation continues a non-empty prompt)"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {greedy!r}")
    if not greedy and not (
        isinstance(temperature, (int, float))
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(
    logits: Tensor,
    *,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
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
    ``torch.load(..., weights_only=True)``.

    Raises :class:`linattn.CheckpointError` (a ``ValueError``) naming the file when the
    directory or a file is missing, empty, truncated or malformed, when the weights do
    not fit the config, or when ``config.json`` and ``model.pt`` come from different
    saves."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no saved model there (not a directory)")
    meta = read_json(d / "config.json", "model config")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{d / 'config.json'}: expected {{'class': ..., 'config': "
            f"{{...}}}}, got {str(meta)[:120]}"
        )
    if meta.get("class") not in MODEL_CLASSES:
        raise CheckpointError(
            f"{d / 'config.json'}: unknown model class "
            f"{meta.get('class')!r} (expected one of {sorted(MODEL_CLASSES)})"
        )
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{d / 'config.json'}: invalid model config ({exc})") from exc
    state = torch_load(d / "model.pt", "model weights file", map_location=map_location)
    if isinstance(state, dict) and state.get("format") == WEIGHTS_FORMAT:
        saved = {"class": state.get("class"), "config": state.get("config")}
        if saved != {"class": meta["class"], "config": meta["config"]}:
            changed = sorted(
                k
                for k in set(meta["config"]) | set(saved["config"] or {})
                if meta["config"].get(k) != (saved["config"] or {}).get(k)
            )
            raise CheckpointError(
                f"{d}: config.json and model.pt come from different saves (an interrupted "
                f"save?): config.json describes {meta['class']} with "
                + ", ".join(f"{k}={meta['config'].get(k)!r}" for k in changed[:4])
                + f", model.pt holds {saved['class']} with "
                + ", ".join(f"{k}={(saved['config'] or {}).get(k)!r}" for k in changed[:4])
            )
        state = state.get("state_dict")
    # Older saves hold the bare state_dict.
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{d / 'model.pt'}: not a linattn model (expected a state_dict of tensors)"
        )
    model = MODEL_CLASSES[meta["class"]](cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{d / 'model.pt'}: the weights do not fit the model in "
            f"config.json: {str(exc).strip()[:400]}"
        ) from exc
    return model
