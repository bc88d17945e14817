"""Offline data: real text from Debian packages, seeded and cached where it is generated."""

from .text import (
    GCIDE_PATH,
    PYTHON_DOC_ROOT,
    MissingDataError,
    gcide_passages,
    gcide_text,
    python_doc_passages,
    text_split,
)

__all__ = [
    "GCIDE_PATH",
    "PYTHON_DOC_ROOT",
    "MissingDataError",
    "gcide_passages",
    "gcide_text",
    "python_doc_passages",
    "text_split",
]
