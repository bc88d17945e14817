"""Explicit path selection for ``favor_attention``: one call described by a dataclass,
backends asked in order why they cannot run it.

:class:`FavorCall` holds every argument of a :func:`linattn.favor_attention` call (the
inputs already checked, padded keys and values already zeroed). Each :class:`Backend`
answers :meth:`~Backend.not_supported_reasons` with a list of reasons (empty: it can
run the call); :func:`dispatch` runs the first backend with none. Which path a call
takes therefore depends only on the call's fields, never on what else is in scope.

``LINATTN_LOG_DISPATCH=1`` logs, for every call, the backend that ran and why each one
before it did not (logger ``linattn.dispatch``, INFO; with no handler configured one
that writes to stderr is added, and the logger's level lowered to INFO if it was
above). Without it the same line goes to the logger at DEBUG. Calls traced by
``torch.compile`` are not logged (logging would break the graph).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["Backend", "FavorCall", "dispatch", "explain"]

_ENV = "LINATTN_LOG_DISPATCH"
logger = logging.getLogger("linattn.dispatch")


@dataclass(frozen=True, eq=False)
class FavorCall:
    """One ``favor_attention`` call: its arguments by name (the public signature's).

    ``k`` and ``v`` have their padded positions zeroed already (once, before any
    backend sees them); ``sinks`` is an int (0: none)."""

    q: Tensor
    k: Tensor
    v: Tensor
    projection: Tensor | None = None
    kernel: str = "softmax"
    causal: bool = False
    key_padding_mask: Tensor | None = None
    scale: float | None = None
    window: int | None = None
    linear_factor: Tensor | None = None
    chunk_size: int = 64
    block_size: int | None = None
    sinks: int = 0
    cu_seqlens: Tensor | None = None
    initial_state: object | None = None
    output_final_state: bool = False
    decay: Tensor | None = None
    far_q: Tensor | None = None
    far_k: Tensor | None = None

    def options(self) -> dict:
        """Every field but ``q``, ``k``, ``v`` and ``projection``, by name."""
        skip = ("q", "k", "v", "projection")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass(frozen=True)
class Backend:
    """A way to compute a :class:`FavorCall`: ``name``, ``not_supported_reasons(call) ->
    list[str]`` (empty: supported) and ``run(call)``."""

    name: str
    not_supported_reasons: Callable[[FavorCall], list[str]]
    run: Callable[[FavorCall], object]


def explain(
    call: FavorCall, backends: list[Backend]
) -> tuple[Backend, list[tuple[str, list[str]]]]:
    """The backend that runs ``call`` and, for each backend before it, its name and its
    reasons. Raises ``RuntimeError`` when none supports the call (the last backend of a
    list should support every call)."""
    skipped = []
    for backend in backends:
        reasons = backend.not_supported_reasons(call)
        if not reasons:
            return backend, skipped
        skipped.append((backend.name, reasons))
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in skipped)
    raise RuntimeError(f"no backend supports this favor_attention call ({detail})")


def _log_enabled() -> bool:
    return os.environ.get(_ENV, "0").strip().lower() not in ("", "0", "off", "false", "no")


def dispatch(call: FavorCall, backends: list[Backend]):
    """Run ``call`` on the first of ``backends`` with no reason against it (logged)."""
    backend, skipped = explain(call, backends)
    # Logging breaks a captured graph (torch.compile(fullgraph=True)): the path of a
    # compiled call is decided at trace time, so it is not logged there.
    if torch.compiler.is_compiling():
        return backend.run(call)
    loud = _log_enabled()
    if loud or logger.isEnabledFor(logging.DEBUG):
        why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in skipped)
        msg = f"favor_attention ran {backend.name}" + (f" (skipped {why})" if why else "")
        if loud:
            # The variable asks for the line: make sure it is shown.
            if not logger.hasHandlers():
                logger.addHandler(logging.StreamHandler())
            if not logger.isEnabledFor(logging.INFO):
                logger.setLevel(logging.INFO)
            logger.info(msg)
        else:
            logger.debug(msg)
    return backend.run(call)
