"""Side-by-side A/B of the window hybrid's CPU grouping (CPU_GROUP_BYTES), one thread:

    OMP_NUM_THREADS=1 python docs/bench/window/groups_ab.py > docs/bench/window/groups_ab.txt

Every case of one (L, causal) timed interleaved, 5 rounds, the first dropped, medians;
"w64@1048576MB" is one call over all heads (no grouping), the others group under that
budget; at L = 16384 every budget gives one head per call. Batch 1, 8 heads, d = 64,
m = 256, softmax kernel, float32, forward+backward.
"""

import time

import torch

from linattn import draw_projection
from linattn.functional import favor_attention
from linattn.ops.favor import window as win

torch.manual_seed(0)
B, H, d, m = 1, 8, 64, 256
W = draw_projection(m, d)


def run(L, window, causal):
    q = torch.randn(B, H, L, d, requires_grad=True)
    k = torch.randn(B, H, L, d, requires_grad=True)
    v = torch.randn(B, H, L, d, requires_grad=True)
    favor_attention(q, k, v, W, window=window, causal=causal).sum().backward()


res = {}
for L in (4096, 16384):
    for causal in (False, True):
        cases = [("pure", None, 0)] + [
            (f"w64@{b >> 20}MB", 64, b) for b in (1 << 40, 8 << 20, 16 << 20, 24 << 20, 32 << 20)
        ]
        times = {c[0]: [] for c in cases}
        for rep in range(5):
            for name, w, b in cases:
                win.CPU_GROUP_BYTES = b or (24 << 20)
                t = time.perf_counter()
                run(L, w, causal)
                dt = time.perf_counter() - t
                if rep:
                    times[name].append(dt)
        base = sorted(times["pure"])[len(times["pure"]) // 2]
        for name in times:
            med = sorted(times[name])[len(times[name]) // 2]
            print(
                L,
                "causal" if causal else "bidir",
                name,
                f"{med:.3f}s",
                f"{med / base:.2f}x",
                flush=True,
            )
