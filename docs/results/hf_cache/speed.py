"""Decoding speed of SmolLM2-135M converted (untrained: hedgehog m=64, window 64, one sink,
the decoder recipe's attention) against the exact model (SDPA), in one process, one
thread (CPU seconds of the process, not wall time): prefill seconds, decode ms/token through generate() (FavorCache) and through a
hand-written forward(use_cache=True) loop, and cache bytes, at each context length.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python docs/results/hf_cache/speed.py 1024 8192
    # generate() only (no hand-written loop): the long contexts in fewer minutes
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python docs/results/hf_cache/speed.py --generate-only 16384
    # ... and the converted model alone (the exact one's prefill at 32k takes many minutes)
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python docs/results/hf_cache/speed.py --generate-only --converted-only 32768

Prints one JSON line per (model, context). Speed only: the untrained conversion's tokens
are noise, and past 8,192 tokens SmolLM2 is beyond its trained context.
"""

import copy
import json
import os
import sys
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from linattn.experiments import load_pretrained  # noqa: E402
from linattn.integrations.hf import FavorCache, convert  # noqa: E402

NEW = 8


#: CPU time of this process (one thread): the machine is shared, and wall-clock time
#: counts the other processes' turns too.
clock = time.process_time


class Stamps(LogitsProcessor):
    """Records the time at which generate() scores each new token."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(clock())
        return scores


def cache_bytes(cache):
    if isinstance(cache, FavorCache):
        return cache.state_bytes()
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def measure(model, ids, loop=True):
    with torch.inference_mode():
        stamps = Stamps()
        start = clock()
        res = model.generate(
            ids,
            max_new_tokens=NEW + 1,
            min_new_tokens=NEW + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamps]),
            return_dict_in_generate=True,
        )
        ttft = stamps.times[0] - start
        gen_ms = (stamps.times[-1] - stamps.times[0]) / NEW * 1e3
        if not loop:
            return {
                "generate_first_token_s": round(ttft, 3),
                "generate_ms_per_token": round(gen_ms, 1),
                "cache_mb": round(cache_bytes(res.cache) / 2**20, 2),
                "generate_cache": type(res.cache).__name__,
            }
        start = clock()
        out = model(ids, use_cache=True)
        prefill = clock() - start
        cache = out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        start = clock()
        for _ in range(NEW):
            out = model(nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        loop_ms = (clock() - start) / NEW * 1e3
    return {
        "generate_first_token_s": round(ttft, 3),
        "generate_ms_per_token": round(gen_ms, 1),
        "forward_prefill_s": round(prefill, 3),
        "loop_ms_per_token": round(loop_ms, 1),
        "cache": type(cache).__name__,
        "cache_mb": round(cache_bytes(cache) / 2**20, 2),
        "generate_cache": type(res.cache).__name__,
    }


def main():
    args = sys.argv[1:]
    loop = "--generate-only" not in args
    names = ("converted",) if "--converted-only" in args else ("exact", "converted")
    lengths = [int(a) for a in args if not a.startswith("--")] or [1024]
    exact, _ = load_pretrained("smollm2")
    converted = convert(
        copy.deepcopy(exact), "favor", kernel="hedgehog", num_features=64, window=64, sinks=1
    )
    for length in lengths:
        ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
        for name, model in (("exact", exact), ("converted", converted)):
            if name not in names:
                continue
            row = {"model": name, "context": length, "threads": 1, **measure(model, ids, loop)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
