"""Topic classification of real text: the Debian package ``fortunes``.

Each file under ``/usr/share/games/fortunes`` is a topic (``computers``, ``politics``,
``science`` ...) holding quotations separated by lines with a single ``%``. The label of
a quotation is its file. Topics with fewer than ``min_per_topic`` quotations are left
out, so that each class has enough examples to learn from.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .text import MissingDataError

FORTUNES_DIR = Path(os.environ.get("LINATTN_FORTUNES", "/usr/share/games/fortunes"))


def read_topics(root: str | Path | None = None) -> dict[str, list[str]]:
    """``{topic: [quotation, ...]}`` for every fortune file (not the ``.dat``/``.u8``
    indexes or the offensive set's rot13 files)."""
    base = Path(root) if root else FORTUNES_DIR
    if not base.is_dir():
        raise MissingDataError(
            f"{base} not found: install the Debian package 'fortunes' "
            "(sudo apt-get install fortunes), or set the environment variable "
            "LINATTN_FORTUNES to the folder of fortune files (or pass root=)"
        )
    topics = {}
    for f in sorted(base.iterdir()):
        if not f.is_file() or f.suffix in (".dat", ".u8") or f.name.endswith("-o"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        quotes = [q.strip() for q in text.split("\n%\n")]
        quotes = [q for q in quotes if q and q != "%"]
        if quotes:
            topics[f.name] = quotes
    return topics


def topic_dataset(
    root: str | Path | None = None,
    *,
    min_per_topic: int = 400,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Seeded stratified split: ``{"labels": [topic, ...], "train": [(text, label_id)],
    "test": [...]}`` over the topics with at least ``min_per_topic`` quotations."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    topics = {t: q for t, q in read_topics(root).items() if len(q) >= min_per_topic}
    if len(topics) < 2:
        raise ValueError(f"fewer than 2 topics have >= {min_per_topic} quotations")
    labels = sorted(topics)
    rng = random.Random(seed)
    train, test = [], []
    for i, topic in enumerate(labels):
        quotes = list(topics[topic])
        rng.shuffle(quotes)
        cut = max(1, int(len(quotes) * test_fraction))
        test += [(q, i) for q in quotes[:cut]]
        train += [(q, i) for q in quotes[cut:]]
    rng.shuffle(train)
    return {"labels": labels, "train": train, "test": test}
