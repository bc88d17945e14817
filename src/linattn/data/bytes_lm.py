"""Byte-level language modelling data (the enwik8 setting) from real text."""

from __future__ import annotations

import torch
from torch import Tensor

from .text import gcide_text


def gcide_bytes(
    path=None, *, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, Tensor]:
    """GCIDE as UTF-8 bytes (``uint8`` tensors), split into contiguous train / val / test
    parts (the last ``val_fraction + test_fraction`` of the file held out, as enwik8's
    90/5/5)."""
    data = torch.frombuffer(bytearray(gcide_text(path).encode("utf-8")), dtype=torch.uint8)
    n = data.numel()
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    n_train = n - n_val - n_test
    return {
        "train": data[:n_train],
        "val": data[n_train : n_train + n_val],
        "test": data[n_train + n_val :],
    }


def random_windows(
    data: Tensor, batch: int, length: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of shape ``(batch, length)`` (``long``): random windows of
    ``data``, targets shifted by one byte."""
    if data.numel() <= length + 1:
        raise ValueError(f"data has {data.numel()} bytes, need more than {length + 1}")
    start = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(length + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(data: Tensor, length: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping ``(n, length + 1)`` windows covering ``data`` (for bits per byte
    on held-out text; the first byte of each window is context only)."""
    n = (data.numel() - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)
    return data[idx].long()
