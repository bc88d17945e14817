"""Training: short end-to-end runs per task, exact resume, torchrun DDP = one process."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from linattn.data import listops
from linattn.models import load_model
from linattn.train import TrainConfig, build_task, read_metrics, train
from linattn.train.compare import parse_spec, spec_label, spec_name


def tiny(task, **kw):
    base = dict(
        task=task,
        attention="favor",
        dim=32,
        depth=1,
        heads=2,
        seq_len=64,
        batch_size=8,
        steps=30,
        lr=3e-3,
        warmup=3,
        eval_every=15,
        eval_batches=2,
        log_every=1,
        checkpoint_every=10,
        num_features=16,
    )
    base.update(kw)
    return TrainConfig(**base)


def byte_data():
    # Highly regular text: a small model learns it within a few dozen steps.
    text = ("the quick brown fox jumps over the lazy dog. " * 400).encode()
    t = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return {"train": t[:15000], "val": t[15000:17000], "test": t[17000:]}


def listops_splits():
    # 16 training examples: 40 steps of 8 are 20 epochs, so the loss must fall (memorized).
    return listops.splits(
        train=16, val=32, test=32, seed=0, min_length=10, max_length=60, cache=False
    )


def fortunes_dataset():
    topics = ["alpha beta gamma delta", "one two three four five"]
    rows = [(f"{topics[i % 2]} {i}", i % 2) for i in range(120)]
    return {"labels": ["greek", "numbers"], "train": rows[:100], "test": rows[100:]}


DATA = {
    "bytes": {"data": byte_data},
    "listops": {"splits": listops_splits},
    "fortunes": {"dataset": fortunes_dataset},
}


def make_task(cfg):
    ((key, fn),) = DATA[cfg.task].items()
    return build_task(cfg, **{key: fn()})


@pytest.mark.parametrize(
    "task,attention",
    [
        ("bytes", "favor"),
        ("bytes", "exact"),
        ("bytes", "favor-hedgehog-w16"),
        ("listops", "favor"),
        ("listops", "linformer"),
        ("listops", "favor-hedgehog-w8"),
        ("fortunes", "favor-relu"),
    ],
)
def test_short_run_learns_and_writes_its_files(tmp_path, task, attention):
    cfg = tiny(task, **parse_spec(attention), steps=40 if task != "bytes" else 30)
    s = train(cfg, tmp_path, task=make_task(cfg), progress=False)
    assert s["finished"]
    first, last = sum(s["losses"][:5]) / 5, sum(s["losses"][-5:]) / 5
    assert last < first
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "checkpoint.pt",
        "model/model.pt",
    ):
        assert (tmp_path / name).exists(), name
    rows = read_metrics(tmp_path / "metrics.jsonl")
    expected = [15, 30] if task == "bytes" else [15, 30, 40]
    assert [r["step"] for r in rows if r["split"] == "val"] == expected
    assert rows[-1]["split"] == "test"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["median_step_s"] > 0 and summary["peak_memory_mb"] > 0
    model = load_model(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == s["parameters"]
    assert (model.cfg.attention, model.cfg.kernel, model.cfg.window) == (
        cfg.attention,
        cfg.kernel,
        cfg.window,
    )
    if task == "bytes":
        assert s["test"]["bits_per_byte"] < 8.0  # below the uniform 8 bits per byte


@pytest.mark.parametrize("attention", ["favor", "exact", "favor-hedgehog-w8"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, attention):
    # Dropout and FAVOR+ redraws make the RNG and redraw state part of what must resume.
    spec = parse_spec(attention)
    cfg = tiny(
        "bytes",
        **spec,
        steps=8,
        dropout=0.1,
        checkpoint_every=100,
        eval_every=100,
        redraw_interval=None if spec["kernel"] == "hedgehog" else 3,
    )
    full = train(cfg, tmp_path / "full", task=make_task(cfg), progress=False)
    part = train(cfg, tmp_path / "cut", task=make_task(cfg), progress=False, stop_after=5)
    assert not part["finished"] and len(part["losses"]) == 5
    rest = train(cfg, tmp_path / "cut", task=make_task(cfg), progress=False, resume=True)
    assert part["losses"] + rest["losses"] == full["losses"]
    a = load_model(tmp_path / "full" / "model").state_dict()
    b = load_model(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r["split"] == "train"
    ]
    assert steps == list(range(1, 9))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="causal"):
        TrainConfig(task="bytes", attention="linformer")
    for old_name in ("softmax", "relu"):  # renamed: "exact", and "favor" with kernel="relu"
        with pytest.raises(ValueError, match="attention must be one of"):
            TrainConfig(attention=old_name)
    with pytest.raises(ValueError, match="needs attention='favor'"):
        TrainConfig(attention="exact", kernel="relu")
    with pytest.raises(ValueError, match="window applies to attention='favor' only"):
        TrainConfig(task="listops", attention="linformer", window=8)
    with pytest.raises(ValueError, match="not redrawn"):
        TrainConfig(kernel="hedgehog", redraw_interval=10)
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="imagenet")
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"task": "bytes", "width": 3})


def test_missing_corpus_says_what_to_install(tmp_path, monkeypatch):
    from linattn.data import MissingDataError
    from linattn.data import fortunes as fortunes_mod

    monkeypatch.setattr(fortunes_mod, "FORTUNES_DIR", tmp_path / "none")
    with pytest.raises(MissingDataError, match="apt-get install fortunes"):
        build_task(tiny("fortunes"))


def _cli(out, nproc=None):
    args = [
        "-m",
        "linattn",
        "train",
        "--task",
        "listops",
        "--attention",
        "favor",
        "--listops-train",
        "64",
        "--listops-eval",
        "16",
        "--listops-min-len",
        "10",
        "--listops-max-len",
        "60",
        "--seq-len",
        "64",
        "--dim",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--num-features",
        "16",
        "--redraw-interval",
        "2",
        "--batch-size",
        "8",
        "--steps",
        "5",
        "--eval-every",
        "5",
        "--eval-batches",
        "1",
        "--log-every",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    if nproc:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    return [sys.executable, *args]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "LINATTN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for out, nproc in ((tmp_path / "one", None), (tmp_path / "two", 2)):
        r = subprocess.run(_cli(out, nproc), env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    a = load_model(tmp_path / "one" / "model").state_dict()
    b = load_model(tmp_path / "two" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # Two redraws happened (interval 2, 5 steps) and agree on both ranks' model.
    assert int(b["encoder.blocks.0.attn.inner.draws"]) == 2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_compare_runs_every_attention_in_its_own_process(tmp_path, monkeypatch):
    from linattn.train.compare import compare

    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(
        task="listops",
        dim=32,
        depth=1,
        heads=2,
        seq_len=64,
        batch_size=8,
        steps=4,
        eval_every=4,
        eval_batches=1,
        log_every=1,
        warmup=1,
        listops_train=32,
        listops_eval=8,
        listops_min_len=10,
        listops_max_len=60,
        num_features=16,
        proj_dim=8,
    )
    kinds = ("exact", "favor-hedgehog-w8", "linformer")
    result = compare(cfg, tmp_path / "cmp", attentions=kinds, progress=False)
    assert [r["attention"] for r in result["results"]] == list(kinds)
    request = json.loads((tmp_path / "cmp" / "favor-hedgehog-w8" / "request.json").read_text())
    assert (request["attention"], request["kernel"], request["window"]) == ("favor", "hedgehog", 8)
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).exists()
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| exact attention |" in md and "| Linformer |" in md
    assert "| FAVOR+ (hedgehog kernel, window 8) |" in md
    assert all(0 <= r["test"] <= 1 and r["peak_memory_mb"] > 0 for r in result["results"])
    # Again with the same settings: the finished runs are kept, not trained again.
    stamps = {k: (tmp_path / "cmp" / k / "summary.json").stat().st_mtime_ns for k in kinds}
    again = compare(cfg, tmp_path / "cmp", attentions=kinds, progress=False)
    assert again["results"] == result["results"]
    assert stamps == {k: (tmp_path / "cmp" / k / "summary.json").stat().st_mtime_ns for k in kinds}
    # Changed settings: that run starts over, replacing the earlier one in its folder.
    changed = compare(replace(cfg, lr=2e-3), tmp_path / "cmp", attentions=kinds[:1], progress=False)
    assert json.loads((tmp_path / "cmp" / "exact" / "config.json").read_text())["lr"] == 2e-3
    assert changed["results"][0]["attention"] == "exact"


@pytest.mark.parametrize(
    "spec,fields",
    [
        ("exact", ("exact", "softmax", None)),
        ("favor", ("favor", "softmax", None)),
        ("favor-relu", ("favor", "relu", None)),
        ("favor-w16", ("favor", "softmax", 16)),
        ("favor-hedgehog-w64", ("favor", "hedgehog", 64)),
        ("favor-softmax_hyp", ("favor", "softmax_hyp", None)),
        ("favor-m128", ("favor", "softmax", None, 128)),
        ("favor-hedgehog-m32-w8", ("favor", "hedgehog", 8, 32)),
        ("linformer", ("linformer", "softmax", None)),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_attention_specs_round_trip(spec, fields):
    f = parse_spec(spec)
    assert (
        f["attention"],
        f["kernel"],
        f["window"],
        *([f["num_features"]] if "num_features" in f else []),
    ) == fields
    task = "listops" if spec == "linformer" else "bytes"
    assert spec_name(TrainConfig(task=task, **f)) == spec
    assert spec_label(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "softmax",
        "relu",
        "exact-relu",
        "linformer-w8",
        "exact-m64",
        "favor-w8-relu",
        "favor-relu-relu",
        "favor-w8-m4",
        "favor-cosine",
        "favor-",
        "",
    ],
)
def test_bad_attention_specs(spec):
    with pytest.raises(ValueError, match=r"attention|kernel must be one of"):
        parse_spec(spec)


def test_cli_trains_hedgehog_with_a_window(tmp_path, monkeypatch, capsys):
    from linattn.cli import main

    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = [
        "train",
        "--task",
        "listops",
        "--attention",
        "favor",
        "--kernel",
        "hedgehog",
        "--window",
        "16",
        "--listops-train",
        "32",
        "--listops-eval",
        "8",
        "--listops-min-len",
        "10",
        "--listops-max-len",
        "60",
        "--seq-len",
        "64",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--log-every",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "listops/favor-hedgehog-w16" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["attention"], cfg["kernel"], cfg["window"]) == ("favor", "hedgehog", 16)
    layers = load_model(out / "model").encoder.performer_layers()
    assert layers and all(a.kernel == "hedgehog" and a.window == 16 for a in layers)
    assert main(["train", "--compare", "--kernel", "hedgehog", "--out", str(tmp_path / "c")]) == 2
    assert "--attentions" in capsys.readouterr().err


def test_a_run_saved_before_linformer_sharing_resumes_as_it_was_built():
    # Runs saved before TrainConfig.linformer_sharing existed built headwise Linformers.
    from linattn.train.config import TrainConfig
    from linattn.train.loop import resume_changes

    old = TrainConfig(task="fortunes", attention="linformer").to_dict()
    old.pop("linformer_sharing")
    cfg = TrainConfig.from_dict(old)
    assert cfg.linformer_sharing == "headwise"
    assert resume_changes(old, cfg) == {}
    now = TrainConfig(task="fortunes", attention="linformer")  # today's default: "none"
    assert resume_changes(old, now) == {"linformer_sharing": ("headwise", "none")}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"warmup": -3}, "warmup"),
        ({"num_features": 0}, "num_features"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"redraw_interval": 0}, "redraw_interval"),
    ],
    ids=["warmup-neg", "num-features-0", "proj-dim-0", "redraw-0"],
)
def test_train_config_refuses_values_that_would_silently_become_defaults(kw, match):
    from linattn.train.config import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_compare_spec_with_sinks():
    from linattn.train import TrainConfig
    from linattn.train.compare import parse_spec, spec_label, spec_name

    f = parse_spec("favor-hedgehog-w16-s2")
    assert (f["kernel"], f["window"], f["sinks"]) == ("hedgehog", 16, 2)
    assert spec_name(TrainConfig(**f)) == "favor-hedgehog-w16-s2"
    assert "2 sinks" in spec_label("favor-hedgehog-w16-s2")
    assert parse_spec("favor-s1")["sinks"] == 1 and parse_spec("favor")["sinks"] == 0
    with pytest.raises(ValueError, match="favor' only"):
        parse_spec("exact-s1")
