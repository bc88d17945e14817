"""Prefill CPU seconds of the converted SmolLM2 (untrained hedgehog m=64, window 64, one
sink) at each context length: the parallel form without a cache, a plain forward (which
returns a lazy FavorCache), and forward(use_cache=True) (a FavorCache prefill: the
parallel form and the state built from the keys; before the one-token step change it was
the recurrent form, folding the prompt into the state as it went). Last-token logits only; one JSON line per length.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src python docs/results/hf_cache/prefill.py 1024 8192
"""

import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from linattn.experiments import load_pretrained  # noqa: E402
from linattn.integrations.hf import convert  # noqa: E402

#: CPU time of this process: the machine is shared.
clock = time.process_time

RUNS = (
    ("parallel, no cache", {"use_cache": False}),
    ("plain forward (lazy FavorCache)", {}),
    ("use_cache=True (FavorCache prefill)", {"use_cache": True}),
    ("parallel, no cache again", {"use_cache": False}),
)


def main():
    model, _ = load_pretrained("smollm2")
    convert(model, "favor", kernel="hedgehog", num_features=64, window=64, sinks=1)
    for length in [int(a) for a in sys.argv[1:]] or [1024]:
        ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
        row = {"context": length}
        with torch.inference_mode():
            for name, kw in RUNS:
                start = clock()
                model(ids, logits_to_keep=1, **kw)
                row[name] = round(clock() - start, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
