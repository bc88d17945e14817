"""approx, peers and report run end to end on tiny sizes."""

import functools
import importlib.util
import json

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from linattn.bench import approx, generation, linformer_table, peers, report, speed
from linattn.cli import main


def test_lemma2_closed_form_matches_empirical():
    rows = approx.lemma2_check(pairs=16, draws=1500, m=8, d=8, seed=3)
    for kernel in ("softmax", "softmax_trig"):
        rs = [r for r in rows if r["kernel"] == kernel]
        emp = torch.tensor([r["empirical"] for r in rs])
        closed = torch.tensor([r["closed_form"] for r in rs])
        se = torch.tensor([r["stderr"] for r in rs])
        # Summed over pairs: within 5 standard errors (and 25%) of the closed form.
        assert abs(emp.sum() - closed.sum()) < 5 * se.square().sum().sqrt() + 0.25 * closed.sum()
        assert ((emp - closed).abs() < 5 * se + 0.3 * closed).float().mean() > 0.85


def test_approx_cli_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        approx.PRESETS,
        "quick",
        {"length": 128, "features": [8, 32], "draws": 2, "pairs": 6, "lemma_draws": 50},
    )
    assert main(["approx", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "approx.json").read_text())
    assert len(res["results"]) == 2 * len(approx.VARIANTS) * 2
    assert {"variant", "m", "mse_mean", "mse_std", "std"} <= set(res["results"][0])
    for name in ("approx_mse.png", "approx_variance.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "Lemma 2 (softmax)" in capsys.readouterr().out


def test_peers_skip_cleanly_when_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            None if name in ("performer_pytorch", "linformer", "fla") else real(name, *a)
        ),
    )
    notes = peers.available()
    assert all(
        notes[n] and "not installed" in notes[n]
        for n in ("performer-pytorch", "linformer", "flash-linear-attention")
    )


def test_report_tiny(tmp_path, monkeypatch, small_matmul_rate):
    monkeypatch.setitem(
        speed.PRESETS, "quick", {"lengths": [64], "repeats": 1, "kernels": ["softmax"]}
    )
    monkeypatch.setitem(linformer_table.PRESETS, "quick", {"lengths": [64], "dims": [16]})
    monkeypatch.setitem(generation.PRESETS, "quick", [16])
    monkeypatch.setitem(
        approx.PRESETS,
        "quick",
        {"length": 64, "features": [8], "draws": 2, "pairs": 4, "lemma_draws": 20},
    )
    monkeypatch.setitem(peers.PRESETS, "quick", [64])
    monkeypatch.setattr(
        generation, "run", functools.partial(generation.run, dim=16, depth=1, heads=2, steps=3)
    )
    index = report.run(tmp_path, preset="quick", progress=False)
    text = index.read_text()
    for title in (
        "Speed and memory",
        "Linformer",
        "Generation",
        "Approximation error",
        "Against the other libraries",
        "Training",
    ):
        assert f"## {title}" in text
    for png in ("bench.png", "linformer.png", "generate.png", "approx_mse.png"):
        assert f"({png})" in text and (tmp_path / png).exists()
    # The page opens with the load and what was flagged (tiny sizes: anything may be).
    head = text.split("## Speed and memory")[0]
    assert "## Can these numbers be trusted?" in head and "Machine load" in head
    assert "No cell was flagged" in head or "flagged" in head
