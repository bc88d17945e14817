"""ListOps generator: LRA's definition, checked by an independent stack evaluator."""

import statistics

import pytest

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
    data = listops.generate(50, seed=2, min_length=20, max_length=400, max_depth=4,
                            max_args=3)
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
    assert listops.apply_op("[MED", [1, 2, 4, 9]) == 3   # int((2 + 4) / 2)
    assert listops.apply_op("[MED", [1, 2]) == 1         # int(1.5)
    assert listops.apply_op("[MED", [7, 1, 3]) == 3


def test_splits_are_seeded_cached_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path))
    a = listops.splits(train=30, val=5, test=5, seed=3, min_length=10, max_length=200)
    assert list(tmp_path.glob("listops-*.jsonl"))
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
