"""matplotlib, headless, imported only when a plot is drawn (the [bench]/[dev]/[hf]
extras carry it)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend; an ImportError that says
    which extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'linattn[train]' (or "
                          "'linattn[bench]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
