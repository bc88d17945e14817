"""Per-layer linear-attention state attached to a converted Hugging Face attention module.

Each converted attention module gets a ``linattn`` child holding what the method needs
(FAVOR+: the projection and its redraw counter, as persistent buffers, here; Linformer: E
and F as parameters sized to the model's maximum length, in :mod:`.linformer_state`). The
FAVOR+ layer's slot hybrid lives in :mod:`.slot_path`, the rotary helpers of
``far_rope=False`` in :mod:`.rotary`. The registered attention function
(:mod:`.attention`) hands it the model's already-projected, already-rotated ``q, k, v``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..._checks import check_choice, check_positive_int, is_int
from ..._favor_state import _favor_state_of
from ...features import KERNELS, Kernel
from ...functional import favor_attention, favor_recurrent
from ...nn.performer import (
    LEARNED_KERNELS,
    FavorOptions,
    RandomFeatures,
    default_num_features,
    hedgehog_init,
)
from ._layer import as_query_heads, pending_entry
from .linformer_state import LinformerLayerState as LinformerLayerState
from .linformer_state import proj_dtype as proj_dtype
from .rotary import positions_for, unrotate_pair
from .slot_path import check_slots, slots_forward


class FavorLayerState(RandomFeatures, nn.Module):
    """FAVOR+ (or learned-feature-map) state of one converted attention layer.

    Args:
        head_dim: the model's per-head dimension ``d``.
        num_heads: the model's query heads ``H`` (needed by learned maps, which keep one
            projection per head).
        num_features: ``m``, rows of the projection (default: ``d log d`` rounded up to 16
            for random features, ``d`` for learned maps, so that they start at the
            identity).
        kernel: a :data:`linattn.KERNELS` name; causal models need a kernel with a causal
            form (``"softmax"``, ``"softmax_hyp"``, ``"relu"``, ``"hedgehog"``, ...).
            ``"hedgehog"`` is a learned map: ``phi(x) = [softmax(x~ W_h^T),
            softmax(-x~ W_h^T)]`` with a trainable ``W_h: (m, d)`` per head, initialized to
            the identity when ``m == d`` (else to orthonormal rows). ``"hedgehog_untied"``:
            one such map for the queries and another for the keys (LoLCATs' untied maps;
            ``W_h: (m, 2d)`` holds ``[W_k, W_q]``), both starting at the same matrix.
        window: ``None`` (pure linear attention) or ``w >= 0``: the keys within ``w``
            positions of a query (``i - w < j <= i`` in causal models) get the exact
            softmax score, the others the feature-map score, under one normalizer (see
            :func:`linattn.favor_attention`).
        sinks: ``s >= 0`` attention sinks: the first ``s`` unpadded tokens of each text
            (BERT's ``[CLS]``, a decoder's BOS) get the exact softmax score from every
            query that sees them, inside its window or not (``window=None``: the sinks are
            the only exact keys); 0: none. Decoding (:class:`~.cache.FavorCache`) keeps
            their keys and values in the recurrent state.
        orthogonal, scaling, seed, layer_index, redraw_interval: as
            :class:`linattn.PerformerAttention` (random-feature kernels).
        slots: ``G >= 0`` exact key-value slots per head (causal models with a window
            only; 0: none). Keys that leave the window are decided on in groups of
            ``slot_interval``: the ``G`` that ``slot_rule`` ranks highest among the cached
            and the newly decided keys stay exact, the others go to the feature-map
            state (:func:`linattn.ops.favor.slots.favor_slots_step`, after LoLA). The
            state stays O(1) per token: ``s + w + I - 1 + G`` keys and values per head
            beside the feature-map sums. Padded batches are refused (slots are chosen
            per position).
        slot_rule: ``"error"`` (default; LoLA: keep the keys whose values the
            feature-map state reads back worst), ``"mass"`` (keep the keys that got the
            most attention so far) or ``"union"`` (the keys either ranks high).
        slot_interval: ``I``, keys per decision (default: the window).
        far_rope: True (default): the feature-map (far) part scores the queries and keys
            as the model hands them, rotary embedding applied. False (rotary decoders
            only): it scores them with the rotation undone (:func:`~.rotary.unrotate`, by the
            model's own rotary module and the tokens' position ids), so that the far
            scores depend on no absolute position and a map trained on short texts sees
            the same inputs at any length; the window, sinks and slots keep the
            rotated ones. A trained map is trained for one setting: convert, train and
            load with the same ``far_rope``.
        far_decay: None (default), or ``T > 0`` tokens: the far scores of query ``i``
            and key ``j`` are weighed by ``exp(-(i - j) / T)`` (causal models only; the
            exact parts are not decayed), which bounds the far part's share of the
            normalizer on texts longer than it was trained on. Holds no parameters:
            :func:`~.convert.set_far_decay` changes it on a trained model. Not
            differentiable; the linear-only ablation (``near=False``) runs without it.
        chunk_size: causal chunk length (speed only).
        learn_projection: make the projection a trainable parameter. Default: True for
            learned maps, False for random features (where a trained projection starts
            from the random draw; the estimator is then no longer unbiased for softmax,
            but closer to the pretrained model after training).

    Learned maps also hold ``log_linear_factor: (H,)``: the per-head weight
    ``exp(log_linear_factor)`` of the feature-map scores against the exact
    ``exp(scale q.k)`` inside the window and for the sinks (it cancels without either). It starts at
    ``log(m / 2)``: hedgehog features are probabilities (each half sums to 1), so
    ``phi(q).phi(k)`` is about ``2 / m`` for unrelated tokens where ``exp(scale q.k)`` is
    about 1; the factor puts both on one scale. (LoLCATs' ``sigmoid(-2.197) = 0.1``
    weighs a window part normalized by its row maximum; against the unnormalized
    ``exp`` it leaves the far keys 5-400x too light and attention transfer cannot
    recover, see docs/results/hf_transfer.md.) Random-feature kernels use no factor:
    their hybrid is then an unbiased estimate of softmax attention, exact inside the
    window.

    ``forward(q, k, v, *, key_padding_mask, causal, scale, cache_layer=None)`` takes
    ``q: (B, H, Lq, d)``, ``k, v: (B, H, Lk, d)`` and returns ``(B, H, Lq, d)``. With a
    ``cache_layer`` (a :class:`~.cache.FavorCacheLayer`), the tokens continue its
    recurrent state instead of being attended from scratch. ``unrepeated``: for
    grouped-query models, ``(k, v)`` before the key/value heads were repeated (a lazy
    cache keeps those).

    Ablations (runtime switches, not saved; set them with
    :func:`~.ablation.set_attention_parts`): ``near`` (default True) keeps the exact part,
    the window and the sinks; ``near=False`` attends with the feature map alone (as the
    same layer built with ``window=None, sinks=0``). ``far`` (default True) keeps the
    feature-map part; ``far=False`` gives the far keys weight 0 (``linear_factor = 0``):
    exact softmax attention over the window and the sinks alone. ``use_slots`` (default
    True; only read with ``slots > 0``): ``False`` runs the plain window hybrid, every key
    that leaves the window going to the feature-map state.
    """

    #: Ablation switches read by :meth:`forward` (see :func:`~.ablation.set_attention_parts`).
    near: bool = True
    far: bool = True
    use_slots: bool = True
    #: Decoding switch (not saved; :func:`~.convert.set_compiled_decoding`): one-token
    #: steps of the window hybrid through the compiled step
    #: (``favor_recurrent(compile_step=True)``); with slots, the slot decisions on a
    #: full cache (``favor_slots_step(compiled=True)``).
    compile_step: bool = False

    method = "favor"

    def __init__(
        self,
        head_dim: int,
        *,
        num_heads: int | None = None,
        num_features: int | None = FavorOptions.num_features,
        kernel: Kernel = FavorOptions.kernel,
        window: int | None = FavorOptions.window,
        sinks: int = FavorOptions.sinks,
        orthogonal: bool = FavorOptions.orthogonal,
        scaling: str = FavorOptions.scaling,
        seed: int = 0,
        layer_index: int = 0,
        redraw_interval: int | None = FavorOptions.redraw_interval,
        chunk_size: int = 64,
        learn_projection: bool | None = None,
        slots: int = 0,
        slot_rule: str = "error",
        slot_interval: int | None = None,
        far_rope: bool = True,
        far_decay: float | None = None,
        device=None,
    ) -> None:
        super().__init__()
        self.kernel = check_choice("kernel", kernel, tuple(KERNELS))
        self.slots, self.slot_rule, self.slot_interval = check_slots(
            slots, slot_rule, slot_interval, window=window
        )
        if not isinstance(far_rope, bool):
            raise TypeError(f"far_rope must be a bool, got {type(far_rope).__name__}")
        self.far_rope = far_rope
        self.far_decay = check_far_decay(far_decay)
        if (not far_rope or self.far_decay is not None) and window is None and not sinks:
            raise ValueError(
                "far_rope=False and far_decay change the hybrid's far part: they need a "
                "window or sinks (without them every score is a feature-map score)"
            )
        # The model's rotary module (far_rope=False), attached by convert(); a plain
        # attribute, not a submodule (it belongs to the model).
        self._rotary: tuple = ()
        self.learned = self.kernel in LEARNED_KERNELS
        if learn_projection is None:
            learn_projection = self.learned
        if (learn_projection or self.learned) and redraw_interval is not None:
            raise ValueError(
                "a trained projection (learn_projection=True or a learned "
                f"kernel, here {self.kernel!r}) cannot also be redrawn "
                "(redraw_interval must be None)"
            )
        if window is not None and (not is_int(window) or window < 0):
            raise ValueError(f"window must be None or an int >= 0, got {window!r}")
        if not is_int(sinks) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        self.window = None if window is None else int(window)
        self.sinks = int(sinks)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if num_features is None:
            num_features = head_dim if self.learned else default_num_features(head_dim)
        # float32 whatever the model's dtype: half-precision inputs compute in float32.
        self._init_random_features(
            num_features,
            head_dim,
            orthogonal=orthogonal,
            scaling=scaling,
            seed=seed,
            layer_index=layer_index,
            redraw_interval=redraw_interval,
            device=device,
            dtype=torch.float32,
        )
        self.learn_projection = bool(learn_projection)
        self.num_heads = num_heads
        if self.learned:
            if not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(
                    f"kernel={self.kernel!r} keeps one projection per head: "
                    f"pass num_heads (an int >= 1), got {num_heads!r}"
                )
            del self._buffers["projection"]
            # Orthonormal rows (m != d) from a fixed seed, the same in every layer.
            w = hedgehog_init(
                num_heads,
                num_features,
                head_dim,
                generator=torch.Generator().manual_seed(0),
                untied=KERNELS[self.kernel].untied,
            ).to(device=device, dtype=torch.float32)
            if self.learn_projection:
                self.projection = nn.Parameter(w)
            else:
                self.register_buffer("projection", w)
            self.log_linear_factor = nn.Parameter(
                torch.full((num_heads,), math.log(num_features / 2), device=device)
            )
        else:
            self.log_linear_factor = None
            if self.learn_projection:
                # Start from the orthogonal random draw; training then adapts it.
                w = self._buffers.pop("projection")
                self.projection = nn.Parameter(w)

    def linear_factor(self) -> Tensor | None:
        """``exp(log_linear_factor): (H,)`` for learned maps, else None.

        Without a gradient to build (decoding, evaluation) the same tensor is returned
        until ``log_linear_factor`` changes (its version counter, storage, device or
        dtype): :func:`linattn.favor_attention` then checks its values once, not at every
        token and layer (a host synchronization each)."""
        p = self.log_linear_factor
        if p is None:
            return None
        if (torch.is_grad_enabled() and p.requires_grad) or p.is_inference():
            return torch.exp(p)
        key = (p._version, p.data_ptr(), p.device, p.dtype)
        cached = getattr(self, "_factor_cache", None)
        if cached is None or cached[0] != key:
            # A normal tensor even under inference_mode: it keeps a version counter.
            with torch.inference_mode(False):
                cached = (key, torch.exp(p.detach()))
            self._factor_cache = cached
        return cached[1]

    def redraw_projection(self) -> None:
        if self.learned:
            raise ValueError(
                f"kernel={self.kernel!r} is a learned map; it has no random projection to redraw"
            )
        super().redraw_projection()

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        scale: float | None,
        cache_layer=None,
        unrepeated: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        w = self.projection
        kw = {"kernel": self.kernel, "scale": scale, **self._parts(q)}
        # (A cache layer's parts were checked by FavorCache.update, which hands it here.)
        lq, lk = q.shape[-2], k.shape[-2]
        unrotated = self._unrotated()
        if unrotated and lq != lk and cache_layer is None:
            raise ValueError(
                "far_rope=False undoes the rotary embedding by each token's position: a "
                "key/value cache the model kept itself does not say where its keys sit; "
                "decode through a FavorCache (the converted model's forward(use_cache="
                "True) and generate() make one)"
            )
        if unrotated and positions is None and cache_layer is not None:
            # The cache has counted these tokens already: they are its last lk.
            positions = torch.arange(cache_layer.seen - lk, cache_layer.seen, device=q.device)
        far = self._far_inputs(q, k, key_padding_mask, positions) if unrotated else {}
        if causal and self._slots_on():
            kw.update(far)
            return slots_forward(self, q, k, v, key_padding_mask, kw, cache_layer)
        if not self.near and far:
            # Linear only: every score is a feature-map score, of the un-rotated inputs.
            q, k = far.pop("far_q"), far.pop("far_k")
        kw.update(far)
        if cache_layer is not None:
            if cache_layer.pending is not None:
                # Tokens kept unfolded (a lazy prefill, a converted DynamicCache) join the
                # state before the new ones.
                pk, pv, pmask, ppos = pending_entry(cache_layer.pending)
                cache_layer.pending = None
                cache_layer.state = self._fold(pk, pv, pmask, q, cache_layer.state, kw, ppos)
            elif cache_layer.lazy and cache_layer.state is None and causal:
                # A forward that did not ask for a cache: the parallel form (the same
                # outputs as without one); the state is built only if a next call follows.
                # Grouped-query models: the keys and values before the repeat (1/group
                # of the memory), as a DynamicCache would keep them.
                pk, pv = (k, v) if unrepeated is None else unrepeated
                ppos = None
                if unrotated:
                    # (B, L): follows the batch through a beam search's reordering.
                    ppos = positions_for(positions, key_padding_mask, *q.shape[:1], lk, q.device)
                cache_layer.pending = (pk, pv, key_padding_mask, ppos)
                return favor_attention(
                    q,
                    k,
                    v,
                    w,
                    causal=True,
                    key_padding_mask=key_padding_mask,
                    chunk_size=self.chunk_size,
                    **kw,
                )
            if unrepeated is not None and _has_ring(kw):
                # Grouped-query models: the hybrid's state keeps its window ring and sink
                # slots once per key/value head (favor_recurrent repeats them as needed).
                groups = k.shape[1] // unrepeated[0].shape[1]
                k, v = unrepeated[0].to(q.dtype), unrepeated[1].to(q.dtype)
                if "far_k" in kw:
                    kw["far_k"] = kw["far_k"][:, ::groups]
            out, cache_layer.state = favor_recurrent(
                q,
                k,
                v,
                w,
                state=cache_layer.state,
                key_padding_mask=key_padding_mask,
                compile_step=self.compile_step,
                **kw,
            )
            return out
        if causal and lq != lk:
            # A key/value cache the model kept itself (not ours): the queries are the last
            # Lq positions. Zero queries in front give the same causal prefix sums.
            pad = q.new_zeros(*q.shape[:-2], lk - lq, q.shape[-1])
            out = favor_attention(
                torch.cat([pad, q], dim=-2),
                k,
                v,
                w,
                causal=True,
                key_padding_mask=key_padding_mask,
                chunk_size=self.chunk_size,
                **kw,
            )
            return out[..., lk - lq :, :]
        return favor_attention(
            q,
            k,
            v,
            w,
            causal=causal,
            key_padding_mask=key_padding_mask,
            chunk_size=self.chunk_size,
            **kw,
        )

    def _unrotated(self) -> bool:
        """Whether feature-map scores take un-rotated inputs now (``far_rope=False``, and
        a far part in force: the hybrid's, or linear-only's)."""
        return not self.far_rope and (self.far or not self.near)

    def _far_inputs(
        self, q: Tensor, k: Tensor, mask: Tensor | None, positions: Tensor | None
    ) -> dict:
        """``{"far_q", "far_k"}``: ``q`` and ``k`` with the rotary embedding undone at
        ``positions: (B, L)`` (or ``(L,)``; None: ``0 .. L - 1``, after the padding of a
        left-padded row: from ``mask``)."""
        if not self._rotary:
            raise ValueError(
                "far_rope=False needs the model's rotary module: convert the model with "
                "linattn.integrations.hf.convert(model, ..., far_rope=False)"
            )
        pos = positions_for(positions, mask, q.shape[0], q.shape[-2], q.device)
        far_q, far_k = unrotate_pair(self._rotary[0], q, k, pos)
        return {"far_q": far_q, "far_k": far_k}

    def decay(self) -> Tensor | None:
        """``ln gamma = -1 / far_decay`` as a 0-d float64 tensor (cast to the compute
        dtype by the call), or None; the same tensor while ``far_decay`` and the device are
        unchanged (its value is then checked once)."""
        if self.far_decay is None:
            return None
        device = self.projection.device
        key = (self.far_decay, device)
        cached = getattr(self, "_decay_cache", None)
        if cached is None or cached[0] != key:
            value = torch.tensor(-1.0 / self.far_decay, dtype=torch.float64, device=device)
            cached = (key, value)
            self._decay_cache = cached
        return cached[1]

    def _slots_on(self) -> bool:
        return bool(self.slots and self.near and self.use_slots)

    def _held_parts(self) -> tuple:
        """What a cache's state depends on beside the weights: ``(near, far, slots)``,
        ``slots`` = ``(G, rule, interval)`` while slots are in force, else None."""
        slots = (self.slots, self.slot_rule, self.slot_interval) if self._slots_on() else None
        return (bool(self.near), bool(self.far), slots)

    def _fold(
        self,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        q: Tensor,
        state,
        kw: dict,
        positions: Tensor | None = None,
    ):
        """The recurrent state after ``state`` has absorbed keys ``k: (B, H_kv, n, d)`` and
        values ``v`` (``mask: (B, n)`` True = padding; ``positions``: their position ids,
        for ``far_rope=False``); ``q`` gives the heads ``H`` (a multiple of ``H_kv``),
        dtype and device. The state depends on the keys and values only: zero queries,
        their outputs dropped. The hybrid's state keeps its ring and sink slots per
        key/value head (as :func:`linattn.favor_recurrent` with grouped ``k, v``)."""
        hybrid = _has_ring(kw)
        if hybrid:
            k, v = (t.to(device=q.device, dtype=q.dtype) for t in (k, v))
        else:
            k, v = as_query_heads(k, v, q)
        kw = dict(kw)
        zeros = k.new_zeros(k.shape[0], q.shape[1], *k.shape[2:])
        if self._unrotated():
            far_k = self._far_inputs(k, k, mask, positions)["far_k"]
            if self.near:
                kw.update(far_q=zeros, far_k=far_k)
            else:
                # Linear only: every key is scored by the feature map, un-rotated.
                k = far_k
        if state is None and k.shape[-2] and hybrid:
            # The window hybrid's state straight from the keys and values: no band
            # attention for queries whose outputs would be dropped.
            opts = {name: kw[name] for name in ("kernel", "scale", "window", "sinks")}
            return _favor_state_of(
                k,
                v,
                self.projection,
                key_padding_mask=mask,
                **opts,
                decay=kw.get("decay"),
                far_k=kw.get("far_k"),
                heads=q.shape[1],
            )
        return favor_recurrent(
            zeros, k, v, self.projection, state=state, key_padding_mask=mask, **kw
        )[1]

    def _parts(self, q: Tensor) -> dict:
        """``window``, ``sinks`` and ``linear_factor`` for the attention parts in force."""
        if not self.near:
            # Linear only: no exact keys; the factor cancels without them.
            return {"window": None, "sinks": 0, "linear_factor": None}
        if not self.far:
            # Window (and sinks) only: the far keys weigh 0 in the one normalizer.
            return {
                "window": self.window,
                "sinks": self.sinks,
                "linear_factor": q.new_zeros((), dtype=torch.float32),
            }
        parts = {"window": self.window, "sinks": self.sinks, "linear_factor": self.linear_factor()}
        if self.far_decay is not None:
            parts["decay"] = self.decay()
        return parts

    def options(self) -> dict:
        return {
            "num_features": self.num_features,
            "kernel": self.kernel,
            "window": self.window,
            "sinks": self.sinks,
            "orthogonal": self.orthogonal,
            "scaling": self.scaling,
            "redraw_interval": self.redraw_interval,
            "chunk_size": self.chunk_size,
            "learn_projection": self.learn_projection,
            "slots": self.slots,
            "slot_rule": self.slot_rule,
            "slot_interval": self.slot_interval,
            "far_rope": self.far_rope,
            "far_decay": self.far_decay,
        }

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, "
            f"kernel={self.kernel!r}, window={self.window}"
            + (f", sinks={self.sinks}" if self.sinks else "")
            + (f", slots={self.slots}, slot_rule={self.slot_rule!r}" if self.slots else "")
            + ("" if self.far_rope else ", far_rope=False")
            + ("" if self.far_decay is None else f", far_decay={self.far_decay:g}")
        )


def _has_ring(kw: dict) -> bool:
    """Whether the attention options ``kw`` (window, sinks) make the window hybrid, whose
    decoding state keeps a ring of keys (per key/value head)."""
    return kw["window"] is not None or bool(kw["sinks"])


def check_far_decay(far_decay: object) -> float | None:
    """``far_decay`` checked: None, or a finite number of tokens > 0 (as a float)."""
    if far_decay is None:
        return None
    if isinstance(far_decay, bool) or not isinstance(far_decay, (int, float)):
        raise TypeError(
            f"far_decay must be None or a number of tokens > 0, got {type(far_decay).__name__}"
        )
    if not math.isfinite(far_decay) or far_decay <= 0:
        raise ValueError(f"far_decay must be a finite number of tokens > 0, got {far_decay!r}")
    return float(far_decay)


def converted_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Attention modules of ``model`` that carry a linear-attention state."""
    for module in model.modules():
        if isinstance(getattr(module, "linattn", None), (FavorLayerState, LinformerLayerState)):
            yield module
