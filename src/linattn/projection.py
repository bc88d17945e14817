"""Random projections for FAVOR+: orthogonal (Haar-correct) or iid rows, chi or
sqrt(d) norms."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_choice, check_positive_int

__all__ = ["draw_projection"]


def draw_projection(
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    scaling: str = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw the random projection ``W: (num_features, head_dim)`` for FAVOR+.

    Args:
        num_features: ``m``, the number of rows. Each token gets ``m`` features from the
            positive softmax, FAVOR++, relu and elu maps, and ``2m`` from the maps that
            stack two halves (``"softmax_hyp"``, ``"softmax_trig"``, ``"hedgehog"``):
            :meth:`linattn.features.FeatureMap.feature_dim` gives the width.
        head_dim: ``d``, the width of queries and keys.
        orthogonal: if True, rows come in blocks of ``d`` mutually orthogonal directions
            (orthogonal random features, ORF): each block is ``Q * sign(diag(R))`` from
            the QR decomposition of a ``d x d`` standard Gaussian matrix, which makes
            ``Q`` Haar-distributed (without the sign correction it is not, and the
            kernel estimate is biased). Blocks are stacked and truncated to ``m`` rows.
            If False, rows are iid ``N(0, I_d)``.
        scaling: ``"chi"``: row norms are those of fresh Gaussian vectors (chi with
            ``d`` degrees of freedom), so each row is marginally ``N(0, I_d)`` and
            ``phi(q).phi(k)`` is unbiased for ``exp(q.k)``; ``"sqrt_d"``: every row has
            norm ``sqrt(d)`` (the paper's regularized variant, slightly biased).
        generator: the ``torch.Generator`` to draw from (on ``device``); None uses the
            global RNG.
        device, dtype: of the result (default: the generator's device, float32).

    Returns:
        ``W: (num_features, head_dim)``.

    Equivalent to (iid, chi)::

        torch.randn(num_features, head_dim, generator=generator)
    """
    check_positive_int("num_features", num_features)
    check_positive_int("head_dim", head_dim)
    check_choice("scaling", scaling, ("chi", "sqrt_d"))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype (float16, bfloat16, float32, float64), "
            f"got {dtype}"
        )
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    # Draw in float64 for an accurate QR, then cast.
    if orthogonal:
        num_blocks = math.ceil(num_features / head_dim)
        g = torch.randn(
            num_blocks,
            head_dim,
            head_dim,
            generator=generator,
            device=gen_device,
            dtype=torch.float64,
        )
        q, r = torch.linalg.qr(g)
        # Haar measure: fix the sign ambiguity of QR (Mezzadri 2007).
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        q = q * signs.unsqueeze(-2)
        # Rows of q^T are orthonormal directions.
        w = q.transpose(-2, -1).reshape(num_blocks * head_dim, head_dim)[:num_features]
    else:
        w = torch.randn(
            num_features, head_dim, generator=generator, device=gen_device, dtype=torch.float64
        )
    if scaling == "chi":
        if orthogonal:
            norms = torch.randn(
                num_features,
                head_dim,
                generator=generator,
                device=gen_device,
                dtype=torch.float64,
            ).norm(dim=-1)
            w = w * norms.unsqueeze(-1)
    else:
        w = w / w.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)
    return w.to(device=device, dtype=dtype)
