"""matplotlib, headless, imported only when a plot is drawn (the [bench]/[dev]/[hf]
extras carry it)."""

from __future__ import annotations

from ._io import save_figure


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend; an ImportError that says
    which extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'linattn[train]' (or 'linattn[bench]')"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def optional_pyplot():
    """:func:`pyplot`, or None where matplotlib is missing: for a figure that only
    accompanies results written anyway (a training or transfer run goes on without it)."""
    try:
        return pyplot()
    except ImportError:  # pragma: no cover - matplotlib ships with [bench]/[dev]/[hf]
        return None


def log_axes(
    ax, *, xlabel: str, ylabel: str, title: str | None = None, logx: bool = True, logy: bool = True
) -> None:
    """A benchmark panel: log2 lengths on x (``logx``), log values on y (``logy``), the
    labels, the title and a grid on major and minor ticks."""
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def curve(ax, xs, ys, *, xlabel: str, ylabel: str, **plot_kwargs) -> None:
    """One curve ``ax.plot(xs, ys, **plot_kwargs)`` on a panel of its own: the labels and
    a light grid."""
    ax.plot(xs, ys, **plot_kwargs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def finish(fig, path, *, title: str | None = None, dpi: int = 120, **title_kwargs) -> None:
    """Give ``fig`` its ``title`` (``fig.suptitle(title, **title_kwargs)``), lay it out,
    save it to ``path`` (atomically, :func:`linattn._io.save_figure`) and close it."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, **title_kwargs)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
    plt.close(fig)
