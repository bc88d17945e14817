"""The CPU grouping at training sizes (L = 1024, batch 16, 8 heads, m = 256), one thread:

    OMP_NUM_THREADS=1 python docs/bench/window/groups_ab_1024.py > docs/bench/window/groups_ab_1024.txt

6 interleaved rounds, the first dropped, medians; forward+backward; each line: causal?, then
per case the median and its ratio to pure FAVOR+ ("nosplit": one call over all pairs).
"""

import time

import torch

from linattn import draw_projection
from linattn.functional import favor_attention
from linattn.ops.favor import window as win

B, H, d, m, L = 16, 8, 64, 256, 1024
W = draw_projection(m, d)


def run(w, causal):
    q = torch.randn(B, H, L, d, requires_grad=True)
    k = torch.randn(B, H, L, d, requires_grad=True)
    v = torch.randn(B, H, L, d, requires_grad=True)
    favor_attention(q, k, v, W, window=w, causal=causal).sum().backward()


for causal in (False, True):
    cases = [
        ("pure", None, 24 << 20),
        ("nosplit", 64, 1 << 40),
        ("8MB", 64, 8 << 20),
        ("24MB", 64, 24 << 20),
    ]
    t = {c[0]: [] for c in cases}
    for rep in range(6):
        for n, w, b in cases:
            win.CPU_GROUP_BYTES = b
            s = time.perf_counter()
            run(w, causal)
            dt = time.perf_counter() - s
            if rep:
                t[n].append(dt)
    base = sorted(t["pure"])[2]
    print(
        causal,
        {n: f"{sorted(v)[2]:.3f}s {sorted(v)[2] / base:.2f}x" for n, v in t.items()},
        flush=True,
    )
