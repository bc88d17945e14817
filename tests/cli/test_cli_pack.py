"""Packed training and benchmarking (issue 27 step 2): ``linattn train --pack`` builds
batches of whole examples back to back with ``cu_seqlens``; ``linattn bench --suite
pack`` times packed sequences against the same sequences padded."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from linattn.cli import main
from linattn.models import ModelConfig, SequenceClassifier
from linattn.train import TrainConfig, build_task
from linattn.train.loop import resume_changes
from linattn.train.tasks import pack_documents, step_generator


def _one_line_error(capsys, prog: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


ATTENTIONS = {
    "exact": dict(attention="exact"),
    "favor": dict(attention="favor", num_features=8),
    "favor-hedgehog-w2-s1": dict(attention="favor", kernel="hedgehog", window=2, sinks=1),
    "linformer": dict(attention="linformer", proj_dim=4),
    "linformer-layerwise": dict(attention="linformer", proj_dim=4, linformer_sharing="layerwise"),
}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_packed_classifier_equals_each_example_alone(attention, pooling):
    cfg = ModelConfig(
        vocab_size=11,
        dim=8,
        depth=1,
        heads=2,
        max_seq_len=9,
        num_classes=3,
        pooling=pooling,
        position="learned",
        **ATTENTIONS[attention],
    )
    model = SequenceClassifier(cfg).double().eval()
    lengths = [5, 1, 9, 3]
    ids = torch.randint(0, 11, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    got = model(ids, cu_seqlens=_cu(lengths))
    alone, s = [], 0
    for n in lengths:
        alone.append(model(ids[:, s : s + n])[0])
        s += n
    torch.testing.assert_close(got, torch.stack(alone), rtol=1e-10, atol=1e-12)


def test_pack_documents_packs_whole_documents_up_to_the_budget():
    sizes = [3, 7, 1, 5, 10, 2]
    rows = pack_documents(sizes, 3, 12, torch.Generator().manual_seed(0))
    again = pack_documents(sizes, 3, 12, torch.Generator().manual_seed(0))
    assert rows == again and len(rows) == 3
    for row in rows:
        assert row and sum(sizes[i] for i in row) <= 12
    with pytest.raises(ValueError, match=r"packing needs 1\.\.4"):
        pack_documents(sizes, 1, 4, torch.Generator().manual_seed(0))


def _fortunes_dataset():
    words = ["alpha beta gamma delta epsilon", "one two three four five six seven"]
    rows = [(" ".join(words[i % 2].split()[: 1 + i % 5]) + f" {i}", i % 2) for i in range(60)]
    return {"labels": ["greek", "numbers"], "train": rows[:48], "test": rows[48:]}


def _tiny(**kw):
    base = dict(
        task="fortunes",
        attention="favor",
        dim=8,
        depth=1,
        heads=2,
        num_features=8,
        seq_len=48,
        batch_size=4,
        steps=2,
        eval_every=2,
        eval_batches=1,
        log_every=1,
        checkpoint_every=2,
        pack=True,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("attention", ["favor", "linformer"])
def test_packed_batch_loss_is_the_mean_over_examples_alone(attention):
    cfg = _tiny(attention=attention, proj_dim=8)
    task = build_task(cfg, dataset=_fortunes_dataset())
    torch.manual_seed(0)
    model = task.build_model().double().eval()
    batch = task.batch(3, 0, 1, "cpu")
    cu = batch["cu_seqlens"]
    assert batch["x"].shape == (1, int(cu[-1])) and batch["x"].shape[1] <= 4 * 48
    assert len(batch["y"]) == len(cu) - 1 > 4  # more examples than a padded batch of 4
    alone = [
        F.cross_entropy(model(batch["x"][:, s:e]).float(), y[None])
        for s, e, y in zip(cu[:-1].tolist(), cu[1:].tolist(), batch["y"])
    ]
    want = torch.stack(alone).mean()
    torch.testing.assert_close(task.loss(model, batch), want, rtol=1e-6, atol=1e-7)
    # Two ranks: the mean of their losses (as DDP averages) is the mean over every
    # example of the global batch, which holds whole examples of the same draw.
    halves = [task.batch(1, r, 2, "cpu") for r in range(2)]
    # Ranks with different numbers of examples: their plain means would not average to it.
    assert len(halves[0]["y"]) != len(halves[1]["y"])
    docs = [
        (tuple(b["x"][0, s:e].tolist()), int(y))
        for b in halves
        for s, e, y in zip(b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist(), b["y"])
    ]
    texts = {tuple(ids): label for ids, label in task.splits["train"]}
    assert all(texts[ids] == y for ids, y in docs)
    rows = pack_documents(task._train_sizes, 2, 2 * 48, step_generator(cfg.seed, 1))
    assert len(docs) == sum(len(r) for r in rows)
    mean = sum(
        F.cross_entropy(model(torch.tensor([ids])).float(), torch.tensor([y])) for ids, y in docs
    ) / len(docs)
    ddp = sum(task.loss(model, b) for b in halves) / 2
    torch.testing.assert_close(ddp, mean, rtol=1e-6, atol=1e-7)


def test_pack_round_trips_and_is_part_of_the_run():
    cfg = _tiny()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # A run saved before the field existed was not packed; resuming it with --pack is a
    # changed setting.
    saved = {k: v for k, v in _tiny(pack=False).to_dict().items() if k != "pack"}
    assert resume_changes(saved, _tiny(pack=False)) == {}
    assert resume_changes(saved, cfg) == {"pack": (False, True)}
    with pytest.raises(TypeError, match="pack must be a bool"):
        _tiny(pack="yes")


def test_pack_is_refused_for_the_byte_task_in_one_line(tmp_path, capsys):
    assert main(["train", "--task", "bytes", "--pack", "--out", str(tmp_path / "o")]) == 2
    line = _one_line_error(capsys, "linattn train")
    assert "pack=True needs a task of whole documents" in line and "'bytes'" in line
    assert not (tmp_path / "o").exists()


def _fortune_files(root):
    root.mkdir()
    for topic, words in (("greek", "alpha beta gamma"), ("numbers", "one two three four")):
        quotes = [" ".join([words] * (1 + i % 4)) + f" {i}" for i in range(400)]
        (root / topic).write_text("\n%\n".join(quotes) + "\n")


def test_train_pack_runs_writes_its_files_and_resumes(tmp_path, monkeypatch, capsys):
    from linattn.data import fortunes

    monkeypatch.setattr(fortunes, "FORTUNES_DIR", tmp_path / "fortunes")
    _fortune_files(tmp_path / "fortunes")
    out = tmp_path / "run"
    args = ["train", "--task", "fortunes", "--pack", "--out", str(out)]
    sizes = ["--dim", "8", "--depth", "1", "--heads", "2", "--num-features", "8"]
    steps = ["--seq-len", "32", "--batch-size", "4", "--steps", "3", "--eval-batches", "1"]
    steps += ["--log-every", "1"]
    assert main([*args, *sizes, *steps]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "model"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["pack"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["config"]["pack"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    capsys.readouterr()
    # --resume takes pack from OUT/config.json: the finished run is left as it is.
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out


def _in_process(groups, **_):
    # The suite's cases measured in this process (the worker processes and their
    # interleaving are linattn.bench.speed's, covered by tests/test_bench.py).
    from linattn.bench import checks, worker

    rows = []
    for case in (c for g in groups for c in g):
        row = worker.measure(case)
        rows.append({**row, **checks.summarize(row["times_s"] or [row["median_s"]])})
    return rows


def test_bench_pack_suite_writes_its_files(tmp_path, capsys, monkeypatch):
    from linattn.bench import speed

    monkeypatch.setattr(speed, "run_cases", _in_process)
    out = tmp_path / "b"
    args = ["bench", "--suite", "pack", "--out", str(out), "--heads", "1", "--head-dim", "4"]
    args += ["--num-features", "4", "--repeats", "1", "--windows", "2"]
    args += ["--pack-lengths", "3", "20", "--pack-count", "3"]
    assert main(args) == 0
    for name in ("pack.json", "pack.csv", "pack.png"):
        assert (out / name).exists(), name
    with open(out / "pack.csv") as f:
        rows = list(csv.DictReader(f))
    need = {"method", "form", "window", "pass", "count", "tokens", "padded_tokens", "median_s"}
    assert need | {"padded_over_packed", "peak_added_bytes"} <= set(rows[0])
    forms = {(r["form"], r["pass"]) for r in rows}
    assert forms == {
        (f, p)
        for f in ("bidirectional", "causal", "window", "window causal")
        for p in ("fwd", "fwd+bwd")
    }
    assert {r["method"] for r in rows} == {"packed", "padded"}
    assert all(r["count"] == "3" and not r["error"] for r in rows)
    packed = [r for r in rows if r["method"] == "packed"]
    assert all(float(r["padded_over_packed"]) > 0 for r in packed)
    result = json.loads((out / "pack.json").read_text())
    lengths = result["lengths"]
    assert len(lengths) == 3 and all(3 <= n <= 20 for n in lengths)
    assert all(int(r["tokens"]) == sum(lengths) for r in rows)
    assert all(int(r["padded_tokens"]) == 3 * max(lengths) for r in rows)
    assert "padded/packed" in capsys.readouterr().out
    # --suite favor --pack is the same suite; other suites refuse --pack.
    again = ["bench", "--suite", "favor", "--pack", "--out", str(tmp_path / "b2"), *args[5:]]
    assert main(again) == 0
    assert json.loads((tmp_path / "b2" / "pack.json").read_text())["lengths"] == lengths
    capsys.readouterr()
    assert main(["bench", "--suite", "linformer", "--pack", "--out", str(tmp_path / "x")]) == 2
    assert "--pack" in _one_line_error(capsys, "linattn bench")


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_pack_logs_the_mean_over_the_global_batch(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from linattn.train import read_metrics

    cache = tmp_path / "cache"
    env = {**os.environ, "LINATTN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    flags = ["--task", "listops", "--pack", "--dim", "16", "--depth", "1", "--heads", "2"]
    flags += ["--num-features", "8", "--seq-len", "64", "--listops-min-len", "10"]
    flags += ["--listops-max-len", "60", "--listops-train", "64", "--listops-eval", "16"]
    flags += ["--batch-size", "4", "--steps", "2", "--eval-batches", "1", "--log-every", "1"]
    flags += ["--seed", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(
        [*cmd, "-m", "linattn", "train", *flags, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    first = next(r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train")
    # Step 1's loss (before any update): the mean over every example both ranks packed.
    monkeypatch.setenv("LINATTN_CACHE", str(cache))
    cfg = TrainConfig.from_file(out / "config.json")
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model().train()
    batches = [task.batch(0, rank, 2, "cpu") for rank in range(2)]
    assert len(batches[0]["y"]) != len(batches[1]["y"])  # plain means would not average to it
    with torch.no_grad():
        want = sum(task.loss(model, b) for b in batches) / 2
        examples = sum(len(b["y"]) for b in batches)
        alone = [
            F.cross_entropy(model(b["x"][:, s:e]).float(), y[None], reduction="sum")
            for b in batches
            for s, e, y in zip(b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist(), b["y"])
        ]
    torch.testing.assert_close(want, torch.stack(alone).sum() / examples, rtol=1e-5, atol=1e-6)
    assert first["loss"] == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
