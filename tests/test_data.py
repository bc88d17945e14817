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
