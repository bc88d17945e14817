"""The Triton FAVOR+ kernels against the float64 oracle (outputs and gradients).

Without a GPU they run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, small
sizes, small tiles); with one, on the GPU, plus the full-size tests marked ``cuda``.
Skipped when triton is not installed (``pip install linattn[triton]``).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must be set before triton compiles (decorates) the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed (extra [triton])")

import linattn  # noqa: E402
from conftest import naive, projection, randn  # noqa: E402
from linattn.ops.favor import triton as ftriton  # noqa: E402
from linattn.ops.favor.triton import _ops  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# The interpreter evaluates both sides of tl.where: exp2 of rows past the end may overflow
# there (the results are discarded).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
# Small tiles so that the small sizes still cross tiles, chunks, segments and splits.
SMALL = _ops.Config(block_l=16, block_m=16, chunk=16, seg_chunks=1, splits=2)
# Relative L2 error allowed against the float64 oracle, per input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _rel(a, b):
    return ((a.detach().double().cpu() - b).norm() / b.norm()).item()


def _oracle(q, k, v, w, kernel, causal, mask):
    """float64 naive attention and its gradients for ``sum(out * g)``."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if w.dim() == 3:  # one projection per head
        out = torch.cat(
            [
                naive(
                    *(t[:, h : h + 1] for t in leaves),
                    w[h],
                    kernel=kernel,
                    causal=causal,
                    mask=mask,
                )
                for h in range(w.shape[0])
            ],
            dim=1,
        )
    else:
        out = naive(*leaves, w, kernel=kernel, causal=causal, mask=mask)
    g = randn(*out.shape, seed=7)
    return out.detach(), torch.autograd.grad(out, leaves, g), g


def _padding(bsz, length, seed=0):
    # Batch 0 padded at the end, batch 1 at the start (left padding), the rest unpadded.
    mask = torch.zeros(bsz, length, dtype=torch.bool)
    mask[0, -(length // 4) :] = True
    if bsz > 1:
        mask[1, : length // 5] = True
    return mask


def _check(
    kernel,
    causal,
    padded,
    dtype,
    *,
    b=2,
    h=2,
    lq=40,
    lk=None,
    d=16,
    dv=16,
    m=16,
    per_head=False,
    cfg=SMALL,
):
    lk = lq if lk is None else lk
    q = randn(b, h, lq, d, seed=1)
    k = randn(b, h, lk, d, seed=2)
    v = randn(b, h, lk, dv, seed=3)
    w = (
        torch.stack([projection(m, d, seed=10 + i) for i in range(h)])
        if per_head
        else projection(m, d)
    )
    mask = _padding(b, lk) if padded else None
    ref, ref_grads, g = _oracle(q, k, v, w, kernel, causal, mask)
    ins = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    scale = d**-0.5
    wf = _ops.fold_weight(w.to(DEVICE), kernel, scale, h)
    keep = None if mask is None else (~mask).to(DEVICE)
    out = _ops.favor_triton(*ins, wf, causal=causal, keep=keep, scale=scale, config=cfg)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out, ins, g.to(DEVICE, dtype))
    tol = TOL[dtype]
    assert _rel(out, ref) < tol, "output"
    for name, got, want in zip("qkv", grads, ref_grads):
        assert _rel(got, want) < 2 * tol, f"d{name}"


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "padded"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_matches_oracle_fp32(causal, kernel, padded):
    _check(kernel, causal, padded, torch.float32)


@pytest.mark.parametrize(
    "dtype,causal,padded",
    [
        (torch.bfloat16, False, True),
        (torch.bfloat16, True, True),
        (torch.float16, False, False),
        (torch.float16, True, True),
    ],
    ids=["bf16-bidir", "bf16-causal", "fp16-bidir", "fp16-causal"],
)
def test_matches_oracle_half(dtype, causal, padded):
    _check("softmax", causal, padded, dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_odd_sizes_per_head_projection(causal):
    # Lengths, head dims and feature counts that are not tile multiples; several causal
    # segments of two chunks; cross-attention lengths when bidirectional.
    cfg = _ops.Config(block_l=16, block_m=16, chunk=16, seg_chunks=2, splits=3)
    _check(
        "softmax_hyp",
        causal,
        True,
        torch.float32,
        lq=53,
        lk=53 if causal else 37,
        d=24,
        dv=20,
        m=12,
        per_head=True,
        cfg=cfg,
    )


def test_d32_m32_default_tiles():
    _check(
        "softmax",
        True,
        True,
        torch.float32,
        lq=64,
        d=32,
        dv=32,
        m=32,
        cfg=_ops.Config(block_l=32, block_m=32, chunk=32),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_large_logits_need_the_stabilizers(causal):
    # |k~|^2 / 2 ~ 128: exp(-128) underflows float32, so without the stabilizers every
    # weight would be 0 and the outputs 0/0.
    b, h, length, d = 2, 2, 40, 16
    q, k, v = (randn(b, h, length, d, seed=s) for s in range(3))
    q, k = 8 * q, 8 * k
    w = projection(16, d)
    mask = _padding(b, length)
    ref, _, _ = _oracle(q, k, v, w, "softmax", causal, mask)
    wf = _ops.fold_weight(w.to(DEVICE), "softmax", d**-0.5, h)
    out = _ops.favor_triton(
        *(t.to(DEVICE, torch.float32) for t in (q, k, v)),
        wf,
        causal=causal,
        keep=(~mask).to(DEVICE),
        scale=d**-0.5,
        config=SMALL,
    )
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-4


def test_causal_never_looks_ahead():
    # Long keys have feature logits near -|k~|^2 / 2 ~ -130; a key with k~ = w_0 has
    # |w_0|^2 / 2 ~ +8, the largest a positive feature can reach. Put that key at position
    # 30: every earlier output must stay as it was (a sequence-wide stabilizer would
    # underflow all their weights to 0 in float32).
    q, k, v = (randn(1, 2, 48, 16, seed=s, dtype=torch.float32).to(DEVICE) for s in range(3))
    q, k = 8 * q, 8 * k
    w = projection(16, 16, dtype=torch.float32).to(DEVICE)
    wf = _ops.fold_weight(w, "softmax", 0.25, 2)
    cfg = _ops.Config(block_l=16, block_m=16, chunk=16, seg_chunks=1)
    before = _ops.favor_triton(q, k, v, wf, causal=True, keep=None, scale=0.25, config=cfg)
    assert torch.isfinite(before).all() and before.abs().amax() > 0
    k2 = k.clone()
    k2[:, :, 30] = w[0] / 0.25**0.5
    after = _ops.favor_triton(q, k2, v, wf, causal=True, keep=None, scale=0.25, config=cfg)
    torch.testing.assert_close(after[:, :, :30], before[:, :, :30], rtol=1e-6, atol=1e-7)
    assert torch.isfinite(after).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fully_padded_rows_are_zero(causal):
    q, k, v = (randn(2, 1, 20, 16, seed=s, dtype=torch.float32).to(DEVICE) for s in range(3))
    w = projection(16, 16, dtype=torch.float32).to(DEVICE)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True  # batch 1 sees no key at all
    mask[0, :6] = True  # causal: the first 6 queries of batch 0 see no key
    with ftriton.interpret_on_cpu():
        out = linattn.favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask.to(DEVICE))
    eager = _eager(q, k, v, w, causal=causal, key_padding_mask=mask.to(DEVICE))
    assert (out[1] == 0).all()
    if causal:
        assert (out[0, :, :6] == 0).all()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def _eager(*args, **kwargs):
    old = os.environ.get("LINATTN_TRITON")
    os.environ["LINATTN_TRITON"] = "0"
    try:
        return linattn.favor_attention(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["LINATTN_TRITON"]
        else:
            os.environ["LINATTN_TRITON"] = old


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = _ops.favor_triton

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(_ops, "favor_triton", spy)


def _inputs(dtype=torch.float32):
    q, k, v = (randn(1, 2, 24, 16, seed=s, dtype=dtype).to(DEVICE) for s in range(3))
    return q, k, v, projection(16, 16, dtype=dtype).to(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_favor_attention_dispatches(monkeypatch, causal):
    spy = _Spy(monkeypatch)
    q, k, v, w = _inputs()
    with ftriton.interpret_on_cpu():
        out = linattn.favor_attention(q, k, v, w, kernel="softmax_hyp", causal=causal)
    assert spy.calls == 1
    torch.testing.assert_close(
        out, _eager(q, k, v, w, kernel="softmax_hyp", causal=causal), rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(CUDA, reason="checks the CPU selection rule")
def test_never_selected_on_cpu_without_the_flag(monkeypatch):
    spy = _Spy(monkeypatch)
    linattn.favor_attention(*_inputs(), causal=True)
    assert spy.calls == 0


@pytest.mark.parametrize(
    "case",
    [
        "env-eager",
        "kernel-relu",
        "float64",
        "projection-grad",
        "window",
        "rank3",
        "too-many-features",
    ],
)
def test_falls_back_to_eager(monkeypatch, case):
    spy = _Spy(monkeypatch)
    q, k, v, w = _inputs(torch.float64 if case == "float64" else torch.float32)
    kwargs = {}
    if case == "env-eager":
        monkeypatch.setenv("LINATTN_TRITON", "eager")
    if case == "kernel-relu":
        kwargs["kernel"] = "relu"
    if case == "projection-grad":
        w.requires_grad_()
    if case == "rank3":
        q, k, v = q[0], k[0], v[0]
    if case == "too-many-features":
        w = projection(300, 16, dtype=torch.float32).to(DEVICE)
        kwargs["kernel"] = "softmax_hyp"
    with ftriton.interpret_on_cpu():
        if case == "window":
            # An argument the kernels do not know (the window hybrid) is never dropped.
            assert ftriton.maybe_favor_triton(q=q, k=k, v=v, projection=w, window=4) is None
        else:
            linattn.favor_attention(q, k, v, w, **kwargs)
    assert spy.calls == 0


# ---------------------------------------------------------------------------------------
# Full size on a GPU.


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(
    "d,m",
    [(32, 128), (64, 128), (128, 128), (128, 256)],
    ids=["d32-m128", "d64-m128", "d128-m128", "d128-m256"],
)
def test_full_size_cuda(d, m, causal, kernel, dtype):
    # Default tiles; up to 512 features (hyperbolic map, m = 256); odd length.
    _check(kernel, causal, True, dtype, b=2, h=4, lq=1000, d=d, dv=d, m=m, cfg=_ops.Config())
