"""Host side of the Triton FAVOR+ kernels: feature folding, launches, the small
per-segment recurrences (in torch), and the autograd Functions.

Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``, folded weight
``w: (Hw, M, d)`` float32 with ``Hw`` 1 (shared) or ``H`` (per head); ``BH = B * H``.
Derivations: ``README.md`` in this folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import first_order_only
from . import _kernels as kn

_LOG2E = 1.0 / math.log(2.0)
# A finite "minus infinity" for stabilizers: differences of two floors are 0, not NaN.
_FLOOR = -1e30


@dataclass(frozen=True)
class Config:
    """Tile sizes. ``block_l``: rows per program (bidirectional kernels); ``block_m``:
    features per tile; ``chunk``: causal chunk; ``seg_chunks``: chunks per causal segment
    (None: chosen to fill the GPU); ``splits``: row splits of the bidirectional key state
    (None: automatic)."""

    block_l: int = 64
    block_m: int = 64
    chunk: int = 64
    seg_chunks: int | None = None
    splits: int | None = None
    num_warps: int = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_dtype(dtype: torch.dtype):
    # bfloat16 inputs: bfloat16 tensor-core dots (float32 range, so states and 1/den-scaled
    # gradients cannot overflow). float16 inputs: float32 (tf32) dots, since states (sums
    # over up to L keys) and gradients scaled by 1/den can exceed float16's 65504.
    # The interpreter computes bfloat16 dots wrongly (numpy has no bfloat16): float32.
    if dtype == torch.bfloat16 and not _interpreting():
        return tl.bfloat16
    return tl.float32


def _split_logits(dtype: torch.dtype) -> bool:
    # Half inputs: logits from two dots in the input dtype (W' = hi + lo), except bfloat16
    # in the interpreter (its bfloat16 dots are wrong; float32 dots are exact there).
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not _interpreting()


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs keep full float32 dots (correct first); half inputs use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def fold_weight(projection: Tensor, kernel: str, scale: float, heads: int) -> Tensor:
    """``W' = sqrt(scale) log2(e) W`` (``[W, -W]`` for ``softmax_hyp``) as ``(Hw, M, d)``
    float32 contiguous."""
    w = projection.detach().float()
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if kernel == "softmax_hyp":
        w = torch.cat([w, -w], dim=-2)
    return (w * (math.sqrt(scale) * _LOG2E)).contiguous()


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class _Launch:
    """Common launch arguments of one call."""

    def __init__(self, q: Tensor, v: Tensor, w: Tensor, cfg: Config):
        self.bsz, self.heads, _, self.d = q.shape
        self.dv = v.shape[-1]
        self.bh = self.bsz * self.heads
        self.m = w.shape[1]
        self.hw = w.shape[0]
        self.w = w
        self.cfg = cfg
        self.bd, self.bdv = _pow2(self.d), _pow2(self.dv)
        self.bm = min(cfg.block_m, _pow2(self.m))
        self.dt = _dot_dtype(q.dtype)
        self.prec = _prec(q.dtype)
        self.split = _split_logits(q.dtype)
        self.mt = triton.cdiv(self.m, self.bm)

    def consts(self):
        return dict(
            BD=self.bd,
            BM=self.bm,
            DT=self.dt,
            PREC=self.prec,
            SPLIT=self.split,
            num_warps=self.cfg.num_warps,
        )

    def rowmax(self, x: Tensor, hn: float) -> Tensor:
        length = x.shape[2]
        r = torch.empty(self.bsz, self.heads, length, device=x.device, dtype=torch.float32)
        grid = (self.bh, triton.cdiv(length, self.cfg.block_l))
        kn.rowmax_kernel[grid](
            x,
            self.w,
            r,
            length,
            self.m,
            self.d,
            hn,
            self.m * self.d,
            self.hw,
            BL=self.cfg.block_l,
            **self.consts(),
        )
        return r

    def state(self, x, y, ref, hn, rows_per_split, nsplit, ys=None, y1=None):
        """Per-split sums ``(S: (nsplit, B, H, M, dv), z: (nsplit, B, H, M))``."""
        length = x.shape[2]
        s = torch.empty(
            nsplit, self.bsz, self.heads, self.m, self.dv, device=x.device, dtype=torch.float32
        )
        z = torch.empty(nsplit, self.bsz, self.heads, self.m, device=x.device, dtype=torch.float32)
        grid = (self.bh, self.mt, nsplit)
        kn.state_kernel[grid](
            x,
            y,
            ys if ys is not None else ref,
            y1 if y1 is not None else ref,
            ref,
            self.w,
            s,
            z,
            length,
            self.m,
            self.d,
            self.dv,
            rows_per_split,
            hn,
            self.m * self.d,
            self.hw,
            HAS_YS=ys is not None,
            HAS_Y1=y1 is not None,
            BL=self.cfg.block_l,
            BDV=self.bdv,
            **self.consts(),
        )
        return s, z

    def apply(self, q, ref, s, z, out_dtype):
        length = q.shape[2]
        out = torch.empty(self.bsz, self.heads, length, self.dv, device=q.device, dtype=out_dtype)
        den = torch.empty(self.bsz, self.heads, length, device=q.device, dtype=torch.float32)
        grid = (self.bh, triton.cdiv(length, self.cfg.block_l))
        kn.apply_kernel[grid](
            q,
            ref,
            self.w,
            s,
            z,
            out,
            den,
            length,
            self.m,
            self.d,
            self.dv,
            self.m * self.d,
            self.hw,
            BL=self.cfg.block_l,
            BDV=self.bdv,
            **self.consts(),
        )
        return out, den

    def grad(self, x, ref, y, s, z, hn, ys=None, y1=None, want_dy=False):
        length = x.shape[2]
        dx = torch.empty_like(x)
        dy = torch.empty_like(y) if want_dy else dx
        grid = (self.bh, triton.cdiv(length, self.cfg.block_l))
        kn.grad_kernel[grid](
            x,
            ref,
            y,
            ys if ys is not None else ref,
            y1 if y1 is not None else ref,
            self.w,
            s,
            z,
            dx,
            dy,
            length,
            self.m,
            self.d,
            self.dv,
            hn,
            self.m * self.d,
            self.hw,
            HAS_YS=ys is not None,
            HAS_Y1=y1 is not None,
            WANT_DY=want_dy,
            BL=self.cfg.block_l,
            BDV=self.bdv,
            **self.consts(),
        )
        return dx, (dy if want_dy else None)


def _splits(lead: _Launch, length: int, block: int) -> tuple[int, int]:
    """``(rows_per_split, nsplit)``: enough programs for about two waves on the GPU."""
    if lead.cfg.splits is not None:
        want = lead.cfg.splits
    else:
        want = max(1, -(-2 * _sms(lead.w.device) // (lead.bh * lead.mt)))
    blocks = triton.cdiv(length, block)
    per = triton.cdiv(blocks, min(want, blocks)) * block
    return per, triton.cdiv(length, per)


def _grad_scales(grad_out: Tensor, out: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    # ys = 1 / den (0 where no key was visible), gd = -(dout . out) / den.
    ys = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), 0.0)
    gd = -(grad_out.float() * out.float()).sum(-1) * ys
    return ys.contiguous(), gd.contiguous()


# ---------------------------------------------------------------------------------------
# Bidirectional


class _Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, keep, hn, cfg):
        lq = _Launch(q, v, w, cfg)
        rq = lq.rowmax(q, 0.0)
        rk = lq.rowmax(k, hn)
        # One key stabilizer per (b, h): the largest logit of a real key; padded keys get
        # the reference +inf (weight exactly 0).
        if keep is not None:
            rk = rk.masked_fill(~keep[:, None, :], float("-inf"))
        stab = rk.amax(-1, keepdim=True)
        ref_k = stab.expand_as(rk)
        if keep is not None:
            ref_k = ref_k.masked_fill(~keep[:, None, :], float("inf"))
        ref_k = ref_k.contiguous()
        per, nsplit = _splits(lq, k.shape[2], cfg.block_l)
        s, z = lq.state(k, v, ref_k, hn, per, nsplit)
        s, z = s.sum(0), z.sum(0)
        out, den = lq.apply(q, rq, s, z, q.dtype)
        ctx.save_for_backward(q, k, v, w, rq, ref_k, s, z, out, den)
        ctx.hn, ctx.cfg = hn, cfg
        return out

    @staticmethod
    @first_order_only("favor_attention (Triton)")
    def backward(ctx, grad_out):
        q, k, v, w, rq, ref_k, s, z, out, den = ctx.saved_tensors
        hn, cfg = ctx.hn, ctx.cfg
        lq = _Launch(q, v, w, cfg)
        g = grad_out.contiguous()
        ys, gd = _grad_scales(g, out, den)
        per, nsplit = _splits(lq, q.shape[2], cfg.block_l)
        ds, dz = lq.state(q, g, rq, 0.0, per, nsplit, ys=ys, y1=gd)
        ds, dz = ds.sum(0), dz.sum(0)
        dq, _ = lq.grad(q, rq, g, s, z, 0.0, ys=ys, y1=gd)
        dk, dv = lq.grad(k, ref_k, v, ds, dz, hn, want_dy=True)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------
# Causal


def _segment_plan(lead: _Launch, length: int, cfg: Config) -> tuple[int, int, int]:
    """``(chunk, seg_len, nseg)``."""
    chunk = cfg.chunk
    chunks = triton.cdiv(length, chunk)
    if cfg.seg_chunks is not None:
        per = cfg.seg_chunks
    else:
        want = max(1, -(-2 * _sms(lead.w.device) // (lead.bh * lead.mt)))
        per = max(4, triton.cdiv(chunks, want))
    per = min(per, chunks)
    seg_len = per * chunk
    return chunk, seg_len, triton.cdiv(length, seg_len)


def _seg_bounds(c: Tensor, seg_len: int, nseg: int) -> tuple[Tensor, Tensor]:
    """Prefix maxima at each segment's first and last token: ``(first, last)``, each
    ``(B, H, nseg)``."""
    length = c.shape[-1]
    first = torch.arange(nseg, device=c.device) * seg_len
    last = torch.clamp(first + seg_len, max=length) - 1
    return c[..., first], c[..., last]


def _causal_setup(lq: _Launch, q, k, keep, hn):
    rq = lq.rowmax(q, 0.0)
    rk = lq.rowmax(k, hn)
    if keep is not None:
        rk = rk.masked_fill(~keep[:, None, :], _FLOOR)
    c = torch.cummax(rk.clamp_min(_FLOOR), dim=-1).values.contiguous()
    return rq, c


def _key_weight(keep: Tensor | None) -> Tensor | None:
    """The kernels' ``KEY_WEIGHT``: ``keep: (B, L)`` bool (True = real key) as float
    1/0, or None without padding."""
    return keep.float().contiguous() if keep is not None else None


def _causal_consts(lq: _Launch, has_mask: bool, chunk: int) -> dict:
    return dict(HAS_MASK=has_mask, CH=chunk, BDV=lq.bdv, **lq.consts())


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, keep, hn, cfg):
        lq = _Launch(q, v, w, cfg)
        length = q.shape[2]
        rq, c = _causal_setup(lq, q, k, keep, hn)
        chunk, seg_len, nseg = _segment_plan(lq, length, cfg)
        first, last = _seg_bounds(c, seg_len, nseg)
        # Pass 1: each segment's key sum relative to the prefix maximum at its end.
        seg_of = torch.arange(length, device=q.device) // seg_len
        ref = last[..., seg_of]
        if keep is not None:
            ref = ref.masked_fill(~keep[:, None, :], float("inf"))
        s_seg, z_seg = lq.state(k, v, ref.contiguous(), hn, seg_len, nseg)
        # The states entering each segment (a short recurrence over segments).
        s_in = torch.zeros_like(s_seg)
        z_in = torch.zeros_like(z_seg)
        e_in = torch.full((nseg, *c.shape[:2]), _FLOOR, device=q.device, dtype=torch.float32)
        for i in range(1, nseg):
            decay = torch.exp2(e_in[i - 1] - last[..., i - 1])
            s_in[i] = s_in[i - 1] * decay[..., None, None] + s_seg[i - 1]
            z_in[i] = z_in[i - 1] * decay[..., None] + z_seg[i - 1]
            e_in[i] = last[..., i - 1]
        # Kernels index states as (bh, seg).
        s_in = s_in.permute(1, 2, 0, 3, 4).contiguous()
        z_in = z_in.permute(1, 2, 0, 3).contiguous()
        e_in = e_in.permute(1, 2, 0).contiguous()
        num = torch.zeros(*q.shape[:3], lq.dv, device=q.device, dtype=torch.float32)
        den = torch.zeros(*q.shape[:3], device=q.device, dtype=torch.float32)
        key_weight = _key_weight(keep)
        consts = _causal_consts(lq, key_weight is not None, chunk)
        grid = (lq.bh, lq.mt, nseg)
        kn.causal_fwd_kernel[grid](
            q,
            k,
            v,
            rq,
            c,
            key_weight if key_weight is not None else c,
            w,
            s_in,
            z_in,
            e_in,
            num,
            den,
            length,
            lq.m,
            lq.d,
            lq.dv,
            seg_len,
            hn,
            lq.m * lq.d,
            lq.hw,
            lq.heads,
            **consts,
        )
        out = torch.where(
            den[..., None] > 0, num / torch.where(den > 0, den, 1.0)[..., None], 0.0
        ).to(q.dtype)
        ctx.save_for_backward(q, k, v, w, key_weight, rq, c, s_in, z_in, e_in, first, out, den)
        ctx.hn, ctx.cfg, ctx.plan = hn, cfg, (chunk, seg_len, nseg)
        return out

    @staticmethod
    @first_order_only("causal favor_attention (Triton)")
    def backward(ctx, grad_out):
        q, k, v, w, key_weight, rq, c, s_in, z_in, e_in, first, out, den = ctx.saved_tensors
        hn, cfg = ctx.hn, ctx.cfg
        chunk, seg_len, nseg = ctx.plan
        lq = _Launch(q, v, w, cfg)
        length = q.shape[2]
        g = grad_out.contiguous()
        ys, gd = _grad_scales(g, out, den)
        # Pass 1 (reverse): each segment's sum of exp2(b_s - c_i) Qf_i^T [g_i, gd_i],
        # relative to b_s, the prefix maximum at the segment's first token.
        seg_of = torch.arange(length, device=q.device) // seg_len
        ref = (rq + c - first[..., seg_of]).contiguous()
        d_seg, dz_seg = lq.state(q, g, ref, 0.0, seg_len, nseg, ys=ys, y1=gd)
        d_in = torch.zeros_like(d_seg)
        dz_in = torch.zeros_like(dz_seg)
        b_in = torch.empty(nseg, *c.shape[:2], device=q.device, dtype=torch.float32)
        b_in[nseg - 1] = c[..., -1]
        for i in range(nseg - 2, -1, -1):
            decay = torch.exp2(first[..., i + 1] - b_in[i + 1])
            d_in[i] = d_seg[i + 1] + d_in[i + 1] * decay[..., None, None]
            dz_in[i] = dz_seg[i + 1] + dz_in[i + 1] * decay[..., None]
            b_in[i] = first[..., i + 1]
        d_in = d_in.permute(1, 2, 0, 3, 4).contiguous()
        dz_in = dz_in.permute(1, 2, 0, 3).contiguous()
        b_in = b_in.permute(1, 2, 0).contiguous()
        key_weight_ptr = key_weight if key_weight is not None else c
        consts = _causal_consts(lq, key_weight is not None, chunk)
        grid = (lq.bh, lq.mt, nseg)
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        kn.causal_dq_kernel[grid](
            q,
            k,
            v,
            g,
            ys,
            gd,
            rq,
            c,
            key_weight_ptr,
            w,
            s_in,
            z_in,
            e_in,
            dq,
            length,
            lq.m,
            lq.d,
            lq.dv,
            seg_len,
            hn,
            lq.m * lq.d,
            lq.hw,
            lq.heads,
            **consts,
        )
        dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        kn.causal_dkv_kernel[grid](
            q,
            k,
            v,
            g,
            ys,
            gd,
            rq,
            c,
            key_weight_ptr,
            w,
            d_in,
            dz_in,
            b_in,
            dk,
            dv,
            length,
            lq.m,
            lq.d,
            lq.dv,
            seg_len,
            hn,
            lq.m * lq.d,
            lq.hw,
            lq.heads,
            **consts,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# Under torch.compile the kernels run as an opaque call (a graph break), as
# flash-linear-attention does: dynamo does not trace the host-side launch code.
@torch.compiler.disable
def favor_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    causal: bool,
    keep: Tensor | None,
    scale: float,
    config: Config | None = None,
) -> Tensor:
    """FAVOR+ with positive features through the Triton kernels.

    Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)`` (contiguous,
    one dtype), ``w: (Hw, M, d)`` from :func:`fold_weight`, ``keep: (B, Lk)`` bool (True =
    real key) or None. Returns ``(B, H, Lq, dv)`` in q's dtype. Equivalent to
    ``favor_naive`` with the same kernel (up to rounding).
    """
    cfg = config or Config()
    hn = 0.5 * scale * _LOG2E
    fn = _Causal if causal else _Bidirectional
    return fn.apply(q, k, v, w, keep, hn, cfg)
