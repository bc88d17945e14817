"""FAVOR+ attention: naive oracle, bidirectional, causal (chunked) and recurrent forms."""

from .bidirectional import favor_bidirectional
from .causal import favor_causal
from .naive import favor_naive
from .recurrent import FavorState, favor_recurrent_step

__all__ = [
    "FavorState",
    "favor_bidirectional",
    "favor_causal",
    "favor_naive",
    "favor_recurrent_step",
]
