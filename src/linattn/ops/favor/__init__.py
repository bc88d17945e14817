"""FAVOR+ attention: naive oracle, bidirectional, causal (chunked) and recurrent forms."""

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
