"""ListOps generator: LRA's definition, checked by an independent stack evaluator."""

import collections
import math
import statistics

import pytest
import torch

from linattn.data import listops


def stack_eval(toks: list[str]) -> int:
    """Evaluate a token sequence left to right with an explicit stack (not the tree)."""
    stack: list = []
    for t in toks:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            if op == "[MIN":
                v = min(args)
            elif op == "[MAX":
                v = max(args)
            elif op == "[SM":
                v = sum(args) % 10
            else:
                v = int(statistics.median(args))
            if stack:
                stack[-1].append(v)
            else:
                stack.append(v)
        else:
            if stack and isinstance(stack[-1], list):
                stack[-1].append(int(t))
            else:
                stack.append(int(t))
    assert len(stack) == 1 and isinstance(stack[0], int)
    return stack[0]


def test_labels_match_an_independent_evaluator_and_lengths_are_in_range():
    data = listops.generate(300, seed=1)
    for toks, label in data:
        assert stack_eval(toks) == label
        assert 500 < len(toks) < 2000
        assert toks[0] in listops.OPERATORS and toks[-1] == listops.END
    assert len({" ".join(t) for t, _ in data}) == 300  # no duplicates
    assert len({y for _, y in data}) == 10


def test_structure_respects_depth_and_arity():
    data = listops.generate(50, seed=2, min_length=20, max_length=400, max_depth=4, max_args=3)
    for toks, _ in data:
        depth = max_depth = 0
        counts: list[int] = []
        for t in toks:
            if t.startswith("["):
                if counts:
                    counts[-1] += 1
                depth += 1
                max_depth = max(max_depth, depth)
                counts.append(0)
            elif t == "]":
                assert 2 <= counts.pop() <= 3
                depth -= 1
            else:
                counts[-1] += 1
        # Operators sit at depths 1..3 (leaves are forced at max_depth=4).
        assert max_depth <= 3


def test_median_follows_lra():
    assert listops.apply_op("[MED", [1, 2, 4, 9]) == 3  # int((2 + 4) / 2)
    assert listops.apply_op("[MED", [1, 2]) == 1  # int(1.5)
    assert listops.apply_op("[MED", [7, 1, 3]) == 3


def test_splits_are_seeded_cached_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path))
    a = listops.splits(train=30, val=5, test=5, seed=3, min_length=10, max_length=200)
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # no temporary file left
    b = listops.splits(train=30, val=5, test=5, seed=3, min_length=10, max_length=200)
    assert a == b
    keys = [{" ".join(t) for t, _ in a[s]} for s in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert [len(a[s]) for s in ("train", "val", "test")] == [30, 5, 5]
    ids = listops.encode(a["train"][0][0])
    assert ids[0] == listops.TOKEN_ID["<cls>"] and max(ids) < len(listops.VOCAB)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="min_length"):
        listops.generate(1, min_length=100, max_length=100)


SMALL = {"min_length": 8, "max_length": 40, "max_depth": 4, "max_args": 3}


def _shape(toks: list[str]) -> str:
    """The tree's shape: operators and values anonymized."""
    return " ".join("v" if t.isdigit() else ("]" if t == "]" else "op") for t in toks)


def test_size_tables_are_the_exact_length_distribution():
    f, g = listops.size_tables(60, 4, 3)  # 53 tokens is the largest such tree
    for t in range(1, 5):
        assert f[t].sum().item() == pytest.approx(1.0, abs=1e-12)
    # Depth 3 (one level above forced values): an operator over 2 or 3 values.
    assert f[3, 1].item() == pytest.approx(0.75)
    assert f[3, 4].item() == pytest.approx(0.125) and f[3, 5].item() == pytest.approx(0.125)
    conv = torch.tensor(
        [sum(f[2, x] * f[2, s - x] for x in range(s + 1)) for s in range(61)], dtype=torch.float64
    )
    assert torch.allclose(g[2, 2], conv, rtol=1e-12, atol=0)


def test_fast_generator_matches_lra_rejection_sampler_in_distribution():
    n = 4000
    fast = listops.generate(n, seed=5, **SMALL)
    ref = listops.generate_reference(n, seed=6, **SMALL)
    for toks, label in fast[:500]:
        assert stack_eval(toks) == label and 8 < len(toks) < 40
    # Two-sample chi-square on length, label and shape histograms (bins with >= 20
    # expected examples); 0.1% critical values, approximated by k + 4 sqrt(2 k).
    for stat in (len, lambda t: stack_eval(t), _shape):
        a = collections.Counter(stat(t) for t, _ in fast)
        b = collections.Counter(stat(t) for t, _ in ref)
        bins = [k for k in set(a) | set(b) if a[k] + b[k] >= 40]
        rest = n - sum(a[k] for k in bins), n - sum(b[k] for k in bins)
        obs = [(a[k], b[k]) for k in bins] + ([rest] if sum(rest) >= 40 else [])
        chi2 = sum((x - y) ** 2 / (x + y) for x, y in obs)
        dof = len(obs) - 1
        assert dof >= 5
        assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)


def test_generation_is_seeded_and_fast_at_the_training_default():
    a = listops.generate_ids(600, seed=2, min_length=500, max_length=511)
    b = listops.generate_ids(600, seed=2, min_length=500, max_length=511)
    c = listops.generate_ids(600, seed=3, min_length=500, max_length=511)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0][:500], c[0][:500])
    ids, offsets, labels = a
    lengths = offsets[1:] - offsets[:-1]
    assert ((lengths > 500) & (lengths < 511)).all() and len(labels) == 600
    for e in range(0, 600, 37):
        toks = [listops.VOCAB[i] for i in ids[offsets[e] : offsets[e + 1]].tolist()]
        assert stack_eval(toks) == labels[e].item()


def test_encoded_splits_equal_encoded_token_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path))
    kw = {"train": 20, "val": 4, "test": 4, "seed": 1, "min_length": 10, "max_length": 100}
    tokens = listops.splits(**kw)
    ids = listops.encoded_splits(**kw)
    assert ids == {k: [(listops.encode(t), y) for t, y in v] for k, v in tokens.items()}
