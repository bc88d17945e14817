"""The benchmark runs end to end on tiny sizes (files written, schema checked)."""

import csv
import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from linattn.bench import speed
from linattn.cli import main


def test_bench_cli_tiny(tmp_path, capsys, small_matmul_rate):
    rc = main(
        [
            "bench",
            "--out",
            str(tmp_path),
            "--lengths",
            "64",
            "128",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--num-features",
            "32",
            "--repeats",
            "1",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result) == {"machine", "matmul_gflops", "results", "load"}
    assert {"torch", "threads", "cpu_count"} <= set(result["machine"])
    rows = result["results"]
    assert len(rows) == 2 * 2 * len(speed.METHODS)  # quick: softmax kernel only
    assert {r["method"] for r in rows} == {"exact", "materialized", "favor"}
    for r in rows:
        assert r["median_s"] > 0 and r["peak_added_bytes"] >= 0
        assert r["n"] == len(r["times_s"]) >= 1 and r["spread"] >= 0
        if r["method"] == "favor":
            assert r["speedup_vs_exact"] > 0
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "FAVOR+ causal" in capsys.readouterr().out


def test_linformer_table_tiny(tmp_path, monkeypatch, capsys):
    from linattn.bench import linformer_table

    monkeypatch.setitem(linformer_table.PRESETS, "quick", {"lengths": [64, 256], "dims": [16, 128]})
    rc = main(
        [
            "bench",
            "--suite",
            "linformer",
            "--out",
            str(tmp_path),
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--repeats",
            "1",
        ]
    )
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


# --- statistics and flags on synthetic timings (no timing assertions) ---------------

from linattn.bench import checks  # noqa: E402


def _speed_rows(times: dict) -> list[dict]:
    """Rows as the favor suite writes them from ``{(method, causal, pass, L): seconds}``."""
    rows = []
    for (method, causal, p, length), t in times.items():
        rows.append(
            {
                "method": method,
                "causal": causal,
                "kernel": "softmax",
                "pass": p,
                "length": length,
                "peak_added_bytes": 2**20,
                **checks.summarize([t * 0.99, t, t * 1.01]),
            }
        )
    speed._add_ratios(rows)
    return rows


def _clean_times() -> dict:
    out = {}
    for length in (1024, 2048, 4096):
        s = length / 1024
        for p, k in (("fwd", 1.0), ("fwd+bwd", 2.5)):
            out[("exact", False, p, length)] = 0.01 * k * s**2
            out[("exact", True, p, length)] = 0.006 * k * s**2
            out[("favor", False, p, length)] = 0.02 * k * s
            out[("favor", True, p, length)] = 0.03 * k * s
    return out


def test_summary_statistics():
    s = checks.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["n"]) == (3.0, 2.0, 4.0, 5)
    assert s["spread"] == pytest.approx(2.0 / 3.0)
    assert checks.spread([1.0, 1.2, 0.9]) == pytest.approx(0.3)  # range below 4 repeats
    assert checks.spread([5.0]) == 0.0


def test_clean_table_gets_no_flag():
    rows = _speed_rows(_clean_times())
    checks.flag_speed(rows)
    assert checks.flagged(rows, speed._row_label) == []
    assert "no cell flagged" in speed.format_table(
        {
            "machine": {"processor": "x", "cpu_count": 2, "torch": "t", "threads": 2},
            "matmul_gflops": 1.0,
            "results": rows,
        }
    )


def test_forward_slower_than_forward_backward_is_flagged():
    times = _clean_times()
    # The report of issue 17: forward 685 ms, forward+backward 142 ms at L = 4096.
    times[("favor", False, "fwd", 4096)] = 0.685
    times[("favor", False, "fwd+bwd", 4096)] = 0.142
    rows = _speed_rows(times)
    checks.flag_speed(rows)
    bad = {
        (r["pass"], r["length"], r["method"], r["causal"]): r["flags"]
        for r in rows
        if r.get("flags")
    }
    assert any("slower than forward+backward" in f for f in bad[("fwd", 4096, "favor", False)])
    assert any("slower than forward+backward" in f for f in bad[("fwd+bwd", 4096, "favor", False)])
    # ... and the jump 0.04 s -> 0.685 s is steeper than O(L), the speed-up collapses.
    assert any("steeper than O(L^1)" in f for f in bad[("fwd", 4096, "favor", False)])
    assert any("speed-up fell" in f for f in bad[("fwd", 4096, "favor", False)])
    text = speed.format_table(
        {
            "machine": {"processor": "x", "cpu_count": 2, "torch": "t", "threads": 2},
            "matmul_gflops": 1.0,
            "results": rows,
        }
    )
    assert checks.WARN + "1" in text and "no cell flagged" not in text


def test_exact_steeper_than_quadratic_is_flagged_not_linear_growth():
    times = _clean_times()
    times[("exact", False, "fwd", 4096)] *= 2.5  # 2048 -> 4096: x10, L^3.3
    rows = _speed_rows(times)
    checks.flag_speed(rows)
    flagged = {(r["method"], r["pass"], r["length"]) for r in rows if r.get("flags")}
    assert ("exact", "fwd", 4096) in flagged
    assert not any(m == "favor" and p == "fwd+bwd" for m, p, _ in flagged)


def test_linformer_time_saved_collapse_is_flagged_per_proj_dim():
    # Time saved 4x -> 3x -> 1x with proj_dim 64: only the fall by more than RATIO_DROP
    # (3x -> 1x at n = 1024) is flagged; proj_dim 128 is its own series.
    rows = [
        {
            "method": "linformer",
            "proj_dim": k,
            "length": n,
            "median_s": 1e-3 * n,
            "time_saved_vs_exact": s,
        }
        for k, n, s in [
            (64, 256, 4.0),
            (64, 512, 3.0),
            (64, 1024, 1.0),
            (128, 256, 1.0),
            (128, 512, 4.0),
        ]
    ]
    checks.flag_linformer(rows)
    assert [(r["proj_dim"], r["length"], r["flags"]) for r in rows if r.get("flags")] == [
        (64, 1024, ["time saved fell from 3.00x at n=512 to 1.00x at n=1024"])
    ]


def test_generation_flags_favor_growing_with_context():
    rows = [
        {"attention": a, "context": c, "ms_per_token": t, "spread": 0.05, "n": 30}
        for a, c, t in [
            ("favor", 256, 5.0),
            ("favor", 1024, 5.2),
            ("favor", 4096, 127.0),
            ("softmax", 256, 3.0),
            ("softmax", 1024, 4.0),
            ("softmax", 4096, 9.0),
        ]
    ]
    checks.flag_generation(rows)
    assert [(r["attention"], r["context"]) for r in rows if r.get("flags")] == [("favor", 4096)]


class _FakeTimer:
    """Replays given durations (a load spike in the first repeats)."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.times = []

    def time_once(self):
        self.times.append(self.durations.pop(0))
        return True


def test_unstable_cell_is_remeasured_and_round_robin():
    steady = _FakeTimer([1.0] * 20)
    shaky = _FakeTimer([1.0, 3.0, 1.0, 1.1] + [1.0] * 10)  # a spike in repeat 2
    speed.interleave([steady, shaky], 4)
    assert len(steady.times) == 4  # stable: no extra repeat
    assert len(shaky.times) == 5  # one extra repeat settles it
    assert not checks.unstable(shaky.times)  # the extra repeats settled it


def test_still_unstable_cell_is_flagged_after_bounded_extra_repeats():
    shaky = _FakeTimer([1.0, 3.0] * 20)
    speed.interleave([shaky], 4)
    assert len(shaky.times) == 4 + checks.EXTRA_ROUNDS
    row = {
        "method": "favor",
        "causal": False,
        "pass": "fwd",
        "length": 1024,
        **checks.summarize(shaky.times),
    }
    checks.flag_speed([row])
    assert any(f.startswith("unstable") for f in row["flags"])


def test_interleave_is_round_robin():
    order = []

    class Rec(_FakeTimer):
        def __init__(self, name):
            super().__init__([1.0] * 10)
            self.name = name

        def time_once(self):
            order.append(self.name)
            return super().time_once()

    speed.interleave([Rec("exact"), Rec("favor"), Rec("linformer")], 3)
    assert order == ["exact", "favor", "linformer"] * 3


@pytest.mark.parametrize("suite", ["linformer", "generate"])
def test_suites_without_passes_refuse_them(suite, tmp_path, capsys):
    assert main(["bench", "--suite", suite, "--passes", "fwd", "--out", str(tmp_path)]) == 2
    assert "does not use --passes" in capsys.readouterr().err


def test_window_cases_are_timed_beside_pure_favor_and_compared_with_it():
    base = {"batch": 1, "heads": 2, "head_dim": 8, "num_features": 16}
    cases = list(speed._cases([256], ["fwd+bwd"], ["softmax"], base, windows=(16, 64)))
    win = [c for c in cases if "window" in c]
    assert {(c["window"], c["causal"]) for c in win} == {
        (16, False),
        (16, True),
        (64, False),
        (64, True),
    }
    assert len(cases) == len(speed.METHODS) + len(win)
    rows = _speed_rows(_clean_times())
    for length in (1024, 2048, 4096):
        for causal, t in ((False, 0.05), (True, 0.06)):
            rows.append(
                {
                    "method": "favor",
                    "causal": causal,
                    "kernel": "softmax",
                    "window": 64,
                    "pass": "fwd+bwd",
                    "length": length,
                    "peak_added_bytes": 2**20,
                    **checks.summarize([t * length / 1024] * 3),
                }
            )
    speed._add_ratios(rows)
    checks.flag_speed(rows)
    win = [r for r in rows if r.get("window") == 64]
    # Over pure FAVOR+ of the same length, pass and causality (0.02 * 2.5 * L / 1024 ...).
    assert [round(r["over_favor"], 3) for r in win] == [1.0, 0.8] * 3
    assert all("over_favor" not in r for r in rows if r.get("window") is None)
    assert checks.flagged(rows, speed._row_label) == []
    text = speed.format_table(
        {
            "machine": {"processor": "x", "cpu_count": 2, "torch": "t", "threads": 2},
            "matmul_gflops": 1.0,
            "results": rows,
        }
    )
    assert "FAVOR+ w64 causal" in text and "/FAVOR+" in text and "0.80x" in text


def test_spread_and_mark_cells():
    flagged, clean, unmeasured = {"spread": 0.123, "flags": ["x"]}, {"spread": 0.05}, {}
    marks, _ = speed.footnotes([clean, flagged, unmeasured], lambda r: "cell")
    assert speed.spread_and_mark(flagged, marks) == ("12%", f" {checks.WARN}1")
    assert speed.spread_and_mark(clean, marks) == ("5%", "")
    assert speed.spread_and_mark(unmeasured, marks) == ("", "")


def test_length_curve_sorts_by_length_and_skips_empty(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "plot_rows", lambda *a, **kw: calls.append((a, kw)))
    speed._length_curve("ax", [], "median_s", 1.0, "C0", "-", "none")
    assert calls == []
    rows = [{"length": 256}, {"length": 64}, {"length": 128}]
    speed._length_curve("ax", rows, "median_s", 1.0, "C0", "-", "time")
    speed._length_curve("ax", rows, "peak_added_bytes", 2.0, "C1", "--", "memory")
    (a, kw), (a2, kw2) = calls
    assert [r["length"] for r in a[1]] == [64, 128, 256]
    assert a[0] == "ax" and a[2:] == ("median_s", 1.0, "C0", "-", "time") and kw == {"errors": True}
    assert a2[2:] == ("peak_added_bytes", 2.0, "C1", "--", "memory") and kw2 == {"errors": False}
