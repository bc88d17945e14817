"""CPU milliseconds of one converted attention layer's decoding call, alone:
``favor_recurrent`` with SmolLM2-135M's shapes (9 heads, head_dim 64) and the decoder
recipe's attention (hedgehog m = 64, window 64, one sink), after a prompt of the given
length, one thread, CPU seconds of the process. Random inputs: speed only.

    OMP_NUM_THREADS=1 PYTHONPATH=src python docs/results/hf_cache/step.py 4096
"""

import json
import sys
import time

import torch

from linattn.functional import favor_recurrent

torch.set_num_threads(1)
HEADS, D, M, WINDOW, STEPS = 9, 64, 64, 64, 300


def main():
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(HEADS, M, D, generator=g) * 0.1
    factor = torch.full((HEADS,), 3.0).exp()
    kw = dict(kernel="hedgehog", window=WINDOW, sinks=1, linear_factor=factor)
    x = torch.randn(1, HEADS, context, D, generator=g)
    q = torch.randn(1, HEADS, 1, D, generator=g)
    with torch.no_grad():
        _, state = favor_recurrent(x, x, x, proj, **kw)
        for _ in range(20):
            _, state = favor_recurrent(q, q, q, proj, state=state, **kw)
        start = time.process_time()
        for _ in range(STEPS):
            _, state = favor_recurrent(q, q, q, proj, state=state, **kw)
        ms = (time.process_time() - start) / STEPS * 1e3
    print(json.dumps({"context": context, "ms_per_layer_call": round(ms, 3)}))


if __name__ == "__main__":
    main()
