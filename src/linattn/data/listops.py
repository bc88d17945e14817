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

LRA draws whole trees and throws away those out of range: at lengths 500-511 (the
training default, ``seq_len=512``) it keeps about 1 tree in 1000, over an hour for 100k
examples in Python. :func:`generate` draws from the same conditional distribution
directly, from the exact size distributions of the sub-trees (:func:`size_tables`),
vectorized over batches of trees: no tree is thrown away. :func:`generate_reference` is
LRA's rejection sampler, kept as the reference the tests compare it with.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from torch import Tensor

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


def generate_reference(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
) -> list[tuple[list[str], int]]:
    """``n`` distinct examples by LRA's own method: draw whole trees with
    :func:`generate_tree` and keep those whose length is in range (slow: at LRA's
    lengths about 1 tree in 1000 is kept). The plain reference for :func:`generate`."""
    _check(min_length, max_length, max_depth, max_args)
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


def _check(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    if min_length >= max_length:
        raise ValueError(f"min_length={min_length} must be < max_length={max_length}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    if max_args < 2:
        raise ValueError(
            f"max_args must be >= 2 (an operator has 2..max_args arguments), got {max_args}"
        )


def size_tables(max_size: int, max_depth: int, max_args: int) -> tuple[Tensor, Tensor]:
    """Exact size distributions of LRA's random trees, float64.

    ``f[t, s]``: probability that a sub-tree rooted at depth ``t`` (1..max_depth) has
    ``s`` tokens (0..max_size); ``g[t, j, s]``: probability that ``j`` independent such
    sub-trees have ``s`` tokens together (``g[t, 0] = [1, 0, ...]``). Shapes
    ``(max_depth + 2, max_size + 1)`` and ``(max_depth + 2, max_args + 1, max_size + 1)``;
    row ``max_depth + 1`` is unused (zeros)."""
    size = max_size + 1
    f = torch.zeros(max_depth + 2, size, dtype=torch.float64)
    g = torch.zeros(max_depth + 2, max_args + 1, size, dtype=torch.float64)
    for t in range(max_depth, 0, -1):
        if t < max_depth:
            op = g[t + 1, 2:].sum(0) * (VALUE_P / (max_args - 1))
            f[t, 2:] = op[: size - 2]
            f[t, 1] = 1 - VALUE_P
        else:
            f[t, 1] = 1.0
        g[t, 0, 0] = 1.0
        # Direct convolutions (no FFT), as products with the Toeplitz matrix
        # toeplitz[s, x] = f[t, s - x]: impossible sizes stay exactly 0.
        h = torch.nn.functional.pad(f[t], (size, 0)).flip(0).contiguous()
        toeplitz = h.as_strided((size, size), (1, 1)).flip(0)
        for j in range(1, max_args + 1):
            g[t, j] = toeplitz @ g[t, j - 1]
    return f, g


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Row-wise inverse CDF: the smallest ``i`` with ``cumsum(w)[i] > u * sum(w)``;
    ``weights (n, w)`` non-negative with positive row sums, ``u (n,)`` in [0, 1)."""
    cdf = weights.cumsum(1)
    cdf = cdf / cdf[:, -1:]  # the last entry is exactly 1 > u
    return (cdf <= u[:, None]).sum(1)


_BLOCK = 32


def split_tables(f: Tensor, g: Tensor) -> Tensor:
    """Block sums for :func:`_split_sizes`, for one depth's ``f (S,)`` and ``g (J, S)``:
    ``c[j, r, b] = sum_{x < 32 (b + 1)} f[x] g[j - 1, r - x]`` (cumulative over the
    blocks ``b`` of 32 sizes), shape ``(J, S, ceil(S / 32))`` (rows ``j < 2`` unused); ``c[j, r, -1] = g[j, r]``
    up to rounding."""
    size, nb = f.shape[0], -(-f.shape[0] // _BLOCK)
    width = nb * _BLOCK
    out = torch.zeros(g.shape[0], size, nb, dtype=g.dtype)
    fx = torch.nn.functional.pad(f, (0, width - size))
    for j in range(2, g.shape[0]):  # _split_sizes draws for j >= 2 sub-trees
        # h[size - 1 - r + x] = g[j - 1, r - x] (0 for r < x): row r is a window of h.
        h = torch.nn.functional.pad(g[j - 1], (width, 0)).flip(0).contiguous()
        rows = h.as_strided((size, width), (1, 1)).flip(0)
        w = fx * rows
        out[j] = w.view(size, nb, _BLOCK).sum(-1).cumsum(-1)
    return out


def _split_sizes(f: Tensor, g: Tensor, c: Tensor, j: Tensor, r: Tensor, u: Tensor) -> Tensor:
    """The first of ``j`` sub-trees' sizes given that together they have ``r`` tokens:
    ``x ~ f[x] g[j - 1, r - x] / g[j, r]``. ``f (S,)``, ``g (J, S)``, ``c``
    (:func:`split_tables`); ``j, r, u (n,)``."""
    out = torch.ones_like(r)
    # Most first sub-trees are single values: settle x = 1 without building a row.
    rest = (u >= f[1] * g[j - 1, r - 1] / g[j, r]).nonzero().view(-1)
    if rest.numel() == 0:
        return out
    j, r, u = j[rest], r[rest], u[rest]
    rows = c[j, r]  # (n, blocks), cumulative
    target = u * rows[:, -1]
    b = (rows <= target[:, None]).sum(1).clamp_max(rows.shape[1] - 1)
    before = torch.where(b > 0, rows.gather(1, (b - 1).clamp_min(0)[:, None]).view(-1), 0.0)
    x = b[:, None] * _BLOCK + torch.arange(_BLOCK)
    size = f.shape[0]
    rem = r[:, None] - x
    ok = (rem >= 0) & (x < size)
    w = f[x.clamp_max(size - 1)] * g[j[:, None] - 1, rem.clamp(0, size - 1)] * ok
    cum = w.cumsum(1)
    i = (cum <= (target - before)[:, None]).sum(1)
    # Rounding may step past the block's last positive weight: take that one.
    last = _BLOCK - 1 - (w > 0).flip(1).to(torch.int8).argmax(1)
    out[rest] = b * _BLOCK + torch.minimum(i, last)
    return out


def _sample_trees(
    n: int,
    gen: torch.Generator,
    f: Tensor,
    g: Tensor,
    c: list,
    min_length: int,
    max_length: int,
    max_depth: int,
    max_args: int,
):
    """``n`` trees drawn exactly from LRA's distribution conditioned on the length.

    Top-down, one depth at a time: the root's length from ``f[1]`` restricted to
    ``(min_length, max_length)``; a node of ``s > 1`` tokens is an operator whose number
    of arguments ``k`` is drawn with probability ``~ g[t + 1, k, s - 2]``, and whose
    arguments' lengths are drawn one after the other given what remains. Returns
    ``(ids, offsets, labels)``: the token ids of all trees in order (uint8),
    ``offsets (n + 1,)`` and ``labels (n,)``."""
    lengths = torch.arange(f.shape[1])
    w = f[1] * ((lengths > min_length) & (lengths < max_length))
    if not w.sum() > 0:
        raise ValueError(
            f"no tree of max_depth={max_depth}, max_args={max_args} has "
            f"between {min_length} and {max_length} tokens (exclusive)"
        )
    size = _inverse_cdf(w.expand(n, -1), torch.rand(n, generator=gen, dtype=torch.float64))
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = size.cumsum(0)
    pos = offsets[:-1].clone()
    levels = []  # per depth: (size, pos, parent index into the previous level)
    parent = torch.arange(n)
    for t in range(1, max_depth + 1):
        levels.append((size, pos, parent))
        ops = (size > 1).nonzero().view(-1)
        if t == max_depth or ops.numel() == 0:
            break
        s, p = size[ops], pos[ops]
        # Number of arguments: P(k | s) ~ g[t + 1, k, s - 2], k = 2..max_args.
        wk = g[t + 1, 2:, :].T[s - 2]
        k = _inverse_cdf(wk, torch.rand(len(ops), generator=gen, dtype=torch.float64)) + 2
        child_size = torch.zeros(len(ops), max_args, dtype=torch.long)
        remaining = s - 2
        for i in range(max_args - 1):
            active = (k - i >= 2).nonzero().view(-1)
            if active.numel() == 0:
                break
            x = _split_sizes(
                f[t + 1],
                g[t + 1],
                c[t + 1],
                k[active] - i,
                remaining[active],
                torch.rand(len(active), generator=gen, dtype=torch.float64),
            )
            child_size[active, i] = x
            remaining[active] -= x
        child_size[torch.arange(len(ops)), k - 1] = remaining
        # Children in order, each parent's contiguous; preorder positions.
        mask = torch.arange(max_args) < k[:, None]
        csize = child_size[mask]
        before = (child_size.cumsum(1) - child_size)[mask]
        parent = ops.repeat_interleave(k)
        pos = p.repeat_interleave(k) + 1 + before
        size = csize
    # Values bottom-up; tokens scattered to their preorder positions.
    ids = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    child_value = None
    for depth in range(len(levels), 0, -1):
        size, pos, parent = levels[depth - 1]
        nodes = len(size)
        leaf = size == 1
        val = torch.empty(nodes, dtype=torch.long)
        nleaf = int(leaf.sum())
        val[leaf] = torch.randint(0, 10, (nleaf,), generator=gen)
        op = torch.randint(0, len(OPERATORS), (nodes,), generator=gen)
        if child_value is not None:
            cval, cparent = child_value
            # Per operator node: a histogram of its arguments' values.
            inner = ~leaf
            rank = inner.cumsum(0) - 1
            hist = torch.zeros(nodes - nleaf, 10, dtype=torch.long)
            hist.index_put_((rank[cparent], cval), torch.ones_like(cval), accumulate=True)
            count = hist.sum(1, keepdim=True)
            cum = hist.cumsum(1)
            vmin = (cum == 0).sum(1)  # first value present
            vmax = (cum < count).sum(1)  # last value present
            vsum = (hist * torch.arange(10)).sum(1) % 10
            hi = (cum <= count // 2).sum(1)  # s[n // 2]
            lo = (cum <= (count - 1) // 2).sum(1)  # s[(n - 1) // 2]
            vmed = torch.where(count.view(-1) % 2 == 1, hi, (lo + hi) // 2)
            val[inner] = (
                torch.stack([vmin, vmax, vmed, vsum], 1).gather(1, op[inner][:, None]).view(-1)
            )
        ids[pos[leaf]] = (val[leaf] + _DIGIT0).to(torch.uint8)
        ids[pos[~leaf]] = (op[~leaf] + _OP0).to(torch.uint8)
        ids[(pos + size - 1)[~leaf]] = TOKEN_ID[END]
        child_value = (val, parent)
    labels = child_value[0]
    return ids, offsets, labels


def generate_ids(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`generate` as tensors: ``(ids, offsets, labels)``, token ids (``VOCAB``,
    no ``<cls>``) of example ``i`` in ``ids[offsets[i]:offsets[i + 1]]`` (uint8)."""
    _check(min_length, max_length, max_depth, max_args)
    f, g = size_tables(max_length - 1, max_depth, max_args)
    threads = torch.get_num_threads()
    try:
        # Many small gathers: one thread is faster (and far faster on a loaded machine).
        torch.set_num_threads(1)
        return _generate_ids(n, seed, f, g, min_length, max_length, max_depth, max_args, progress)
    finally:
        torch.set_num_threads(threads)


def _generate_ids(n, seed, f, g, min_length, max_length, max_depth, max_args, progress):
    c = [None, None] + [split_tables(f[t], g[t]) for t in range(2, max_depth + 1)]
    gen = torch.Generator().manual_seed(seed)
    chunks, labels, seen, count = [], [], set(), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="ListOps", unit="ex")
    batch = min(_BATCH, n)  # the output depends on the arguments only
    while count < n:
        ids, off, lab = _sample_trees(
            batch, gen, f, g, c, min_length, max_length, max_depth, max_args
        )
        keep = []
        for i in range(batch):
            key = ids[off[i] : off[i + 1]].numpy().tobytes()
            if key not in seen:
                seen.add(key)
                keep.append(i)
                if count + len(keep) == n:
                    break
        keep_t = torch.tensor(keep, dtype=torch.long)
        parts = [ids[off[i] : off[i + 1]] for i in keep]
        chunks += parts
        labels.append(lab[keep_t])
        count += len(keep)
        if bar is not None:
            bar.update(len(keep))
    if bar is not None:
        bar.close()
    lengths = torch.tensor([len(c) for c in chunks], dtype=torch.long)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    return torch.cat(chunks), offsets, torch.cat(labels)


_BATCH = 4096
_OP0 = TOKEN_ID[OPERATORS[0]]
_DIGIT0 = TOKEN_ID["0"]


def _to_examples(ids: Tensor, offsets: Tensor, labels: Tensor):
    words = [VOCAB[i] for i in range(len(VOCAB))]
    flat = ids.tolist()
    bounds = offsets.tolist()
    return [
        ([words[i] for i in flat[bounds[e] : bounds[e + 1]]], y)
        for e, y in enumerate(labels.tolist())
    ]


def generate(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    progress: bool = False,
) -> list[tuple[list[str], int]]:
    """``n`` distinct examples ``(tokens, label)``, seeded.

    Drawn from exactly the distribution of LRA's rejection sampler
    (:func:`generate_reference`, LRA's trees conditioned on ``min_length < length <
    max_length``) but directly: the exact size distributions (:func:`size_tables`) let
    every tree be drawn in range, vectorized over a batch of trees (on one core, about
    6 000 examples of 500-510 tokens per second of CPU time; at LRA's 500-2000 tokens,
    4 096 examples took 4.4 s with the tables)."""
    # locals(): exactly the arguments, before any assignment (one signature, one list).
    return _to_examples(*generate_ids(**locals()))


def cache_dir() -> Path:
    """``$LINATTN_CACHE`` or ``~/.cache/linattn``."""
    return Path(os.environ.get("LINATTN_CACHE", Path.home() / ".cache" / "linattn"))


def encoded_splits(**kwargs) -> dict[str, list[tuple[list[int], int]]]:
    """:func:`splits` (same arguments) as ``(encode(tokens), label)``: token ids with a
    leading ``<cls>``, built straight from the cached ids (no token strings)."""
    # splits' signature: its defaults, and its TypeError for an unknown argument.
    settings = inspect.signature(splits).bind(**kwargs)
    settings.apply_defaults()
    ids, offsets, labels = _cached_ids(**settings.arguments)
    flat, bounds, cls = ids.tolist(), offsets.tolist(), TOKEN_ID["<cls>"]
    data = [([cls, *flat[bounds[e] : bounds[e + 1]]], y) for e, y in enumerate(labels.tolist())]
    return _split(data, settings.arguments["train"], settings.arguments["val"])


def _split(data: list, train: int, val: int) -> dict[str, list]:
    return {"train": data[:train], "val": data[train : train + val], "test": data[train + val :]}


def splits(
    *,
    train: int = 96_000,
    val: int = 2_000,
    test: int = 2_000,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    cache: bool = True,
    progress: bool = True,
) -> dict[str, list[tuple[list[str], int]]]:
    """LRA's train/val/test splits (disjoint: drawn together, without duplicates), cached
    under :func:`cache_dir` keyed by every setting (a ``torch.save`` of the token ids,
    written to a temporary file and renamed, so concurrent ranks never read half a
    file). ``progress``: a tqdm bar while generating."""
    # locals(): exactly the arguments, before any assignment (one signature, one list).
    ids, offsets, labels = _cached_ids(**locals())
    return _split(_to_examples(ids, offsets, labels), train, val)


def _cached_ids(
    *, train: int, val: int, test: int, cache: bool, progress: bool, **tree
) -> tuple[Tensor, Tensor, Tensor]:
    """The ids of :func:`splits` (its arguments, all given; ``tree``: those of
    :func:`generate_ids`), from the cache or generated and cached."""
    spec = {"train": train, "val": val, "test": test, **tree, "generator": 2}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"listops-{key}.pt"
    if cache and path.exists():
        saved = torch.load(path, weights_only=True)
        ids, offsets, labels = saved["ids"], saved["offsets"], saved["labels"]
    else:
        ids, offsets, labels = generate_ids(train + val + test, progress=progress, **tree)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save({"ids": ids, "offsets": offsets, "labels": labels}, fh)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return ids, offsets, labels


def encode(toks: list[str]) -> list[int]:
    """Token ids with a leading ``<cls>``."""
    return [TOKEN_ID["<cls>"], *(TOKEN_ID[t] for t in toks)]
