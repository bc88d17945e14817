"""Real English text that installs offline from Debian packages.

* GCIDE, the GNU Collaborative International Dictionary of English (package
  ``dict-gcide``, ``/usr/share/dictd/gcide.dict.dz``, about 40 MB of text): a dictzip
  file, which is gzip-compatible.
* The Python 3.11 documentation (package ``python3.11-doc``): its reStructuredText
  sources under ``/usr/share/doc/python3.11/html/_sources``.

Both readers raise :class:`MissingDataError` naming the package to install.
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import re
from pathlib import Path

# Where Debian installs them; the environment variables point elsewhere (another machine,
# a copy of the files).
GCIDE_PATH = Path(os.environ.get("LINATTN_GCIDE", "/usr/share/dictd/gcide.dict.dz"))
PYTHON_DOC_ROOT = Path(
    os.environ.get("LINATTN_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources")
)


class MissingDataError(FileNotFoundError):
    """A corpus is not installed; the message says which package provides it."""


def _require(path: Path, package: str, variable: str, argument: str = "path") -> Path:
    if not path.exists():
        raise MissingDataError(
            f"{path} not found: install the Debian package {package!r} "
            f"(sudo apt-get install {package}), or set the environment variable "
            f"{variable} to its location (or pass {argument}=)"
        )
    return path


@functools.lru_cache(maxsize=2)
def gcide_text(path: str | os.PathLike | None = None) -> str:
    """The whole GCIDE dictionary as one string (about 40 MB, decompressed once per
    process)."""
    p = _require(Path(path) if path else GCIDE_PATH, "dict-gcide", "LINATTN_GCIDE")
    with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


_WS = re.compile(r"\s+")
_SOURCE = re.compile(r"\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.|[^\]]{0,30}Webster[^\]]*)\]")


def gcide_passages(path: str | os.PathLike | None = None, *, min_chars: int = 80) -> list[str]:
    """GCIDE split into paragraphs (definitions, quotations, usage notes), each on one line
    with its whitespace collapsed and source tags such as ``[1913 Webster]`` removed;
    paragraphs shorter than ``min_chars`` are dropped. Order is the dictionary's."""
    out = []
    for block in gcide_text(path).split("\n\n"):
        text = _WS.sub(" ", _SOURCE.sub("", block)).strip()
        if len(text) >= min_chars and not text.startswith("00-database"):
            out.append(text)
    return out


_RST_MARKUP = re.compile(r":[a-z]+(:[a-z]+)?:`([^`<]*)(<[^>]*>)?`")


def python_doc_passages(root: str | os.PathLike | None = None, *, min_chars: int = 80) -> list[str]:
    """Prose paragraphs of the Python documentation: directives, code blocks, tables and
    section underlines dropped, roles like ``:func:`len``` reduced to their text."""
    base = _require(
        Path(root) if root else PYTHON_DOC_ROOT, "python3.11-doc", "LINATTN_PYTHON_DOCS", "root"
    )
    out = []
    for file in sorted(base.rglob("*.rst.txt")):
        text = file.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n\n"):
            lines = block.split("\n")
            # Prose paragraphs start at the margin; indented blocks are code or directive
            # bodies, and '..' starts a directive or comment.
            if not lines[0] or lines[0][0].isspace() or lines[0].startswith(".."):
                continue
            if any(set(line.strip()) <= set("=-~*^#+|") for line in lines if line.strip()):
                continue
            para = _WS.sub(" ", _RST_MARKUP.sub(r"\2", " ".join(lines))).strip()
            para = para.replace("``", "").replace("**", "")
            if len(para) >= min_chars and not para.startswith((">>>", "|", "+")):
                out.append(para)
    return out


def text_split(
    passages: list[str], *, train: int, test: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Disjoint, seeded ``train`` and ``test`` samples of ``passages`` (without
    replacement)."""
    if train + test > len(passages):
        raise ValueError(
            f"train + test = {train + test} exceeds the {len(passages)} passages available"
        )
    idx = list(range(len(passages)))
    random.Random(seed).shuffle(idx)
    return [passages[i] for i in idx[:train]], [passages[i] for i in idx[train : train + test]]
