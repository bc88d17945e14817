"""Small pieces both FAVOR paths share."""

from __future__ import annotations

import functools
from typing import NoReturn

import torch
from torch import Tensor


def ones_col(v: Tensor) -> Tensor:
    """``[v, 1]: (..., n, dv + 1)``: the normalizer rides along as a last value column."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def safe_denominator(den: Tensor, positive: bool) -> Tensor:
    """``den`` with rows that see no key set to ``inf``, so their output is exactly 0.

    Positive feature maps have ``den >= 0`` (0 when every visible key is padding);
    signed ones (trigonometric) only lose exact zeros.
    """
    valid = den > 0 if positive else den != 0
    return torch.where(valid, den, float("inf"))


def graph_captured() -> bool:
    """True while ``torch.compile`` traces or a ``torch.func`` transform (``vmap``,
    ``grad``, ...) runs: paths that decide something from the data (a host sync) must not
    be taken then; the window hybrid takes its always-valid forms instead."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def builds_grad(*tensors: object) -> bool:
    """Whether autograd would record a graph through any of ``tensors`` (None and
    non-tensors skipped): grad mode is on and one of them requires a gradient. Fast
    paths that only compute forward (compiled steps, fused state sums) check it."""
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    )


def no_forward_mode(name: str) -> NoReturn:
    """Raise the error of an ``autograd.Function.jvp`` that a hand-written backward has
    no forward-mode counterpart for (``torch.func.jvp``, ``jacfwd``, forward_ad)."""
    raise RuntimeError(
        f"{name} has no forward-mode derivative (torch.func.jvp, jacfwd, "
        "torch.autograd.forward_ad): its backward is hand-written. Use reverse mode "
        "(backward(), torch.func.grad, vjp, jacrev)."
    )


class _NoSecondOrder(torch.autograd.Function):
    """Passes a gradient through; differentiating it again raises a clear error."""

    @staticmethod
    def forward(name, grad, *linked):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.name} has no second derivative: its backward pass is hand-written "
            "(memory-efficient recomputation), so gradients of gradients (create_graph=True "
            "followed by another backward: gradient penalties, Hessian-vector products) "
            "are not available. Use exact attention or linattn.ops.favor.favor_naive for "
            "double backward."
        )


def first_order_only(name: str):
    """Decorator for ``autograd.Function.backward``: run it without building a graph and,
    under ``create_graph=True``, tie its gradients to the incoming ones through a node
    that raises on a second backward (instead of returning gradients with no graph, or
    ``once_differentiable``'s detached ones that read as "not used in the graph")."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *args):
            with torch.no_grad():
                grads = fn(ctx, *args)
            linked = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
            if not torch.is_grad_enabled() or not linked:
                return grads
            return tuple(g if g is None else _NoSecondOrder.apply(name, g, *linked) for g in grads)

        return wrapper

    return decorate
