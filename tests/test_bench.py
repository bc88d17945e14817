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
    assert len(rows) == 2 * 2 * len(speed.METHODS)
    for r in rows:
        assert r["median_s"] > 0 and r["peak_added_bytes"] >= 0
        if r["method"] == "favor":
            assert r["speedup_vs_exact"] > 0
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "FAVOR+ causal" in capsys.readouterr().out
