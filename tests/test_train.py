"""Training: short end-to-end runs per task, exact resume, torchrun DDP = one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from linattn.data import listops
from linattn.models import load_model
from linattn.train import TrainConfig, build_task, read_metrics, train


def tiny(task, **kw):
    base = dict(task=task, attention="favor", dim=32, depth=1, heads=2, seq_len=64,
                batch_size=8, steps=30, lr=3e-3, warmup=3, eval_every=15, eval_batches=2,
                log_every=1, checkpoint_every=10, num_features=16)
    base.update(kw)
    return TrainConfig(**base)


def byte_data():
    # Highly regular text: a small model learns it within a few dozen steps.
    text = ("the quick brown fox jumps over the lazy dog. " * 400).encode()
    t = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return {"train": t[:15000], "val": t[15000:17000], "test": t[17000:]}


def listops_splits():
    return listops.splits(train=256, val=32, test=32, seed=0, min_length=10, max_length=60,
                          cache=False)


def fortunes_dataset():
    topics = ["alpha beta gamma delta", "one two three four five"]
    rows = [(f"{topics[i % 2]} {i}", i % 2) for i in range(120)]
    return {"labels": ["greek", "numbers"], "train": rows[:100], "test": rows[100:]}


DATA = {"bytes": {"data": byte_data}, "listops": {"splits": listops_splits},
        "fortunes": {"dataset": fortunes_dataset}}


def make_task(cfg):
    (key, fn), = DATA[cfg.task].items()
    return build_task(cfg, **{key: fn()})


@pytest.mark.parametrize("task,attention", [("bytes", "favor"), ("bytes", "softmax"),
                                            ("listops", "favor"), ("listops", "linformer"),
                                            ("fortunes", "relu")])
def test_short_run_learns_and_writes_its_files(tmp_path, task, attention):
    cfg = tiny(task, attention=attention, steps=40 if task != "bytes" else 30)
    s = train(cfg, tmp_path, task=make_task(cfg), progress=False)
    assert s["finished"]
    first, last = sum(s["losses"][:5]) / 5, sum(s["losses"][-5:]) / 5
    assert last < first
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png",
                 "checkpoint.pt", "model/model.pt"):
        assert (tmp_path / name).exists(), name
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "val"] == [15, 30] if task == "bytes" \
        else [15, 30, 40]
    assert rows[-1]["split"] == "test"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["median_step_s"] > 0 and summary["peak_memory_mb"] > 0
    model = load_model(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == s["parameters"]
    if task == "bytes":
        assert s["test"]["bits_per_byte"] < 8.0  # below the uniform 8 bits per byte


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, attention):
    # Dropout and FAVOR+ redraws make the RNG and redraw state part of what must resume.
    cfg = tiny("bytes", attention=attention, steps=8, dropout=0.1, redraw_interval=3,
               checkpoint_every=100, eval_every=100)
    full = train(cfg, tmp_path / "full", task=make_task(cfg), progress=False)
    part = train(cfg, tmp_path / "cut", task=make_task(cfg), progress=False, stop_after=5)
    assert not part["finished"] and len(part["losses"]) == 5
    rest = train(cfg, tmp_path / "cut", task=make_task(cfg), progress=False, resume=True)
    assert part["losses"] + rest["losses"] == full["losses"]
    a = load_model(tmp_path / "full" / "model").state_dict()
    b = load_model(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")
             if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="causal"):
        TrainConfig(task="bytes", attention="linformer")
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
    args = ["-m", "linattn", "train", "--task", "listops", "--attention", "favor",
            "--listops-train", "64", "--listops-eval", "16", "--listops-min-len", "10",
            "--listops-max-len", "60", "--seq-len", "64", "--dim", "32", "--depth", "2",
            "--heads", "2", "--num-features", "16", "--redraw-interval", "2",
            "--batch-size", "8", "--steps", "5", "--eval-every", "5", "--eval-batches", "1",
            "--log-every", "1", "--warmup", "1", "--out", str(out)]
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *args]
    return [sys.executable, *args]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "LINATTN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for out, nproc in ((tmp_path / "one", None), (tmp_path / "two", 2)):
        r = subprocess.run(_cli(out, nproc), env=env, capture_output=True, text=True,
                           timeout=600)
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
    cfg = TrainConfig(task="listops", dim=32, depth=1, heads=2, seq_len=64, batch_size=8,
                      steps=4, eval_every=4, eval_batches=1, log_every=1, warmup=1,
                      listops_train=32, listops_eval=8, listops_min_len=10,
                      listops_max_len=60, num_features=16, proj_dim=8)
    result = compare(cfg, tmp_path / "cmp", attentions=("softmax", "linformer"),
                     progress=False)
    assert [r["attention"] for r in result["results"]] == ["softmax", "linformer"]
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).exists()
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| exact softmax |" in md and "| Linformer |" in md
    assert all(0 <= r["test"] <= 1 and r["peak_memory_mb"] > 0 for r in result["results"])
