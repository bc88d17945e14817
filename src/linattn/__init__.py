"""linattn: attention whose time and memory grow linearly with sequence length.

Performer's FAVOR+ (random-feature softmax attention and generalized kernels) and
Linformer (sequence-axis projection of keys and values), as functions and modules.
"""

from ._io import CheckpointError
from .features import KERNELS, Kernel
from .functional import FavorState, favor_attention, favor_recurrent, linformer_attention
from .nn import (
    ExactAttention,
    FavorOptions,
    LinformerAttention,
    LinformerOptions,
    LinformerProjection,
    PerformerAttention,
)
from .projection import draw_projection

# The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "CheckpointError",
    "ExactAttention",
    "FavorOptions",
    "FavorState",
    "Kernel",
    "LinformerAttention",
    "LinformerOptions",
    "LinformerProjection",
    "PerformerAttention",
    "__version__",
    "draw_projection",
    "favor_attention",
    "favor_recurrent",
    "linformer_attention",
]
