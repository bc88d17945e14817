"""Offline text corpora: clear errors when missing, deterministic disjoint splits."""

import pytest

from linattn.data import (
    GCIDE_PATH,
    PYTHON_DOC_ROOT,
    MissingDataError,
    gcide_passages,
    python_doc_passages,
    text_split,
)


def test_missing_corpora_say_what_to_install(tmp_path):
    with pytest.raises(MissingDataError, match="dict-gcide"):
        gcide_passages(tmp_path / "nope.dict.dz")
    with pytest.raises(MissingDataError, match=r"python3\.11-doc"):
        python_doc_passages(tmp_path / "nope")


def test_text_split_is_seeded_and_disjoint():
    texts = [f"t{i}" for i in range(100)]
    a = text_split(texts, train=60, test=30, seed=3)
    assert a == text_split(texts, train=60, test=30, seed=3)
    assert a != text_split(texts, train=60, test=30, seed=4)
    assert not set(a[0]) & set(a[1]) and len(a[0]) == 60 and len(a[1]) == 30
    with pytest.raises(ValueError, match="exceeds"):
        text_split(texts, train=90, test=20)


@pytest.mark.skipif(not GCIDE_PATH.exists(), reason="apt-get install dict-gcide")
def test_gcide_passages_are_clean_prose():
    p = gcide_passages()
    assert len(p) > 100_000
    assert not any("[1913 Webster]" in s for s in p[:5000])
    assert all("\n" not in s and len(s) >= 80 for s in p[:5000])


@pytest.mark.skipif(not PYTHON_DOC_ROOT.exists(), reason="apt-get install python3.11-doc")
def test_python_doc_passages_are_prose():
    p = python_doc_passages()
    assert len(p) > 5000
    assert not any(s.startswith("..") or ":func:`" in s for s in p)


def test_fortunes_parse_topics_and_split(tmp_path):
    from linattn.data.fortunes import read_topics, topic_dataset

    (tmp_path / "alpha").write_text("one\nline\n%\ntwo\n%\nthree\n%\nfour\n")
    (tmp_path / "beta").write_text("b1\n%\nb2\n%\nb3\n%\nb4\n%\nb5\n")
    (tmp_path / "beta.dat").write_bytes(b"\x00index")
    (tmp_path / "tiny").write_text("only one\n")
    topics = read_topics(tmp_path)
    assert topics["alpha"] == ["one\nline", "two", "three", "four"]
    assert sorted(topics) == ["alpha", "beta", "tiny"]
    d = topic_dataset(tmp_path, min_per_topic=4, test_fraction=0.25, seed=1)
    assert d["labels"] == ["alpha", "beta"]
    assert len(d["train"]) + len(d["test"]) == 9
    assert {y for _, y in d["test"]} == {0, 1}
    assert d == topic_dataset(tmp_path, min_per_topic=4, test_fraction=0.25, seed=1)
    with pytest.raises(MissingDataError, match="fortunes"):
        read_topics(tmp_path / "missing")


def test_byte_windows_shift_targets_by_one():
    import torch

    from linattn.data.bytes_lm import eval_windows, random_windows

    data = torch.arange(200, dtype=torch.uint8)
    x, y = random_windows(data, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    w = eval_windows(data, 16)
    assert w.shape == (12, 17) and torch.equal(w[1, 0], w[0, 16])
    with pytest.raises(ValueError, match="bytes"):
        random_windows(data[:10], 1, 16, torch.Generator())


@pytest.mark.skipif(not GCIDE_PATH.exists(), reason="apt-get install dict-gcide")
def test_gcide_bytes_split_is_contiguous_90_5_5():
    from linattn.data.bytes_lm import gcide_bytes

    parts = gcide_bytes()
    total = sum(p.numel() for p in parts.values())
    assert total > 30_000_000
    assert abs(parts["val"].numel() / total - 0.05) < 1e-3
