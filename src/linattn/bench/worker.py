"""One benchmark case in a fresh process: ``python -m linattn.bench.worker '<json>'``.

Prints one JSON line: median seconds over the repeats and the peak resident memory the
case added over its inputs: the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` after the inputs exist, then read after the first call, before
any timing loop, so every case starts from the same allocator state.

``python -m linattn.bench.worker --serve '<json>'`` does the same first call, prints
``{"ready": ..., "peak_added_bytes": ...}`` and then times one call per ``time`` line on
its standard input (``{"t": seconds}``), until ``quit`` (``{"done": ...}``). The parent
(:func:`linattn.bench.speed.run_cases`) keeps one such process per compared case and
sends the ``time`` lines round-robin, so a passing load hits every case alike.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_now() -> int:
    try:
        return _status_bytes("VmRSS")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(case: dict):
    """Return a callable running the case once (forward, or forward+backward)."""
    import linattn

    torch.manual_seed(0)
    dtype = getattr(torch, case.get("dtype", "float32"))
    b, h, length, d = case["batch"], case["heads"], case["length"], case["head_dim"]
    grad = case["pass"] == "fwd+bwd"
    scale_qk = case.get("qk_scale", 1.0)
    q, k, v = (
        (torch.randn(b, h, length, d, dtype=dtype) * (scale_qk if i < 2 else 1.0)).requires_grad_(
            grad
        )
        for i in range(3)
    )
    method, causal = case["method"], case.get("causal", False)
    if method == "exact":

        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif method == "favor":
        w = linattn.draw_projection(
            case["num_features"], d, generator=torch.Generator().manual_seed(0), dtype=dtype
        )
        kernel = case.get("kernel", "softmax")

        def fn():
            return linattn.favor_attention(
                q, k, v, w, kernel=kernel, causal=causal, window=case.get("window")
            )
    elif method in ("packed", "padded"):
        # linattn bench --suite pack: case["seq_lengths"] back to back in one row with
        # cu_seqlens (q: (1, H, T, d)), or as a batch padded to the longest (q: (N, H,
        # L_max, d)) with key_padding_mask.
        w = linattn.draw_projection(
            case["num_features"], d, generator=torch.Generator().manual_seed(0), dtype=dtype
        )
        lengths = torch.tensor(case["seq_lengths"])
        packing = {}
        if method == "packed":
            packing["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
        else:
            packing["key_padding_mask"] = torch.arange(length) >= lengths[:, None]

        def fn():
            return linattn.favor_attention(
                q, k, v, w, causal=causal, window=case.get("window"), **packing
            )
    elif method == "materialized":
        # The Linformer paper's baseline: softmax(Q K^T / sqrt(d)) V with the L x L matrix.
        def fn():
            return torch.softmax(q @ k.transpose(-2, -1) * d**-0.5, dim=-1) @ v
    elif method == "linformer":
        proj = (
            torch.randn(
                case["proj_dim"], length, dtype=dtype, generator=torch.Generator().manual_seed(0)
            )
            / case["proj_dim"] ** 0.5
        )

        def fn():
            return linattn.linformer_attention(q, k, v, proj)
    elif method == "performer_pytorch":
        from performer_pytorch import FastAttention

        torch.manual_seed(0)
        attn = FastAttention(d, nb_features=case["num_features"], causal=causal)

        def fn():
            return attn(q, k, v)
    elif method in ("linformer_pkg", "linformer_module"):
        # Whole self-attention layers (both include their q/k/v/out projections).
        x = torch.randn(b, length, h * d, dtype=dtype, requires_grad=grad)
        q, k, v = x, x, x  # what run() clears gradients of
        if method == "linformer_pkg":
            from linformer import LinformerSelfAttention

            layer = LinformerSelfAttention(h * d, length, k=case["proj_dim"], heads=h)

            def fn():
                return layer(x)
        else:
            # The linformer package shares one E and one F across heads: "headwise".
            layer = linattn.LinformerAttention(
                h * d,
                h,
                max_seq_len=length,
                proj_dim=case["proj_dim"],
                sharing="headwise",
                batch_first=True,
            )

            def fn():
                return layer(x)[0]
    else:
        raise ValueError(f"unknown method {method!r}")

    def run():
        out = fn()
        if grad:
            out.sum().backward()
            for t in (q, k, v):
                t.grad = None
        return out

    return run


# q, k ~ N(0, 0.35^2) in d = 64 gives |q~|^2 = |q|^2 / 8 ~ 1, the regime where random
# features estimate softmax attention. At unit variance |q~ + k~|^2 ~ 16 and one positive
# feature has relative variance ~e^16: no unbiased implementation is accurate there.
ERROR_QK_SCALE = 0.35


def relative_error(case: dict) -> float:
    """``mean((out - exact)^2) / mean(exact^2)`` on normalized inputs (after timing)."""
    case = {**case, "qk_scale": ERROR_QK_SCALE}
    torch.manual_seed(0)
    run = build(case)
    with torch.no_grad():
        out = run()
    exact_case = {**case, "method": "exact"}
    with torch.no_grad():
        ref = build(exact_case)()
    return ((out.double() - ref.double()).square().mean() / ref.double().square().mean()).item()


def _timed(run) -> float:
    """Seconds one call of ``run`` takes."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _prepare(case: dict):
    """Build ``case`` on its thread count and make the first call (warm-up, and the peak
    memory it adds): ``(run, grad, first_s, peak_added_bytes, peak_exact)``."""
    torch.set_num_threads(case.get("threads") or torch.get_num_threads())
    run = build(case)
    grad = case["pass"] == "fwd+bwd"
    with torch.set_grad_enabled(grad):
        base = _rss_now()
        exact_peak = _reset_peak()
        first = _timed(run)
        peak = _rss_peak() - base
    return run, grad, first, peak, exact_peak


def _error_fields(case: dict) -> dict:
    """``{"rel_error_vs_exact": ...}`` where the case asks for it (forward only)."""
    if case.get("error_vs_exact") and case["pass"] == "fwd":
        return {"rel_error_vs_exact": relative_error(case)}
    return {}


def measure(case: dict) -> dict:
    run, grad, first, peak, exact_peak = _prepare(case)
    times = []
    budget = case.get("budget_s", 20.0)
    with torch.set_grad_enabled(grad):
        for _ in range(case.get("repeats", 5)):
            if sum(times) + first > budget and len(times) >= 1:
                break
            times.append(_timed(run))
    return {
        **case,
        **_error_fields(case),
        "median_s": statistics.median(times) if times else first,
        "times_s": times,
        "peak_added_bytes": peak,
        "peak_exact": exact_peak,
    }


def serve(case: dict) -> None:
    """The ``--serve`` protocol (see the module docstring)."""
    global _PROTOCOL
    _PROTOCOL, sys.stdout = sys.stdout, sys.stderr  # what a library prints stays out
    run, grad, first, peak, exact_peak = _prepare(case)
    _say({"ready": True, "first_s": first, "peak_added_bytes": peak, "peak_exact": exact_peak})
    for line in sys.stdin:
        if line.strip() != "time":
            break
        with torch.set_grad_enabled(grad):
            _say({"t": _timed(run)})
    _say({"done": True, **_error_fields(case)})


_PROTOCOL = sys.stdout


def _say(obj: dict) -> None:
    _PROTOCOL.write(json.dumps(obj) + "\n")
    _PROTOCOL.flush()


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        _say(measure(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
