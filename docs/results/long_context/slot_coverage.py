"""Where are a copied list's tokens when the answer starts? The 2k-trained SmolLM2
checkpoint of long_context.md with 1,024 slots and far decay T = 256: each copy
example at 4,096 tokens (the seed-1 draw, 6 lists, and the main draw's 2) is prefilled
up to its answer through a FavorCache; then, per layer and head, the share of the list's
tokens held in the slots. Prints one line per example (mean, heads holding all / none,
the mean per layer) and writes the shares as JSON.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONPATH=$PWD/src python \
        docs/results/long_context/slot_coverage.py CHECKPOINT RULE OUT.json
"""

from __future__ import annotations

import json
import sys

import torch

from linattn.experiments.long_context.tasks import make_examples
from linattn.experiments.pretrained import load_pretrained
from linattn.integrations.hf import FavorCache, load_converted, set_far_decay, set_slots


def main(checkpoint: str, rule: str, out: str) -> None:
    _, tok = load_pretrained("smollm2")
    model = load_converted(checkpoint).eval()
    set_slots(model, 1024, rule=rule)
    set_far_decay(model, 256.0)
    examples = make_examples(tok, "copy", (4096,), 6, seed=1)
    examples += make_examples(tok, "copy", (4096,), 2, seed=0)
    shares = []
    for n, ex in enumerate(examples):
        cache = FavorCache(model)
        with torch.no_grad():
            model(torch.tensor([ex.input_ids[: ex.answer_start]]), cache=cache, use_cache=True)
        source = torch.arange(ex.source_start, ex.source_start + ex.answer_len)
        # [layers, heads]: the share of the list's tokens among each head's slots
        held = torch.stack(
            [
                torch.isin(source, layer.state.cache_pos[0, h]).double().mean()
                for layer in cache.layers
                for h in range(layer.state.cache_pos.shape[1])
            ]
        ).reshape(len(cache.layers), -1)
        print(
            n,
            f"mean {held.mean():.3f}",
            f"heads holding all {int((held == 1).sum())} / none {int((held == 0).sum())}"
            f" of {held.numel()}",
            "by layer",
            [round(x, 2) for x in held.mean(1).tolist()],
            flush=True,
        )
        shares.append(held.tolist())
    with open(out, "w") as f:
        json.dump({"rule": rule, "checkpoint": checkpoint, "shares": shares}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
