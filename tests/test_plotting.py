"""The shared figure helpers of linattn._plotting (used by bench, train, experiments, hf)."""

import pytest

pytest.importorskip("matplotlib")

from linattn._plotting import curve, finish, log_axes, optional_pyplot, pyplot


def test_finish_titles_saves_atomically_and_closes(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    curve(ax, [1, 2, 3], [3.0, 1.0, 2.0], xlabel="step", ylabel="loss", marker="o")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")
    assert ax.get_lines()[0].get_marker() == "o"
    finish(fig, tmp_path / "curve.png", title="a title", fontsize=9)
    assert fig._suptitle.get_text() == "a title" and fig._suptitle.get_fontsize() == 9
    assert fig.number not in plt.get_fignums()
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No temporary file left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


@pytest.mark.parametrize(
    "logx,logy", [(True, True), (False, True), (True, False)], ids=["loglog", "logy", "logx"]
)
def test_log_axes_scales_labels_and_title(logx, logy):
    plt = optional_pyplot()
    fig, ax = plt.subplots()
    log_axes(ax, xlabel="L", ylabel="ms", title="t", logx=logx, logy=logy)
    assert ax.get_xscale() == ("log" if logx else "linear")
    assert ax.get_yscale() == ("log" if logy else "linear")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("L", "ms", "t")
    plt.close(fig)
