"""FAVOR+ attention: the naive oracle (``naive.py``), bidirectional, causal (chunked)
and recurrent forms, and the sliding-window hybrid with sink keys (``window/``:
:func:`favor_window`, decoding through :func:`favor_recurrent_step`); ``triton/``: fused
CUDA kernels."""

from .bidirectional import favor_bidirectional
from .causal import favor_causal
from .naive import favor_naive
from .recurrent import FavorState, empty_window_state, favor_recurrent_step
from .window import favor_window

__all__ = [
    "FavorState",
    "empty_window_state",
    "favor_bidirectional",
    "favor_causal",
    "favor_naive",
    "favor_recurrent_step",
    "favor_window",
]
