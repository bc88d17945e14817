"""The sliding-window hybrid (``window=``, ``sinks=``): exact softmax scores for the keys
in each query's window and for the sink keys, FAVOR features for every other key, under
one normalizer; O(L (w + M + s)) time and memory. Derivations: ``ops/favor/README.md``.

What lives where:

* ``hybrid.py``: :func:`favor_window` (the entry; CPU grouping of (batch, head) pairs,
  :func:`window_groups`), :class:`HybridCall` (its options, written once), the
  bidirectional and causal hybrids side by side, and :func:`combine` (the parts under
  the true maximum of their normalizers);
* ``band.py``: the exact band by block pairs, hand-written backward (:func:`band_blocks`);
* ``far.py``: the far part under one key stabilizer by block pairs, hand-written
  backward (:func:`far_blocks`, :func:`far_sums`), and the spread limits;
* ``sinks.py``: the sink keys (parallel :func:`sink_part`, decoding ``step_sinks``);
* ``step.py``: causal decoding, :func:`favor_window_step`;
* ``naive.py``: the plain-autograd references of the block paths, also their fallbacks
  (:func:`band_attention`, :func:`far_left`, :func:`far_running_max`,
  :func:`far_block_sums_reference`);
* ``layout.py``: shifted sequences and block-major layouts shared by the parts.
"""

from .band import band_blocks
from .far import far_block_sums, far_blocks, far_sums
from .hybrid import HybridCall, combine, favor_window, window_groups
from .naive import band_attention, far_block_sums_reference, far_left, far_running_max
from .step import favor_window_step

__all__ = [
    "HybridCall",
    "band_attention",
    "band_blocks",
    "combine",
    "far_block_sums",
    "far_block_sums_reference",
    "far_blocks",
    "far_left",
    "far_running_max",
    "far_sums",
    "favor_window",
    "favor_window_step",
    "window_groups",
]
