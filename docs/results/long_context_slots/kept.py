"""Which keys do the slot rules keep? SmolLM2-135M on passkey prompts (recall.py's
task), the slot hybrid (softmax features m = 64, window 64, 1 sink, interval 64): after
the whole prompt, the share of (layer, head) caches holding at least one token of the
needle's second statement ("{key} is the pass key"), and the mean number of its digit
tokens kept per cache.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src python \
        docs/results/long_context_slots/kept.py > docs/results/long_context_slots/kept.txt
"""

from __future__ import annotations

import random
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import recall

from linattn.features import get_feature_map
from linattn.ops.favor.slots import favor_slots_step

KEPT: dict[int, torch.Tensor] = {}


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, 1)
    v = value.repeat_interleave(rep, 1)
    w = recall.projection(module.layer_idx, query.shape[-1])
    fm = get_feature_map("softmax")
    params = fm.prepare(w, query, k, None, scaling)
    out, st = favor_slots_step(
        query, k, v, fm, params, None, window=recall.WINDOW, slots=recall.MODE["slots"],
        sinks=recall.SINKS, interval=recall.WINDOW, rule=recall.MODE["rule"],
    )  # fmt: skip
    KEPT[module.layer_idx] = st.cache_pos[0]  # [H, G]
    return out.transpose(1, 2).contiguous(), None


def main():
    from transformers import AttentionInterface

    from linattn.experiments.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2")
    AttentionInterface.register("slots_kept", attention)
    model.set_attn_implementation("slots_kept")
    rng = random.Random(0)
    print(
        "distance rule slots | caches with a needle token | mean needle digits kept | "
        "uniform random choice: digits kept"
    )
    for d in (512, 2048):
        seq, queries = recall.passkey_example(tok, d, rng)
        dist, pos, digits = queries[0]
        last = pos[0] - dist  # position of the needle's last digit
        needle = set(range(last - len(digits) + 1, last + 6))  # digits + " is the pass key"
        digit_pos = set(range(last - len(digits) + 1, last + 1))
        for rule in ("error", "mass"):
            for slots in (16, 64):
                recall.MODE.clear()
                recall.MODE.update(rule=rule, slots=slots)
                KEPT.clear()
                with torch.no_grad():
                    model(torch.tensor([seq[: pos[0]]]), logits_to_keep=1)
                hit, nd, n = 0, 0, 0
                for cp in KEPT.values():
                    for row in cp.tolist():
                        n += 1
                        hit += bool(needle & set(row))
                        nd += len(digit_pos & set(row))
                # decisions before queries s + w - 1 + t I <= L - 1 (t >= 1), I keys each
                first = recall.SINKS + recall.WINDOW - 1
                decided = (pos[0] - 1 - first) // recall.WINDOW * recall.WINDOW
                rand = len(digits) * min(1.0, slots / decided)
                print(
                    f"{dist} {rule} {slots} | {hit / n:.3f} | {nd / n:.3f} | {rand:.3f}", flush=True
                )


if __name__ == "__main__":
    main()
