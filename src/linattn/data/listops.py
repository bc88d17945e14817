"""ListOps as defined by the Long Range Arena (Tay et al., 2021), generated offline.

Following LRA's ``listops.py``: a tree is a value (0-9) or, with probability 0.25 while
below ``max_depth``, an operator (``[MIN``, ``[MAX``, ``[MED``, ``[SM`` = sum mod 10)
over 2..``max_args`` sub-trees, closed by ``]``. Trees whose token count (operators,
values and ``]``) lies strictly between ``min_length`` and ``max_length`` are kept,
duplicates dropped; the label is the tree's value (10 classes). LRA's sizes: max depth
10, max 10 arguments, lengths 500-2000, 96k / 2k / 2k examples. LRA also prints
parentheses around every binary node, which its input pipeline removes again, so the
token sequences here are what LRA's models saw.

``MED`` is ``int(numpy.median)``: the mean of the two middle values, truncated, for an
even count (LRA's definition).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>", "<cls>", *OPERATORS, END, *(str(d) for d in range(10)))
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
VALUE_P = 0.25


def apply_op(op: str, args: list[int]) -> int:
    """The value of ``op`` over its arguments' values."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    if op == "[MED":
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else int((s[n // 2 - 1] + s[n // 2]) / 2)
    raise ValueError(f"unknown operator {op!r}")


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """``(tree, length)``: a value (int) or ``(op, [children])``, and its token count."""
    if depth < max_depth and rng.random() <= VALUE_P:
        children, length = [], 2
        for _ in range(rng.randint(2, max_args)):
            child, n = generate_tree(rng, depth + 1, max_depth, max_args)
            children.append(child)
            length += n
        return (rng.choice(OPERATORS), children), length
    return rng.choice(range(10)), 1


def tokens(tree) -> list[str]:
    """The token sequence of ``tree``: ``[op, *children's tokens, "]"]`` or the digit."""
    out: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, int):
            out.append(str(node))
        else:
            op, children = node
            out.append(op)
            stack.append(END)
            stack.extend(reversed(children))
    return out


def value(tree) -> int:
    """The label of ``tree`` (recursive evaluation)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    return apply_op(op, [value(c) for c in children])


def generate(
    n: int, *, seed: int = 0, min_length: int = 500, max_length: int = 2000,
    max_depth: int = 10, max_args: int = 10,
) -> list[tuple[list[str], int]]:
    """``n`` distinct examples ``(tokens, label)``, seeded."""
    if min_length >= max_length:
        raise ValueError(f"min_length={min_length} must be < max_length={max_length}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length:
            toks = tokens(tree)
            key = " ".join(toks)
            if key not in seen:
                seen.add(key)
                out.append((toks, value(tree)))
    return out


def cache_dir() -> Path:
    """``$LINATTN_CACHE`` or ``~/.cache/linattn``."""
    return Path(os.environ.get("LINATTN_CACHE", Path.home() / ".cache" / "linattn"))


def splits(
    *, train: int = 96_000, val: int = 2_000, test: int = 2_000, seed: int = 0,
    min_length: int = 500, max_length: int = 2000, max_depth: int = 10, max_args: int = 10,
    cache: bool = True, progress: bool = False,
) -> dict[str, list[tuple[list[str], int]]]:
    """LRA's train/val/test splits (disjoint: drawn together, without duplicates), cached
    as JSON lines under :func:`cache_dir` keyed by every setting."""
    spec = {"train": train, "val": val, "test": test, "seed": seed, "min_length": min_length,
            "max_length": max_length, "max_depth": max_depth, "max_args": max_args}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"listops-{key}.jsonl"
    if cache and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        data = [(r["tokens"].split(), r["label"]) for r in rows]
    else:
        data = generate(train + val + test, seed=seed, min_length=min_length,
                        max_length=max_length, max_depth=max_depth, max_args=max_args)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"tokens": " ".join(t), "label": y}) + "\n"
                                   for t, y in data))
            tmp.replace(path)
    return {"train": data[:train], "val": data[train:train + val],
            "test": data[train + val:]}


def encode(toks: list[str]) -> list[int]:
    """Token ids with a leading ``<cls>``."""
    return [TOKEN_ID["<cls>"], *(TOKEN_ID[t] for t in toks)]
