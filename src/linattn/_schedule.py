"""Learning-rate schedules shared by training and distillation."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, steps: int, min_ratio: float) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then cosine decay from 1
    to ``min_ratio`` at ``steps`` (held there after)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor
