"""PerformerAttention: FAVOR+ as a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int
from ..features import KERNELS, Kernel, draw_projection
from ..functional import FavorState, favor_attention, favor_recurrent
from ._mha import MHAShaped


def default_num_features(head_dim: int) -> int:
    """The paper's ``d log d``, rounded up to a multiple of 16 (at least 16)."""
    return max(16, math.ceil(head_dim * math.log(max(head_dim, 2)) / 16) * 16)


def redraw_seed(base_seed: int, layer: int, draw: int) -> int:
    """Deterministic 63-bit seed from (base seed, layer, draw count): the same on every
    rank of a distributed job, with no communication and nothing taken from the data."""
    x = (base_seed & 0xFFFFFFFF) * 0x9E3779B1 + layer * 0x85EBCA77 + draw * 0xC2B2AE3D
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 32
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class FavorOptions:
    """The FAVOR+ settings and their defaults, written once: :class:`PerformerAttention`
    and :class:`linattn.models.ModelConfig` take their defaults from here, and
    ``PerformerAttention(..., **vars(options))`` builds a module from them.

    Attributes:
        num_features: projection rows ``m`` per head (``"softmax_hyp"``,
            ``"softmax_trig"`` and the hedgehog maps give ``2m`` features per token);
            None: ``d log d`` rounded up to a multiple of 16
            (:func:`default_num_features`) for random features, ``d`` for learned kernels.
        kernel: a :data:`linattn.KERNELS` name (the feature map).
        window: None (pure linear) or ``w >= 0`` for the sliding-window hybrid.
        sinks: ``s >= 0`` attention-sink keys (the first ``s`` unpadded keys, scored
            exactly by every query; with ``window=None`` the only exact keys); 0: none.
        redraw_interval: training forward passes between projection redraws; None keeps
            the projection fixed.
        orthogonal, scaling: how the random projection is drawn
            (:func:`linattn.draw_projection`).
    """

    num_features: int | None = None
    kernel: Kernel = "softmax"
    window: int | None = None
    sinks: int = 0
    redraw_interval: int | None = None
    orthogonal: bool = True
    scaling: str = "chi"

    @classmethod
    def of(cls, source, *names: str) -> FavorOptions:
        """The settings ``names`` (every one when none is named) read from the attributes
        of ``source`` that have their names; the others at their defaults."""
        return cls(
            **{name: getattr(source, name) for name in names or [f.name for f in fields(cls)]}
        )


#: Kernels whose feature map is trained: their projection is a per-head parameter
#: (never redrawn), and with a window they weight the linear part by a learned factor.
LEARNED_KERNELS = ("hedgehog", "hedgehog_untied")


class RandomFeatures:
    """Mixin for modules that own a FAVOR+ projection, random or learned: the
    ``projection`` (a buffer, or with ``learn=True`` an ``nn.Parameter``: hedgehog's
    learned maps and trainable random features), its redraw counter and
    ``(seed, layer_index)``, all persistent, so ``state_dict`` reproduces outputs and a
    reloaded module continues the same redraw sequence. Draw ``t`` comes from a generator seeded with ``redraw_seed(seed, layer_index, t)``, so
    every rank of a distributed job draws the same matrix without communicating.

    ``heads=H`` draws one matrix per head, ``(H, m, d)`` (else one ``(m, d)`` shared by
    the heads); ``learn=True`` makes the first draw a trainable ``nn.Parameter`` that is
    never redrawn. Subclasses may override ``_initial`` (the matrix of draw 0): the
    learned hedgehog maps start from :func:`hedgehog_init` there, so for them the
    "random features" are a learned projection, held here like the random ones."""

    def _init_random_features(
        self,
        num_features: int,
        head_dim: int,
        *,
        orthogonal: bool,
        scaling: str,
        seed: int,
        layer_index: int,
        redraw_interval: int | None,
        device,
        dtype,
        heads: int | None = None,
        learn: bool = False,
    ) -> None:
        self.num_features = check_positive_int("num_features", num_features)
        self.head_dim = head_dim
        if redraw_interval is not None:
            redraw_interval = check_positive_int("redraw_interval", redraw_interval)
            if learn:
                raise ValueError(
                    "a trained projection is not redrawn: redraw_interval must be None "
                    f"with a learned projection, got {redraw_interval}"
                )
        self.redraw_interval = redraw_interval
        self.orthogonal, self.scaling = orthogonal, scaling
        self.projection_heads, self.learn_projection = heads, learn
        self.frozen = False
        self.register_buffer("redraw_key", torch.tensor([seed, layer_index], device=device))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long, device=device))
        w = self._initial(device=device, dtype=dtype)
        if learn:
            self.projection = nn.Parameter(w)
        else:
            self.register_buffer("projection", w, persistent=True)

    def _initial(self, *, device=None, dtype=None) -> Tensor:
        return self._draw(0, device=device, dtype=dtype)

    def _draw(self, draw: int, *, device=None, dtype=None) -> Tensor:
        seed, layer = (int(t) for t in self.redraw_key)
        g = torch.Generator().manual_seed(redraw_seed(seed, layer, draw))
        # Per head: H successive draws from the same generator.
        w = torch.stack(
            [
                draw_projection(
                    self.num_features,
                    self.head_dim,
                    orthogonal=self.orthogonal,
                    scaling=self.scaling,
                    generator=g,
                    dtype=torch.float64,
                )
                for _ in range(self.projection_heads or 1)
            ]
        )
        w = w if self.projection_heads else w[0]
        return w.to(device=device, dtype=dtype or torch.get_default_dtype())

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw the next projection (deterministic: ``(seed, layer_index, draws + 1)``)."""
        if self.learn_projection:
            raise ValueError("the projection is trained (a parameter); it cannot be redrawn")
        self.draws += 1
        w = self._draw(int(self.draws), device=self.projection.device, dtype=self.projection.dtype)
        self.projection.copy_(w)

    def freeze_projection(self, frozen: bool = True) -> None:
        """Stop (or resume) automatic redraws."""
        self.frozen = frozen

    @torch.no_grad()
    def tick(self) -> None:
        """Count one training forward pass; redraw when the interval is reached. Models
        call this themselves (outside gradient checkpointing) and set ``auto_tick``."""
        if self.redraw_interval is None or self.frozen or not self.training:
            return
        self.calls += 1
        if int(self.calls) % self.redraw_interval == 0:
            self.redraw_projection()


def hedgehog_init(
    heads: int,
    num_features: int,
    head_dim: int,
    *,
    generator: torch.Generator | None = None,
    untied: bool = False,
) -> Tensor:
    """Initial Hedgehog projection ``(heads, m, d)``: the identity when ``m == d`` (so
    ``phi(x) = [softmax(x~), softmax(-x~)]``), else rows of unit norm in orthogonal
    blocks (:func:`linattn.draw_projection` rescaled), one draw per head. ``untied``
    (``"hedgehog_untied"``): ``(heads, m, 2d)``, the same matrix for the keys and the
    queries side by side, so that the untied map starts as the tied one."""
    if num_features == head_dim:
        w = torch.eye(head_dim, dtype=torch.float64).expand(heads, -1, -1).clone()
    else:
        w = torch.stack(
            [
                draw_projection(
                    num_features,
                    head_dim,
                    scaling="sqrt_d",
                    generator=generator,
                    dtype=torch.float64,
                )
                / math.sqrt(head_dim)
                for _ in range(heads)
            ]
        )
    return torch.cat([w, w], dim=-1) if untied else w


class PerformerAttention(RandomFeatures, MHAShaped):
    """FAVOR+ multi-head attention, a drop-in for ``nn.MultiheadAttention``.

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention``.
        num_features: projection rows ``m`` per head (default: ``d log d`` rounded up to a
            multiple of 16, the paper's choice, for random features; ``d`` for
            ``"hedgehog"``). Features per token are ``m``, or ``2m`` for the maps that
            stack two halves (``"softmax_hyp"``, ``"softmax_trig"``, the hedgehog maps):
            cost and memory grow with those.
        kernel: a :data:`linattn.KERNELS` name (``"softmax"``, ``"relu"``,
            ``"hedgehog"``, ...). ``"hedgehog"`` is a learned map: its projection is an
            ``nn.Parameter`` of shape ``(num_heads, m, d)``, the identity at
            initialization when ``m == d``, trained with the rest and never redrawn;
            ``"hedgehog_untied"``: ``(num_heads, m, 2d)``, the key and the query maps side
            by side, both halves starting at the same matrix.
        causal: attend to earlier positions only (self-attention).
        window: ``None`` (pure linear attention) or ``w >= 0``: each query scores the
            keys within ``w`` positions (``i - w < j <= i`` when causal, ``|i - j| <= w``
            otherwise; self-attention) exactly and the others through the feature map,
            under one normalizer (see :func:`linattn.favor_attention`). With a learned
            kernel the linear part of head ``h`` is weighted by
            ``exp(log_linear_factor[h])`` (a parameter, initially ``m / 2``: a learned
            map's scores are about ``2 / m`` per key against ``exp(s)`` inside the window,
            so this puts both parts on one scale, as the converted models' state does);
            random features keep the unweighted, unbiased estimate.
        sinks: ``s >= 0`` attention-sink keys: the first ``s`` unpadded keys of each
            sequence are scored exactly by every query that sees them, inside its window
            or not (``window=None``: the sinks are the only exact keys); 0 (default): none.
            A learned kernel weights the linear part by ``exp(log_linear_factor)`` as with
            a window. The recurrent state (:meth:`step`) then also keeps ``s`` sink keys
            and values.
        redraw_interval: draw a fresh projection every this many training forward
            passes (never in ``eval()``); None keeps it fixed. Not with a trained
            projection.
        learn_projection: make the random-feature projection a trainable parameter
            (initialized with the draw; the estimate is then no longer unbiased). Always
            on for learned kernels.
        per_head_projection: one random projection per head, ``(num_heads, m, d)``,
            instead of one ``(m, d)`` shared by the heads. Always on for learned kernels.
        orthogonal, scaling: of :func:`linattn.draw_projection`.
        seed, layer_index: the projection after ``t`` draws comes from a generator
            seeded with ``(seed, layer_index, t)``. That makes redraws identical on every
            rank and reproducible.
        rotary: apply rotary position embeddings to q and k (before the feature map).
        dropout: applied to the attention output. There is no attention matrix to drop
            from, so this is where MHA's dropout goes.
        bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention`` (``batch_first=False``
            by default, as there: inputs ``(L, B, E)``; pass True for ``(B, L, E)``).
        chunk_size: causal chunk length (speed only).

    Forward: ``(query, key=None, value=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, is_causal=False)`` returns ``(output, None)``. Shapes
    (``batch_first=True``): query ``(B, Lq, E)``, key/value ``(B, Lk, kdim/vdim)``,
    ``key_padding_mask (B, Lk)`` bool, True = padding; with the default
    ``batch_first=False``, query ``(Lq, B, E)`` and key/value ``(Lk, B, kdim/vdim)``.

    The projection is a persistent buffer (``state_dict`` reproduces outputs exactly),
    and so are the draw counter and ``(seed, layer_index)``, so a reloaded module goes on
    with the same redraws; a trained projection is a parameter under the same name.
    """

    method = "FAVOR+"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_features: int | None = FavorOptions.num_features,
        kernel: Kernel = FavorOptions.kernel,
        causal: bool = False,
        window: int | None = FavorOptions.window,
        sinks: int = FavorOptions.sinks,
        redraw_interval: int | None = FavorOptions.redraw_interval,
        learn_projection: bool = False,
        per_head_projection: bool = False,
        orthogonal: bool = FavorOptions.orthogonal,
        scaling: str = FavorOptions.scaling,
        seed: int = 0,
        layer_index: int = 0,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        chunk_size: int = 64,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_projections(
            embed_dim,
            num_heads,
            kdim=kdim,
            vdim=vdim,
            bias=bias,
            dropout=dropout,
            batch_first=batch_first,
            factory=factory,
        )
        check_choice("kernel", kernel, tuple(KERNELS))
        if causal and not KERNELS[kernel].causal_ok:
            raise ValueError(f"kernel={kernel!r} is bidirectional only; it cannot be causal")
        if window is not None:
            window = check_positive_int("window", window, minimum=0)
        self.sinks = check_positive_int("sinks", sinks, minimum=0)
        self.kernel, self.causal, self.window = kernel, causal, window
        self.learned_kernel = kernel in LEARNED_KERNELS
        if self.learned_kernel and redraw_interval is not None:
            raise ValueError(
                f"kernel={kernel!r} is a learned feature map: its projection is "
                f"trained, not redrawn (redraw_interval must be None, got "
                f"{redraw_interval})"
            )
        self._init_rotary(rotary, rotary_base)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        per_head = per_head_projection or self.learned_kernel
        default_m = self.head_dim if self.learned_kernel else default_num_features(self.head_dim)
        self._init_random_features(
            default_m if num_features is None else num_features,
            self.head_dim,
            orthogonal=orthogonal,
            scaling=scaling,
            seed=seed,
            layer_index=layer_index,
            redraw_interval=redraw_interval,
            device=device,
            dtype=dtype,
            heads=num_heads if per_head else None,
            learn=learn_projection or self.learned_kernel,
        )
        self.log_linear_factor = None
        if self.learned_kernel and (window is not None or self.sinks):
            # Learned scores are ~2/m per key against exp(s) in the window: start at m/2.
            self.log_linear_factor = nn.Parameter(
                torch.full((num_heads,), math.log(self.num_features / 2), **factory)
            )

    auto_tick = True

    def _initial(self, *, device=None, dtype=None) -> Tensor:
        if not self.learned_kernel:
            return super()._initial(device=device, dtype=dtype)
        seed, layer = (int(t) for t in self.redraw_key)
        g = torch.Generator().manual_seed(redraw_seed(seed, layer, 0))
        w = hedgehog_init(
            self.num_heads,
            self.num_features,
            self.head_dim,
            generator=g,
            untied=KERNELS[self.kernel].untied,
        )
        return w.to(device=device, dtype=dtype or torch.get_default_dtype())

    def linear_factor(self) -> Tensor | None:
        """The weight of the linear (far) part per head, ``(num_heads,)``, or None."""
        if self.log_linear_factor is None:
            return None
        return torch.exp(self.log_linear_factor)

    # ------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """``nn.MultiheadAttention``'s call; ``cu_seqlens`` (int32 ``(N + 1,)``): the
        inputs hold ``N`` sequences packed back to back in a batch of one (``(1, T, E)``
        with ``batch_first``, else ``(T, 1, E)``), each attending only to itself, as
        :func:`linattn.favor_attention`'s ``cu_seqlens`` (rotary positions restart at 0
        for each sequence)."""
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported by FAVOR+ (an arbitrary mask needs the full "
                "matrix); use causal=True or key_padding_mask"
            )
        query, key, value = self._inputs(query, key, value, need_weights)
        positions = None
        if cu_seqlens is not None:
            _, positions = self._packed(cu_seqlens, query, key, key_padding_mask)
        if self.auto_tick:
            self.tick()
        causal = self.causal or is_causal
        q, k, v = self._qkv(query, key, value, positions=positions)
        out = favor_attention(
            q,
            k,
            v,
            self.projection,
            kernel=self.kernel,
            causal=causal,
            key_padding_mask=key_padding_mask,
            window=self.window,
            linear_factor=self.linear_factor(),
            chunk_size=self.chunk_size,
            sinks=self.sinks,
            cu_seqlens=cu_seqlens,
        )
        return self._layout(self._finish(out)), None

    def _finish(self, out: Tensor) -> Tensor:
        return self._merge(F.dropout(out, self.dropout, self.training))

    def step(self, x: Tensor, state: FavorState | None, offset: int) -> tuple[Tensor, FavorState]:
        """Causal self-attention for new tokens ``x: (B, n, E)`` at positions
        ``offset..offset+n-1``, after ``state`` (None at the start). O(1) in the context
        length (with a window the state also holds the last ``window`` keys and values,
        with sinks the ``sinks`` sink keys and values)).
        Returns ``(output (B, n, E), new_state)``."""
        q, k, v = self._qkv(x, x, x, offset)
        out, state = favor_recurrent(
            q,
            k,
            v,
            self.projection,
            state=state,
            kernel=self.kernel,
            window=self.window,
            linear_factor=self.linear_factor(),
            sinks=self.sinks,
        )
        return self._finish(out), state

    def options(self) -> FavorOptions:
        """This module's FAVOR+ settings (``PerformerAttention(E, H, **vars(options))``
        builds one like it)."""
        return FavorOptions.of(self)

    def extra_repr(self) -> str:
        extra = ""
        if self.window is not None:
            extra += f", window={self.window}"
        if self.sinks:
            extra += f", sinks={self.sinks}"
        if self.projection_heads:
            extra += ", per_head_projection=True"
        if self.learn_projection:
            extra += ", learn_projection=True"
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_features={self.num_features}, kernel={self.kernel!r}, "
            f"causal={self.causal}{extra}, redraw_interval={self.redraw_interval}"
        )
