"""Feature maps for FAVOR+ and generalized-kernel attention (random projections are
drawn by :mod:`linattn.projection`).

Shape legend: ``...`` leading (batch, heads) dims, ``n`` tokens, ``d`` head_dim,
``m`` projection rows (rows of ``W``), ``M`` features per token (``m``, or ``2m`` for
the hyperbolic, trigonometric and hedgehog maps). ``W`` is ``(m, d)`` shared by the
heads, or ``(H, m, d)`` one per head (then ``x`` is ``(B, H, n, d)``); the untied map
(``"hedgehog_untied"``, one map for the queries and another for the keys) takes
``(m, 2d)`` or ``(H, m, 2d)``, the key and the query projections side by side, and its
callers say which side they featurize (``is_query``).

Every feature map is defined exactly by :meth:`FeatureMap.exact` (the formula; the naive
oracle calls it, and :func:`exact_features` is the same by kernel name). The fast paths call :meth:`FeatureMap.stabilized`, which returns the
same features split as ``phi(x) = const * F * exp(r)`` with ``F`` bounded by 1 for the
exponential maps and ``r`` a per-token log-scale: attention only needs ratios, so the
positive constant cancels and the per-token scales can be combined with stabilizers
chosen by the algorithm (see ``ops/favor/README.md``).

Feature maps take raw queries/keys ``x`` and the call's ``scale``; the formulas are
written for ``x~ = x * sqrt(scale)``. The fast paths fold ``sqrt(scale)`` (and
``log2(e)``, to use the faster ``exp2``) into the projection instead of scaling ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .projection import draw_projection

__all__ = [
    "KERNELS",
    "FeatureMap",
    "Kernel",
    "draw_projection",
    "exact_features",
    "get_feature_map",
]


@dataclass
class FeatureParams:
    """Per-call quantities a feature map needs besides the tokens.

    ``weight``: ``(m, d)`` or per-head ``(H, m, d)`` projection, or None; ``scale``: the logit scale (``x~ = x *
    sqrt(scale)``); ``opt_a``/``opt_b``: FAVOR++'s ``A`` and ``B``, shape ``(...)`` (one
    per batch and head) or None; ``opt_shift``: ``(..., M)`` per-feature log2 shift moved
    from the keys' features to the queries' (the product is unchanged; see FAVOR++).
    """

    weight: Tensor | None
    scale: float = 1.0
    opt_a: Tensor | None = None
    opt_b: Tensor | None = None
    opt_shift: Tensor | None = None

    def replace_weight(self, weight: Tensor | None) -> FeatureParams:
        return FeatureParams(weight, self.scale, self.opt_a, self.opt_b, self.opt_shift)


class FeatureMap:
    """A feature map ``phi``; subclasses define one kernel.

    Attributes:
        name: the ``kernel=`` string.
        positive_features: every feature is ``> 0`` (the exponential maps, hedgehog,
            relu, elu), so an attention normalizer is ``> 0`` wherever a row sees a key
            and 0 where it sees none; False (the safe default) for signed features
            (trigonometric), whose normalizer may be negative.
        exp2_logits: :meth:`stabilized` is ``F = exp2(L - max L)`` of the base-2 logits
            ``L`` that ``_logits2`` returns (the positive and hyperbolic softmax maps and
            FAVOR++): a hand-written backward may differentiate the logits alone
            (``dL = ln2 * F * dF``).
        needs_projection: a random projection is required (else optional).
        causal_ok: the map depends only on the token itself (not on the other tokens).
    """

    name = ""
    positive_features = False
    exp2_logits = False
    needs_projection = True
    causal_ok = True

    #: The map scores queries and keys with different parameters (``phi_q != phi_k``):
    #: callers must say which side they featurize (``is_query``).
    untied = False

    def weight_cols(self, head_dim: int) -> int:
        """Columns of the projection ``W`` for this map: ``d`` (``2d`` for the untied
        maps, whose ``W`` holds the key and the query projections side by side)."""
        return head_dim

    def feature_dim(self, weight: Tensor | None, head_dim: int) -> int:
        """The feature width ``M`` per token (``m``, or ``2m`` for the maps that stack two
        halves) for a projection with ``m`` rows, or none. ``num_features`` is ``m``."""
        return weight.shape[-2] if weight is not None else head_dim

    def log_const(self, params: FeatureParams) -> float | Tensor:
        """``ln c`` of :meth:`stabilized` (a float, or ``(...)`` per batch and head).

        Plain FAVOR drops it (it cancels); the window hybrid needs the features' true
        scale to weigh them against the exact ``exp(scale q.k)`` scores.
        """
        return 0.0

    def prepare(
        self,
        weight: Tensor | None,
        q: Tensor,
        k: Tensor,
        key_padding_mask: Tensor | None,
        scale: float,
    ) -> FeatureParams:
        """Per-call parameters; ``q: (..., Lq, d)``, ``k: (..., Lk, d)``."""
        return FeatureParams(weight, scale)

    def exact(self, x: Tensor, params: FeatureParams, *, is_query: bool | None = None) -> Tensor:
        """``phi(x): (..., n, M)`` by the documented formula, no stabilizer.
        ``is_query``: which side ``x`` is (required by the untied maps; the others have
        one map for both)."""
        raise NotImplementedError

    def stabilized(
        self, x: Tensor, params: FeatureParams, *, is_query: bool, inplace: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(F: (..., n, M), r: (..., n))`` with ``phi(x) = c * F * exp(r[..., None])``.

        ``c > 0`` is a constant of the call. For queries ``r`` may be dropped (it
        cancels in each output row). ``inplace`` lets the map reuse its temporaries (only
        valid without autograd).
        """
        raise NotImplementedError

    def stabilized_query(
        self, x: Tensor, params: FeatureParams, *, inplace: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Queries' ``(F, r)`` as :meth:`stabilized` with ``r`` kept (``phi(q) = c * F *
        exp(r)`` exactly): the window hybrid weighs them against exact scores, so the
        row scale does not cancel there. Same as the keys' form unless the map treats
        the two sides differently (FAVOR++'s per-feature shift, the untied maps)."""
        return self.stabilized(x, params, is_query=False, inplace=inplace)


_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _moments(x: Tensor, key_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean squared norm ``(...)`` and mean vector ``(..., d)`` of ``x: (..., L, d)`` over
    the positions where ``key_weight (B, 1.., L)`` (float: 1 = real, 0 = padding) is 1
    (all positions if None)."""
    if key_weight is None:
        return (x * x).sum(-1).mean(-1), x.mean(-2)
    count = key_weight.sum(-1).clamp_min(1.0)
    # A select, not a product: padded positions may hold NaN or inf (NaN * 0 is NaN).
    x = x.masked_fill(key_weight.unsqueeze(-1) == 0, 0)
    return (x * x).sum(-1).sum(-1) / count, x.sum(-2) / count.unsqueeze(-1)


def _sq_half(x: Tensor, scale: float = 1.0) -> Tensor:
    # [..., n, 1]: |x~|^2 / 2 for x~ = x * sqrt(scale).
    return (0.5 * scale) * (x * x).sum(-1, keepdim=True)


def _scaled(x: Tensor, params: FeatureParams) -> Tensor:
    return x * math.sqrt(params.scale)


class _PositiveSoftmax(FeatureMap):
    """FAVOR+ positive features (the default ``kernel="softmax"``).

    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``; ``E[phi(q).phi(k)] = exp(q.k)`` for rows
    of ``W`` marginally ``N(0, I)``. ``M = m``.
    """

    name = "softmax"
    positive_features = True
    exp2_logits = True

    def _weight(self, params: FeatureParams) -> Tensor:
        return params.weight

    def _logits2(
        self, x: Tensor, params: FeatureParams, with_norm: bool, query: bool | None = None
    ) -> Tensor:
        # log2(e) * (W x~ - |x~|^2 / 2), with sqrt(scale) and log2(e) folded into W and the
        # norm folded into the matmul: [x, -s|x|^2/2] @ [c W, log2(e)]^T (no extra pass).
        w = self._weight(params) * (math.sqrt(params.scale) * _LOG2E)
        if not with_norm:
            return x.contiguous() @ w.transpose(-2, -1)
        x_aug = torch.cat([x, -_sq_half(x, params.scale)], dim=-1)
        w_aug = torch.cat([w, w.new_full((*w.shape[:-1], 1), _LOG2E)], dim=-1)
        return x_aug @ w_aug.transpose(-2, -1)

    def log_const(self, params):
        return -0.5 * math.log(self._weight(params).shape[-2])

    def exact(self, x: Tensor, params: FeatureParams, *, is_query: bool | None = None) -> Tensor:
        w = self._weight(params)
        xs = _scaled(x, params)
        return torch.exp(xs @ w.transpose(-2, -1) - _sq_half(xs)) / math.sqrt(w.shape[-2])

    def stabilized(self, x, params, *, is_query, inplace=False):
        # Queries: the -|q|^2/2 term is a per-row constant and cancels; skip it.
        logits = self._logits2(x, params, with_norm=not is_query)
        r2 = logits.detach().amax(dim=-1)
        # exp2 runs about 3x faster than exp on CPU; r is returned in natural-log units.
        if inplace:
            return logits.sub_(r2.unsqueeze(-1)).exp2_(), r2 * _LN2
        return torch.exp2(logits - r2.unsqueeze(-1)), r2 * _LN2


class _HyperbolicSoftmax(_PositiveSoftmax):
    """Hyperbolic positive features (FAVOR+ with lower variance), ``M = 2m``.

    ``phi(x) = exp(-|x|^2 / 2) / sqrt(2m) * [exp(W x), exp(-W x)]`` (concatenated).
    Unbiased for ``exp(q.k)``, as the mean of the positive estimators for ``w`` and
    ``-w``.
    """

    name = "softmax_hyp"

    def feature_dim(self, weight, head_dim):
        return 2 * weight.shape[-2]

    def _weight(self, params):
        return torch.cat([params.weight, -params.weight], dim=-2)


class _OptimalPositiveSoftmax(_PositiveSoftmax):
    """FAVOR++ optimal positive features (Likhosherstov et al. 2022), ``M = m``.

    ``phi(x) = D / sqrt(m) * exp(A |w|^2 + B w.x - |x|^2 / 2)`` per row ``w`` of ``W``, with
    ``B = sqrt(1 - 4A)``, ``D = (1 - 4A)^(d/4)`` (unbiased for ``exp(q.k)`` for every
    ``A < 1/8``) and the variance-minimizing, data-dependent
    ``A = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16``, ``rho = mean_ij |q_i + k_j|^2 / d``
    over all query/key pairs (unpadded keys), one ``A`` per (batch, head), computed
    without gradient. It depends on every query and key, so it is bidirectional only.
    """

    name = "softmax_opt"
    causal_ok = False

    def prepare(self, weight, q, k, key_padding_mask, scale):
        with torch.no_grad():
            d = q.shape[-1]
            root = math.sqrt(scale)
            qf, kf = q.double() * root, k.double() * root
            key_weight = None
            if key_padding_mask is not None:
                key_weight = (~key_padding_mask).to(kf.dtype)
                key_weight = key_weight.view(
                    key_weight.shape[0], *([1] * (kf.dim() - 3)), key_weight.shape[1]
                )
            k_sq, k_mean = _moments(kf, key_weight)
            # Self-attention: padded positions are padded queries too, and must not move
            # A either (else real tokens' outputs would depend on the padding).
            same = key_weight is not None and qf.shape[-2] == kf.shape[-2]
            q_sq, q_mean = _moments(qf, key_weight if same else None)
            rho = (q_sq + k_sq + 2.0 * (q_mean * k_mean).sum(-1)) / d
            a = (1.0 - 2.0 * rho - torch.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho)) / 16.0
            b = torch.sqrt(1.0 - 4.0 * a)
            params = FeatureParams(weight, scale, opt_a=a.to(q.dtype), opt_b=b.to(q.dtype))
            params.opt_shift = self._key_shift(k, params, key_padding_mask)
        return params

    def _key_shift(self, k, params, key_padding_mask, rows: int = 4096):
        # [..., M] t_m = max over real keys of key j's log2-feature m. Large inputs make A
        # very negative and spread the logits over hundreds of units: per-token
        # stabilizers alone then leave max_{m,j} (lq_im + lk_jm) far below
        # max_m lq_im + max_{m,j} lk_jm, and every product underflows (float32 outputs
        # off by O(1)). Moving t_m from the keys' features to the queries' leaves
        # phi(q).phi(k) unchanged and makes the largest product term exactly 1.
        shift = None
        for s in range(0, k.shape[-2], rows):
            logits = self._logits2(k[..., s : s + rows, :], params, with_norm=True)
            if key_padding_mask is not None:
                pad = key_padding_mask[:, s : s + rows]
                pad = pad.view(pad.shape[0], *([1] * (k.dim() - 3)), pad.shape[1], 1)
                logits = logits.masked_fill(pad, float("-inf"))
            top = logits.amax(-2)
            shift = top if shift is None else torch.maximum(shift, top)
        # Sequences with every key padded: no shift (their outputs are 0 anyway).
        return torch.where(torch.isfinite(shift), shift, 0.0)

    def stabilized_query(self, x, params, *, inplace=False):
        # With the norm term (the true scale), and the query's side of the shift.
        logits = self._logits2(x, params, with_norm=True, query=True)
        r2 = logits.detach().amax(dim=-1)
        return torch.exp2(logits - r2.unsqueeze(-1)), r2 * _LN2

    def _logits2(self, x, params, with_norm, query=None):
        # log2(e) * (B w.x~ + A|w|^2 - |x~|^2/2) as one matmul:
        # [B x, A, -s|x|^2/2] @ log2(e) [sqrt(s) W, |w|^2, 1]^T.
        w = params.weight
        b = params.opt_b[..., None, None]
        a = params.opt_a[..., None, None].expand(*x.shape[:-1], 1)
        cols = [x * b, a.to(x.dtype)]
        w_cols = [w * math.sqrt(params.scale), (w * w).sum(-1, keepdim=True)]
        if with_norm:
            cols.append(-_sq_half(x, params.scale))
            w_cols.append(w.new_ones(*w.shape[:-1], 1))
        logits = torch.cat(cols, dim=-1) @ (torch.cat(w_cols, dim=-1) * _LOG2E).transpose(-2, -1)
        if params.opt_shift is None:
            return logits
        # Keys give up the per-feature shift, queries take it (``query``: default, the
        # side without the norm term).
        shift = params.opt_shift.unsqueeze(-2).to(logits.dtype)
        query = not with_norm if query is None else query
        return logits + shift if query else logits - shift

    def log_const(self, params):
        m, d = params.weight.shape[-2:]
        return (d / 4.0) * torch.log1p(-4.0 * params.opt_a) - 0.5 * math.log(m)

    def exact(self, x, params, *, is_query=None):
        w = params.weight
        m, d = w.shape[-2:]
        xs = _scaled(x, params)
        a = params.opt_a[..., None, None]
        b = params.opt_b[..., None, None]
        dconst = (1.0 - 4.0 * a) ** (d / 4.0)
        logits = a * (w * w).sum(-1).unsqueeze(-2) + b * (xs @ w.transpose(-2, -1)) - _sq_half(xs)
        return dconst / math.sqrt(m) * torch.exp(logits)


class _TrigSoftmax(FeatureMap):
    """Trigonometric random Fourier features (the original RFF), ``M = 2m``.

    ``phi(x) = exp(|x|^2 / 2) / sqrt(m) * [sin(W x), cos(W x)]``. Unbiased for
    ``exp(q.k)`` but not positive: the normalizer can be near zero or negative, which is
    why FAVOR+ replaced it. For comparison experiments.
    """

    name = "softmax_trig"

    def feature_dim(self, weight, head_dim):
        return 2 * weight.shape[-2]

    def log_const(self, params):
        return -0.5 * math.log(params.weight.shape[-2])

    def exact(self, x, params, *, is_query=None):
        xs = _scaled(x, params)
        z = xs @ params.weight.transpose(-2, -1)
        factor = torch.exp(_sq_half(xs)) / math.sqrt(params.weight.shape[-2])
        return factor * torch.cat([torch.sin(z), torch.cos(z)], dim=-1)

    def stabilized(self, x, params, *, is_query, inplace=False):
        z = x @ (params.weight * math.sqrt(params.scale)).transpose(-2, -1)
        feats = torch.cat([torch.sin(z), torch.cos(z)], dim=-1)
        return feats, _sq_half(x, params.scale).squeeze(-1)


class _Generalized(FeatureMap):
    """Base of the deterministic-or-random generalized kernels (no stabilizer needed)."""

    needs_projection = False

    def _pre(self, x: Tensor, params: FeatureParams) -> Tensor:
        if params.weight is None:
            return _scaled(x, params)
        w = params.weight * math.sqrt(params.scale / params.weight.shape[-2])
        return x @ w.transpose(-2, -1)

    def stabilized(self, x, params, *, is_query, inplace=False):
        f = self.exact(x, params)
        return f, f.new_zeros(f.shape[:-1])


class _Relu(_Generalized):
    """ReLU kernel: ``phi(x) = relu(W x) / sqrt(m) + eps`` with a projection, else
    ``relu(x) + eps`` (deterministic features, ``M = d``). ``eps = 1e-3`` keeps the
    normalizer positive."""

    name = "relu"
    positive_features = True
    eps = 1e-3

    def exact(self, x, params, *, is_query=None):
        return F.relu(self._pre(x, params)) + self.eps


class _Elu(_Generalized):
    """ELU+1 kernel (Katharopoulos et al. 2020): ``phi(x) = elu(W x / sqrt(m)) + 1`` with
    a projection, else ``elu(x) + 1`` (``M = d``)."""

    name = "elu"
    positive_features = True

    def exact(self, x, params, *, is_query=None):
        return F.elu(self._pre(x, params)) + 1.0


class _Hedgehog(FeatureMap):
    """Hedgehog learned softmax features (Zhang et al., ICLR 2024), ``M = 2m``.

    ``phi(x) = [softmax(W x~), softmax(-W x~)]`` (concatenated), each softmax over its
    ``m`` features, with ``x~ = x * sqrt(scale)`` and ``W = projection``, ``(m, d)``
    shared or ``(H, m, d)`` per head; ``projection=None`` means ``W = I`` (``m = d``),
    which is also how the modules initialize their trainable ``W``. Not an estimate of
    ``exp(q.k)``: a learned map, trained (attention transfer) so that
    ``phi(q).phi(k)`` ranks keys as softmax does. Features lie in ``[0, 1]`` and each half
    sums to 1, so ``0 < phi(q).phi(k) <= 2``: no stabilizer is needed (``r = 0``,
    ``c = 1``). In the window hybrid the modules weigh this far part by a learned per-head
    ``linear_factor``.
    """

    name = "hedgehog"
    positive_features = True
    needs_projection = False

    def feature_dim(self, weight, head_dim):
        return 2 * (weight.shape[-2] if weight is not None else head_dim)

    def _side_weight(self, params: FeatureParams, is_query: bool | None) -> Tensor | None:
        return params.weight

    def exact(self, x, params, *, is_query=None):
        z = _scaled(x, params)
        w = self._side_weight(params, is_query)
        if w is not None:
            z = z @ w.transpose(-2, -1)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

    def stabilized(self, x, params, *, is_query, inplace=False):
        f = self.exact(x, params, is_query=is_query)
        return f, f.new_zeros(f.shape[:-1])


class _HedgehogUntied(_Hedgehog):
    """Hedgehog with one learned map for the queries and another for the keys (LoLCATs'
    untied maps): ``phi_q(q) = [softmax(W_q q~), softmax(-W_q q~)]``,
    ``phi_k(k) = [softmax(W_k k~), softmax(-W_k k~)]``, ``M = 2m``. The projection holds
    both side by side, ``W = [W_k, W_q]``: ``(m, 2d)`` or ``(H, m, 2d)``;
    ``projection=None`` means ``W_k = W_q = I``; the modules start both halves at the
    tied map's initial matrix (the identity when ``m == d``). Twice the parameters of
    ``"hedgehog"`` at the same features per token; the kernel ``phi_q(q).phi_k(k)`` need
    not be symmetric.
    """

    name = "hedgehog_untied"
    untied = True

    def weight_cols(self, head_dim):
        return 2 * head_dim

    def _side_weight(self, params, is_query):
        if is_query is None:
            raise ValueError(
                f"kernel={self.name!r} has separate query and key maps: pass is_query=True or False"
            )
        w = params.weight
        if w is None:
            return None
        d = w.shape[-1] // 2
        return w[..., d:] if is_query else w[..., :d]

    def stabilized_query(self, x, params, *, inplace=False):
        # r = 0: nothing is dropped for queries; the query map is the other half of W.
        return self.stabilized(x, params, is_query=True, inplace=inplace)


#: The kernel names (feature maps) of :data:`KERNELS`, for type annotations.
Kernel = Literal[
    "softmax",
    "softmax_hyp",
    "softmax_opt",
    "softmax_trig",
    "relu",
    "elu",
    "hedgehog",
    "hedgehog_untied",
]

#: The FAVOR+ feature maps by name (the values of :data:`Kernel`).
KERNELS: dict[str, FeatureMap] = {
    fm.name: fm
    for fm in (
        _PositiveSoftmax(),
        _HyperbolicSoftmax(),
        _OptimalPositiveSoftmax(),
        _TrigSoftmax(),
        _Relu(),
        _Elu(),
        _Hedgehog(),
        _HedgehogUntied(),
    )
}


def get_feature_map(kernel: Kernel) -> FeatureMap:
    """The :class:`FeatureMap` registered under ``kernel`` (see :data:`KERNELS`)."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}; got {kernel!r}")
    return KERNELS[kernel]


def exact_features(
    x: Tensor,
    projection: Tensor | None,
    *,
    kernel: str = "softmax",
    scale: float = 1.0,
    params: FeatureParams | None = None,
    is_query: bool | None = None,
) -> Tensor:
    """``phi(x~): (..., n, M)`` for ``x: (..., n, d)``, ``x~ = x * sqrt(scale)``, by the
    kernel's formula.

    FAVOR++ (``"softmax_opt"``) needs ``params`` from ``prepare`` (its ``A`` depends on
    the queries and keys of the call). ``is_query``: which side ``x`` is (required by
    the untied maps, ``"hedgehog_untied"``).
    """
    fm = get_feature_map(kernel)
    p = params if params is not None else FeatureParams(projection, scale)
    return fm.exact(x, p, is_query=is_query)
