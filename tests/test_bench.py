"""The benchmark runs end to end on tiny sizes (files written, schema checked)."""

import csv
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from linattn.bench import speed
from linattn.cli import main


def test_bench_cli_tiny(tmp_path, capsys):
    rc = main(["bench", "--out", str(tmp_path), "--lengths", "64", "128", "--heads", "2",
               "--head-dim", "16", "--num-features", "32", "--repeats", "1"])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result) == {"machine", "matmul_gflops", "results"}
    assert {"torch", "threads", "cpu_count"} <= set(result["machine"])
    rows = result["results"]
    assert len(rows) == 2 * 2 * len(speed.METHODS)  # quick: softmax kernel only
    assert {r["method"] for r in rows} == {"exact", "materialized", "favor"}
    for r in rows:
        assert r["median_s"] > 0 and r["peak_added_bytes"] >= 0
        if r["method"] == "favor":
            assert r["speedup_vs_exact"] > 0
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "FAVOR+ causal" in capsys.readouterr().out


def test_linformer_table_tiny(tmp_path, monkeypatch, capsys):
    from linattn.bench import linformer_table

    monkeypatch.setitem(linformer_table.PRESETS, "quick",
                        {"lengths": [64, 256], "dims": [16, 128]})
    rc = main(["bench", "--suite", "linformer", "--out", str(tmp_path), "--heads", "2",
               "--head-dim", "16", "--repeats", "1"])
    assert rc == 0
    result = json.loads((tmp_path / "linformer.json").read_text())
    lin = [r for r in result["results"] if r["method"] == "linformer"]
    # k < n only: (64, 16), (256, 16), (256, 128)
    assert sorted((r["length"], r["proj_dim"]) for r in lin) == [(64, 16), (256, 16), (256, 128)]
    for r in lin:
        assert r["time_saved_vs_exact"] > 0 and r["time_saved_vs_materialized"] > 0
    assert (tmp_path / "linformer.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "vs scaled_dot_product_attention" in out and "k=128" in out


def test_generation_bench_tiny(tmp_path, monkeypatch):
    from linattn.bench import generation

    monkeypatch.setitem(generation.PRESETS, "quick", [16, 64])
    result = generation.run(tmp_path, dim=16, depth=1, heads=2, steps=4, progress=False)
    rows = {(r["attention"], r["context"]): r for r in result["results"]}
    # The FAVOR state does not grow with the context; the key/value cache does.
    assert rows[("favor", 16)]["cache_bytes"] == rows[("favor", 64)]["cache_bytes"]
    assert rows[("exact", 64)]["cache_bytes"] > rows[("exact", 16)]["cache_bytes"]
    assert (tmp_path / "generate.png").stat().st_size > 10_000
