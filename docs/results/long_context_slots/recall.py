"""Long-range recall of SmolLM2-135M zero-shot with its attention replaced: exact (SDPA),
window-only, the window hybrid (favor_attention) and the slot hybrid (ops/favor/slots.py).

Run from the repository root (2-core CPU, shared; one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src python \
        docs/results/long_context_slots/recall.py --examples 8 \
        --columns exact,window-only,hybrid,slots0-i64,error-16,error-64,mass-16,mass-64 \
        --out docs/results/long_context_slots/recall.jsonl
    # the same prompts (same seed), more columns, each in its own process
    for col in error-256 random-256; do
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src python \
        docs/results/long_context_slots/recall.py --examples 8 --columns $col \
        --out docs/results/long_context_slots/recall.jsonl; done
    PYTHONPATH=$PWD/src python docs/results/long_context_slots/recall.py \
        --table docs/results/long_context_slots/recall.jsonl

Tasks (teacher-forced; score = top-1 accuracy of the answer's digit tokens, chance 0.1):
* passkey: a 5-digit pass key stated in filler text, asked at the end; one sequence per
  distance (answer position minus the position of the key's last digit).
* kv: ~150 lines "The code of the <color> <animal> is <4 digits>.", then four lines of
  the same form for four of the pairs, chosen so that the answer lies 128, 512, 1024 and
  2048 tokens (nearest line) after the pair's own value; one sequence serves every
  distance.
Attention columns: every layer and head gets the same attention; the linear part uses
positive softmax random features (kernel "softmax", m = 64, one orthogonal projection
per layer drawn with a seeded generator, shared by the heads), no training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F

import linattn
from linattn.features import get_feature_map
from linattn.ops.favor import slots as slots_mod
from linattn.ops.favor.slots import favor_slots

READ_ERROR = slots_mod._read_error

WINDOW, SINKS, M = 64, 1, 64
DISTANCES = (128, 512, 1024, 2048)
COLUMNS = {
    "exact": dict(kind="exact"),
    "window-only": dict(kind="window"),
    "hybrid": dict(kind="hybrid"),
    "slots0-i64": dict(kind="slots", slots=0, rule="error"),
    "error-16": dict(kind="slots", slots=16, rule="error"),
    "error-64": dict(kind="slots", slots=64, rule="error"),
    "mass-16": dict(kind="slots", slots=16, rule="mass"),
    "mass-64": dict(kind="slots", slots=64, rule="mass"),
    "error-256": dict(kind="slots", slots=256, rule="error"),
    # control: the error rule's scores replaced by uniform random numbers (seeded)
    "random-256": dict(kind="slots", slots=256, rule="error", random=True),
}
GEN = torch.Generator().manual_seed(0)


def random_scores(keys, values, kv, fm, params):
    """Stands in for ``slots._read_error`` in the "random" columns: ``(B, H, n)``."""
    return torch.rand(keys.shape[:3], generator=GEN, dtype=keys.dtype)


MODE: dict = {}
PROJ: dict[int, torch.Tensor] = {}


def projection(layer: int, d: int) -> torch.Tensor:
    if layer not in PROJ:
        g = torch.Generator().manual_seed(1000 + layer)
        PROJ[layer] = linattn.draw_projection(M, d, generator=g)
    return PROJ[layer]


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """AttentionInterface function: ``query (B, H, L, d)``, ``key/value (B, H_kv, L, d)``;
    no padding (batch 1), causal."""
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, 1)
    v = value.repeat_interleave(rep, 1)
    length = query.shape[2]
    kind = MODE["kind"]
    if kind == "exact":
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    elif kind == "window":
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        near = (j <= i) & ((j > i - WINDOW) | (j < SINKS))
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=near, scale=scaling)
    elif kind == "hybrid":
        w = projection(module.layer_idx, query.shape[-1])
        out = linattn.favor_attention(
            query, k, v, w, kernel="softmax", causal=True, window=WINDOW, sinks=SINKS,
            scale=scaling,
        )  # fmt: skip
    else:
        w = projection(module.layer_idx, query.shape[-1])
        fm = get_feature_map("softmax")
        params = fm.prepare(w, query, k, None, scaling)
        slots_mod._read_error = random_scores if MODE.get("random") else READ_ERROR
        out = favor_slots(
            query, k, v, fm, params, window=WINDOW, slots=MODE["slots"], sinks=SINKS,
            interval=WINDOW, rule=MODE["rule"],
        )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
COLORS = (
    "red blue green black white brown pink gray gold silver orange purple yellow violet "
    "amber ivory olive coral navy teal"
).split()
ANIMALS = (
    "fox cat dog owl bear wolf frog duck goat lion mouse horse sheep tiger eagle snake "
    "whale crab deer hawk"
).split()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def passkey_example(tok, distance: int, rng: random.Random):
    """``(ids, [(distance, [answer positions], [answer ids])])``."""
    key = str(rng.randint(10000, 99999))
    head = ids(tok, PREFIX) + ids(tok, FILLER) * rng.randint(1, 3)
    needle = ids(tok, f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    question = ids(tok, "\nWhat is the pass key? The pass key is")
    answer = ids(tok, " " + key)  # [' ', d, d, d, d, d]
    digits = answer[1:]
    # the key's last digit in the needle: its second statement starts at the digits
    last = len(head) + needle.index(digits[0], len(needle) // 2) + len(digits) - 1
    first_answer = len(head) + len(needle) + len(question) + 1  # after ' '
    gap = distance - (first_answer - last)
    filler = (ids(tok, FILLER) * (gap // 20 + 2))[: max(0, gap)]
    seq = head + needle + filler + question + answer
    pos = [len(seq) - len(digits) + t for t in range(len(digits))]
    return seq, [(pos[0] - last, pos, digits)]


def kv_example(tok, rng: random.Random):
    names = [f"{c} {a}" for c in COLORS for a in ANIMALS]
    rng.shuffle(names)
    longest = max(DISTANCES)
    seq = ids(tok, "Here is a list of codes. Remember them; you will be asked.\n")
    lines = []  # (name, code, position of the code's last digit)
    n = 0
    while len(seq) < longest + 40:
        name, code = names[n], str(rng.randint(1000, 9999))
        n += 1
        line = ids(tok, f"The code of the {name} is {code}.\n")
        # [..., ' ', d, d, d, d, '.', '\n']
        lines.append((name, code, len(seq) + len(line) - 3))
        seq += line
    seq += ids(tok, "Answers:\n")
    # each query line is about as long as a context line; find the targets in order of
    # decreasing distance, each the line nearest to its distance from its own answer
    queries, used = [], set()
    for d in sorted(DISTANCES, reverse=True):
        qpos = len(seq)  # roughly; refined below
        best = min(
            (t for t in range(len(lines)) if t not in used),
            key=lambda t: abs(qpos + 10 - lines[t][2] - d),
        )
        used.add(best)
        name, code, last = lines[best]
        qline = ids(tok, f"The code of the {name} is")
        ans = ids(tok, " " + code)
        start = len(seq) + len(qline) + 1
        seq += qline + ans + ids(tok, ".\n")
        pos = list(range(start, start + len(ans) - 1))
        queries.append((pos[0] - last, pos, ans[1:]))
    return seq, queries


def score(model, seq, queries, keep: int):
    x = torch.tensor([seq])
    with torch.no_grad():
        logits = model(x, logits_to_keep=keep).logits[0]  # [keep, V]
    offset = len(seq) - keep
    out = []
    for dist, pos, target in queries:
        pred = [int(logits[p - 1 - offset].argmax()) for p in pos]
        out.append((dist, sum(int(a == b) for a, b in zip(pred, target)) / len(target)))
    return out


def run(args):
    from transformers import AttentionInterface

    from linattn.experiments.pretrained import load_pretrained

    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2")
    AttentionInterface.register("slots_eval", attention)
    model.set_attn_implementation("slots_eval")
    cols = args.columns.split(",") if args.columns else list(COLUMNS)
    rng = random.Random(args.seed)
    with open(args.out, "a") as fh:
        for ex in range(args.examples):
            tasks = [("kv", *kv_example(tok, rng))]
            for d in DISTANCES:
                tasks.append(("passkey", *passkey_example(tok, d, rng)))
            for task, seq, queries in tasks:
                keep = len(seq) - min(p for _, pos, _ in queries for p in pos) + 2
                for col in cols:
                    MODE.clear()
                    MODE.update(COLUMNS[col])
                    t0 = time.perf_counter()
                    res = score(model, seq, queries, keep)
                    dt = time.perf_counter() - t0
                    for dist, acc in res:
                        rec = dict(
                            example=ex, task=task, column=col, length=len(seq),
                            distance=dist, acc=acc, seconds=round(dt, 2),
                        )  # fmt: skip
                        fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    print(task, ex, col, len(seq), [round(a, 2) for _, a in res],
                          f"{dt:.1f}s", file=sys.stderr, flush=True)  # fmt: skip


def bucket(dist: int) -> int:
    return min(DISTANCES, key=lambda d: abs(math.log(dist / d)))


def table(path: str) -> str:
    recs = [json.loads(line) for line in open(path)]
    cols = [c for c in COLUMNS if any(r["column"] == c for r in recs)]
    # only prompts that every column has scored (a run stopped early leaves a partial one)
    done: dict[tuple, set] = {}
    for r in recs:
        done.setdefault((r["example"], r["task"], r["length"]), set()).add(r["column"])
    recs = [r for r in recs if done[(r["example"], r["task"], r["length"])] == set(cols)]
    lines = []
    for task in ("passkey", "kv"):
        rows = [r for r in recs if r["task"] == task]
        if not rows:
            continue
        lines.append(f"\n{task} (top-1 accuracy of the answer digits; chance 0.100)\n")
        lines.append("| distance | n | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 2) + "|")
        for d in DISTANCES:
            cells, n = [], 0
            for c in cols:
                acc = [r["acc"] for r in rows if r["column"] == c and bucket(r["distance"]) == d]
                n = max(n, len(acc))
                cells.append(f"{sum(acc) / len(acc):.3f}" if acc else "-")
            dists = [r["distance"] for r in rows if bucket(r["distance"]) == d]
            lo, hi = (min(dists), max(dists)) if dists else (d, d)
            lines.append(f"| {d} ({lo}-{hi}) | {n} | " + " | ".join(cells) + " |")
    secs = {}
    for r in recs:
        secs.setdefault((r["column"], r["length"], r["example"], r["task"]), r["seconds"])
    lines.append("\nmean seconds per forward (all lengths):")
    for c in cols:
        s = [v for k, v in secs.items() if k[0] == c]
        lines.append(f"- {c}: {sum(s) / len(s):.1f} s over {len(s)} forwards")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--columns", default="")
    ap.add_argument("--out", default="docs/results/long_context_slots/recall.jsonl")
    ap.add_argument("--table", default=None)
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
    else:
        run(a)
