"""Speed of the converted SmolLM2 with 512 exact slots (error rule), beside the same model
without slots and the exact model at 1,024 tokens; decoding and prefill at 1k/8k/32k.
Run: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 PYTHONPATH=src python docs/results/long_context/smollm2_speed_slots/run.py OUT"""
import json
import sys

import torch

from linattn.experiments.long_context import _load
from linattn.experiments.long_context.speed import speed
from linattn.integrations.hf import set_slots

out = sys.argv[1]
teacher, student, tok, _ = _load("smollm2", None, {}, "cpu")
rows = speed({"exact": teacher, "hybrid": student}, (1024,), repeats=3, new_tokens=16)
set_slots(student, 512)
rows += [
    {**r, "model": "hybrid+slots512"}
    for r in speed({"hybrid": student}, (1024, 8192, 32768), repeats=1, new_tokens=16)
]
with open(out, "w") as f:
    json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
for r in rows:
    print(r["length"], r["model"], r["kind"], {k: r.get(k) for k in ("median_s", "first_token_s", "ms_per_token", "cache_bytes")})
