"""The Linformer oracle: per sequence, drop padding, project, exact softmax."""

from __future__ import annotations

import torch
from torch import Tensor


def linformer_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj_k: Tensor,
    proj_v: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference Linformer attention, one sequence at a time.

    Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``,
    ``proj_k``/``proj_v``: ``(proj_dim, n)`` or ``(H, proj_dim, n)``, ``key_padding_mask: (B, Lk)``.

    Equivalent to, for each sequence ``b`` with real keys ``K_b`` (``len_b`` rows)::

        K' = proj_k[..., :len_b] @ K_b;  V' = proj_v[..., :len_b] @ V_b
        out_b = softmax(q_b @ K'^T * scale) @ V'
    """
    proj_v = proj_k if proj_v is None else proj_v
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for b in range(q.shape[0]):
        keep = slice(None) if key_padding_mask is None else ~key_padding_mask[b]
        kb, vb = k[b][:, keep], v[b][:, keep]
        n = kb.shape[-2]
        kp = proj_k[..., :n] @ kb
        vp = proj_v[..., :n] @ vb
        att = torch.softmax(q[b] @ kp.transpose(-2, -1) * scale, dim=-1)
        outs.append(att @ vp)
    return torch.stack(outs)
