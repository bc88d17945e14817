"""``linattn bench --suite gpu``: the fused Triton FAVOR+ kernels on a CUDA GPU.

Against ``scaled_dot_product_attention`` restricted to the FlashAttention backend, the
eager PyTorch FAVOR+ path (``LINATTN_TRITON=0``) and, when installed, flash-linear-
attention's ``chunk_linear_attn`` (causal only) fed the same positive features,
precomputed outside the timed region (the favourable setting for the peer: the fusion is
what is measured). bfloat16 inputs; time is the median of CUDA-event timings after a
warm-up, peak memory is ``torch.cuda.max_memory_allocated`` over the inputs, TFLOP/s use
the FLOP model in :func:`flops`, and the share of peak is against a bf16 matmul measured
in the same run. Writes ``OUT/gpu.json``, ``gpu.csv``, ``gpu.png``. Needs a CUDA device
and triton; refuses otherwise.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
import statistics
from pathlib import Path

import torch

from .._plotting import finish, log_axes, pyplot
from .results import write_results

PRESETS = {
    # The headline configuration, short of 128k.
    "quick": {
        "batches": [1],
        "head_dims": [128],
        "features": [256],
        "lengths": [4096, 8192, 16384, 32768],
        "repeats": 10,
    },
    # The whole grid.
    "full": {
        "batches": [1, 8],
        "head_dims": [64, 128],
        "features": [128, 256],
        "lengths": [4096, 8192, 16384, 32768, 65536, 131072],
        "repeats": 10,
    },
}
METHODS = ("flash", "triton", "eager", "fla")
HEADS = 16
CHUNK = 64

_CSV_FIELDS = [
    "method",
    "causal",
    "pass",
    "batch",
    "heads",
    "length",
    "head_dim",
    "num_features",
    "median_ms",
    "peak_bytes",
    "tflops",
    "pct_peak",
    "speedup_vs_flash",
    "speedup_vs_fla",
    "speedup_vs_eager",
    "error",
]


class GpuBenchError(RuntimeError):
    """The GPU suite cannot run here (no CUDA device, or no triton)."""


def check_environment() -> None:
    """Raise :class:`GpuBenchError` naming what is missing."""
    if not torch.cuda.is_available():
        raise GpuBenchError(
            "linattn bench --suite gpu needs a CUDA GPU, and torch.cuda.is_available() is "
            f"False here (torch {torch.__version__}); run it on a machine with one"
        )
    if importlib.util.find_spec("triton") is None:
        raise GpuBenchError("linattn bench --suite gpu needs triton: pip install 'linattn[triton]'")


def flops(
    method: str, causal: bool, pas: str, b: int, h: int, length: int, d: int, m: int
) -> float:
    """FLOP model (matmul FLOPs only; the backward counted as 2.5x the forward, as
    FlashAttention reports it).

    Exact: ``4 L^2 d`` per head, half when causal. FAVOR+ (``M`` features, ``m`` or
    ``2m``; here the positive map, ``M = m``): feature logits ``2 L d M`` for queries and
    for keys, state and output ``2 L M d`` each, i.e. ``8 L M d``; causal adds the
    intra-chunk products ``2 L C (M + d)`` (full chunks, ``C = 64``). The fla peer
    gets its features precomputed: its count leaves out the ``4 L d M`` of the logits.
    """
    heads = b * h
    if method == "flash":
        fwd = 4.0 * length * length * d * heads / (2 if causal else 1)
    else:
        fwd = 8.0 * length * m * d * heads
        if method == "fla":
            fwd -= 4.0 * length * d * m * heads
        if causal:
            fwd += 2.0 * length * CHUNK * (m + d) * heads
    return fwd if pas == "fwd" else 3.5 * fwd


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    """bf16 TFLOP/s of an ``n x n`` matmul on this GPU (median), the ceiling used."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2.0 * n**3 / _median_seconds(lambda: a @ b, repeats) / 1e12


def _median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _callable(method: str, causal: bool, pas: str, q, k, v, w):
    import linattn
    from linattn.features import get_feature_map

    grad = pas == "fwd+bwd"
    leaves = [q, k, v]
    if method == "fla":
        from fla.ops.linear_attn import chunk_linear_attn

        fm = get_feature_map("softmax")
        params = fm.prepare(w, q, k, None, q.shape[-1] ** -0.5)
        with torch.no_grad():
            # Stabilized positive features (per-row max for queries, global for keys),
            # in [B, T, H, M] layout.
            fq, _ = fm.stabilized(q.float(), params, is_query=True)
            fk, rk = fm.stabilized(k.float(), params, is_query=False)
            fk = fk * torch.exp(rk - rk.amax(-1, keepdim=True)).unsqueeze(-1)
        leaves = [
            t.to(q.dtype).transpose(1, 2).contiguous().requires_grad_(grad) for t in (fq, fk, v)
        ]

        def run():
            out = chunk_linear_attn(
                q=leaves[0], k=leaves[1], v=leaves[2], scale=1.0, normalize=True
            )[0]
            return out
    elif method == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif method == "triton":
        from linattn.ops.favor.triton import maybe_favor_triton

        def run():
            # Called directly so that a call the kernels do not cover fails loudly here
            # instead of timing the eager path under the kernels' name.
            out = maybe_favor_triton(q=q, k=k, v=v, projection=w, causal=causal)
            if out is None:
                raise RuntimeError("the Triton path does not cover this case")
            return out
    else:

        def run():
            old = os.environ.get("LINATTN_TRITON")
            os.environ["LINATTN_TRITON"] = "0"
            try:
                return linattn.favor_attention(q, k, v, w, causal=causal)
            finally:
                if old is None:
                    os.environ.pop("LINATTN_TRITON", None)
                else:
                    os.environ["LINATTN_TRITON"] = old

    if not grad:

        def fwd():
            with torch.no_grad():
                run()

        return fwd, leaves
    g = torch.randn_like(v if method != "fla" else leaves[2])

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        run().backward(g)

    return fwd_bwd, leaves


def run_case(case: dict) -> dict:
    """Time one case in this process; errors (OOM included) become ``"error"``."""
    b, h, length, d, m = (
        case[key] for key in ("batch", "heads", "length", "head_dim", "num_features")
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = case["pass"] == "fwd+bwd"
    try:
        q, k, v = (
            torch.randn(
                b, h, length, d, device="cuda", dtype=torch.bfloat16, generator=gen
            ).requires_grad_(grad)
            for _ in range(3)
        )
        import linattn

        w = linattn.draw_projection(m, d, generator=gen, device="cuda")
        fn, _ = _callable(case["method"], case["causal"], case["pass"], q, k, v, w)
        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        seconds = _median_seconds(fn, case["repeats"], warmup=1)
    except torch.cuda.OutOfMemoryError:
        return {**case, "error": "out of memory"}
    except (RuntimeError, ValueError, ImportError) as exc:
        return {**case, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    fl = flops(case["method"], case["causal"], case["pass"], b, h, length, d, m)
    return {
        **case,
        "median_ms": 1e3 * seconds,
        "peak_bytes": int(peak),
        "tflops": fl / seconds / 1e12,
    }


def cases(
    preset: str, *, lengths=None, passes=("fwd", "fwd+bwd"), repeats=None, methods=METHODS
) -> list[dict]:
    """The grid of one preset (``lengths``/``repeats`` override it)."""
    conf = PRESETS[preset]
    out = []
    grid = itertools.product(
        conf["batches"], conf["head_dims"], lengths or conf["lengths"], (False, True), passes
    )
    for b, d, length, causal, pas in grid:
        for method in methods:
            if method == "fla" and not causal:
                continue  # chunk_linear_attn is causal only
            feats = [conf["features"][-1]] if method == "flash" else conf["features"]
            for m in feats:
                out.append(
                    {
                        "method": method,
                        "causal": causal,
                        "pass": pas,
                        "batch": b,
                        "heads": HEADS,
                        "length": length,
                        "head_dim": d,
                        "num_features": m,
                        "dtype": "bfloat16",
                        "repeats": repeats or conf["repeats"],
                    }
                )
    return out


def _add_ratios(rows: list[dict]) -> None:
    def key(r, method, m=None):
        return (
            method,
            r["causal"],
            r["pass"],
            r["batch"],
            r["length"],
            r["head_dim"],
            r["num_features"] if m is None else m,
        )

    index = {key(r, r["method"]): r for r in rows if "median_ms" in r}
    flash_m = {
        (r["causal"], r["pass"], r["batch"], r["length"], r["head_dim"]): r
        for r in rows
        if r["method"] == "flash" and "median_ms" in r
    }
    for r in rows:
        if r["method"] != "triton" or "median_ms" not in r:
            continue
        fl = flash_m.get((r["causal"], r["pass"], r["batch"], r["length"], r["head_dim"]))
        if fl is not None:
            r["speedup_vs_flash"] = fl["median_ms"] / r["median_ms"]
        for other, field in (("fla", "speedup_vs_fla"), ("eager", "speedup_vs_eager")):
            ref = index.get(key(r, other))
            if ref is not None:
                r[field] = ref["median_ms"] / r["median_ms"]


def run(
    out_dir: str | Path,
    *,
    preset: str = "quick",
    lengths=None,
    passes=("fwd", "fwd+bwd"),
    repeats=None,
    progress: bool = True,
) -> dict:
    """Run the GPU suite and write ``gpu.json``/``gpu.csv``/``gpu.png`` into ``out_dir``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    check_environment()
    from tqdm import tqdm

    methods = [m for m in METHODS if m != "fla" or importlib.util.find_spec("fla") is not None]
    todo = cases(preset, lengths=lengths, passes=passes, repeats=repeats, methods=methods)
    peak = matmul_tflops()
    rows = []
    for case in tqdm(todo, desc="gpu bench", disable=not progress, unit="case"):
        res = run_case(case)
        if "tflops" in res:
            res["pct_peak"] = 100.0 * res["tflops"] / peak
        rows.append(res)
    _add_ratios(rows)
    props = torch.cuda.get_device_properties(0)
    result = {
        "machine": {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "fla": _version("fla-core") or _version("flash-linear-attention"),
        },
        "matmul_bf16_tflops": peak,
        "fla_installed": "fla" in methods,
        "results": rows,
    }
    out = Path(out_dir)
    write_results(out, "gpu", result, _CSV_FIELDS)
    plot(result, out / "gpu.png")
    return result


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def format_table(result: dict) -> str:
    """Plain-text table: ms, MB, TFLOP/s, % of the measured bf16 matmul, speed-ups."""
    m = result["machine"]
    lines = [
        f"{m['gpu']} ({m['sms']} SMs), torch {m['torch']}, triton {m['triton']}, "
        f"fla {m['fla'] or 'not installed'}; bf16 matmul "
        f"{result['matmul_bf16_tflops']:.0f} TFLOP/s",
        f"{'pass':8} {'dir':6} {'B':>2} {'d':>4} {'m':>4} {'L':>7} {'method':7} "
        f"{'ms':>9} {'MB':>8} {'TFLOP/s':>8} {'%pk':>4} {'xflash':>7} {'xfla':>6}",
    ]
    for r in result["results"]:
        head = (
            f"{r['pass']:8} {'causal' if r['causal'] else 'bidir':6} {r['batch']:>2} "
            f"{r['head_dim']:>4} {r['num_features']:>4} {r['length']:>7} "
            f"{r['method']:7}"
        )
        if "median_ms" not in r:
            lines.append(f"{head} failed: {r.get('error')}")
            continue
        xf = f"{r['speedup_vs_flash']:.1f}x" if "speedup_vs_flash" in r else ""
        xl = f"{r['speedup_vs_fla']:.2f}x" if "speedup_vs_fla" in r else ""
        lines.append(
            f"{head} {r['median_ms']:>9.2f} {r['peak_bytes'] / 2**20:>8.0f} "
            f"{r['tflops']:>8.1f} {r.get('pct_peak', 0):>4.0f} {xf:>7} {xl:>6}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Time and peak memory against length for the largest head_dim/features at batch 1
    (one column per direction and pass)."""
    plt = pyplot()
    rows = [r for r in result["results"] if "median_ms" in r]
    if not rows:
        return
    b = min(r["batch"] for r in rows)
    d = max(r["head_dim"] for r in rows)
    m = max(r["num_features"] for r in rows)
    rows = [r for r in rows if r["batch"] == b and r["head_dim"] == d and r["num_features"] == m]
    panels = [(c, p) for c in (False, True) for p in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), squeeze=False)
    colors = {"flash": "C0", "triton": "C3", "eager": "C1", "fla": "C2"}
    for col, (causal, pas) in enumerate(panels):
        for row, (field, scale, unit) in enumerate(
            (("median_ms", 1.0, "time (ms)"), ("peak_bytes", 2**-20, "peak MB"))
        ):
            ax = axes[row][col]
            for method, color in colors.items():
                pts = sorted(
                    (r["length"], r[field] * scale)
                    for r in rows
                    if r["method"] == method and r["causal"] == causal and r["pass"] == pas
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", color=color, label=method)
            log_axes(
                ax,
                xlabel="L (tokens)",
                ylabel=unit,
                title=f"{'causal' if causal else 'bidirectional'}, {pas}",
            )
            if ax.get_lines():
                ax.legend(fontsize=8)
    finish(
        fig,
        path,
        dpi=100,
        fontsize=11,
        title=f"{result['machine']['gpu']}: bf16, batch {b}, {HEADS} heads, head_dim {d}, m = {m}",
    )
