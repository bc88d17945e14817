"""Causal window hybrid with a budget of exact key-value slots kept by a rule (LoLA-style).

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``d`` head_dim, ``dv`` value dim,
``M`` features per token, ``w`` window, ``s`` sinks, ``G`` slots (cache budget), ``I``
decision interval. ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``.

Semantics (causal only; no ``key_padding_mask``)
-------------------------------------------------
Every earlier key ``j <= i`` of query ``i`` is in exactly one of five sets, and query
``i`` scores it with the exact ``e^{s_ij}`` (``s_ij = scale q_i.k_j``) if it is in one of
the first four, and with ``lambda_h phi(q_i).phi(k_j)`` (``phi`` the kernel's feature
map, ``lambda_h`` the optional per-head ``linear_factor``) if it is in the fifth, all
under one normalizer::

    out_i = (sum_{exact} e^{s_ij} v_j + lambda sum_{far} phi_i.phi_j v_j)
            / (sum_{exact} e^{s_ij} + lambda sum_{far} phi_i.phi_j)

* **sinks**: ``j < s`` (the first ``s`` keys), always exact, never cached or evicted;
* **window**: ``i - w < j <= i``, ``j >= s``;
* **pending**: keys that have left the window but have not been decided yet;
* **cache**: at most ``G`` keys per (batch, head), chosen by the rule (heads choose
  independently);
* **far**: the evicted keys, summed in the linear state ``(S, z) = sum_j (phi(k_j)
  v_j^T, phi(k_j))``.

Time runs over the queries. Before query ``i`` the key ``j = i - w`` leaves the window;
if ``j >= s`` it joins the pending group. When ``(j - s + 1) % I == 0`` (the group holds
``I`` keys) the rule decides, still before query ``i``: the candidates are the cached
keys (in cache order) followed by the pending keys (oldest first); if there are at most
``G`` of them all are cached, else the ``G`` with the largest score are cached (ties: the
earlier candidate wins; the kept ones stay in candidate order) and the others are
evicted into ``(S, z)``. The pending group is then empty. ``I = 1`` decides on every key
as it leaves the window (no pending keys ever; with ``G = 0`` this is exactly the
causal window hybrid of ``favor_attention(..., causal=True, window=w, sinks=s)``).
``I > 1`` batches the decisions (as LoLA does with its chunks): a key then stays exact
for up to ``I - 1`` tokens after it leaves the window, so query ``i`` scores between
``w`` and ``w + I - 1`` recent keys exactly (compare slot variants against ``G = 0`` at
the same ``I``).

Rules (the score, larger = kept):

* ``"error"`` (LoLA's self-recall error): ``||v_j - S^T phi(k_j) / z^T phi(k_j)||``,
  how badly the current far state (before this decision's evictions) reads key ``j``'s
  value back; ``0`` read-out when ``z^T phi(k_j) == 0`` (empty state). Recomputed for the
  cached keys at every decision (the state changes).
* ``"mass"`` (H2O-style heavy hitters): the attention probability the key has received
  so far, summed over every query that scored it exactly (in the window, pending or
  cached), ``p_ij = e^{s_ij} / den_i``.
* ``"union"``: the larger of the two above, each divided by its largest value among the
  decision's candidates: a key either rule ranks high is kept. The two pick different
  keys in different layers (SmolLM2 at 4k tokens: the error rule keeps a copied list in
  the middle layers, the mass rule in the last ones).

The scores are data, not parameters: decisions carry no gradient; the outputs are
differentiable in ``q``, ``k``, ``v`` (and the projection / ``linear_factor``) for the
decisions made.

State per (batch, head), O(1) in the length: sinks ``s``, the window and pending keys
(at most ``w + I - 1``), the cache ``G``, ``(S, z)`` ``(M, dv + 1)`` and their scores.
Time O(L (w + I + G + s) d + L M dv) plus ``O((G + I) M dv)`` per decision for
``"error"``.

Forms
-----
* :func:`slots_reference`: token by token, plain sets and the exact feature map
  (``fm.exact``); the oracle (float64, small sizes).
* :func:`favor_slots`: the sequence in segments between decisions (``I`` tokens; the
  default ``I = w`` gives chunks of the window size): the exact part of a segment is one
  masked product against ``[sinks, cache, window + pending + the segment's keys]``, the
  far part one product against the fixed state; stabilized (per-token feature
  log-scales, a running maximum for the state), float32-safe.
* :func:`favor_slots_step`: the same machinery from a :class:`SlotState`, for decoding
  (any number of new tokens; token by token equals one call).
"""

from __future__ import annotations

from .common import RULES, SlotState, tie_safe, union_score
from .reference import slots_reference
from .segments import empty_slot_state, favor_slots, favor_slots_step

__all__ = [
    "RULES",
    "SlotState",
    "empty_slot_state",
    "favor_slots",
    "favor_slots_step",
    "slots_reference",
    "tie_safe",
    "union_score",
]
