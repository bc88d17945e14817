"""The dtype linear attention computes in, shared by the functional path and the
integrations."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float32`` for half-precision ``dtype`` (``float16``, ``bfloat16``), else ``dtype``:
    exponentials, key sums and normalizers accumulate in float32 for half inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
