"""Nothing lost, nothing loaded wrong: atomic writes, consistent saves, checked resume.

Fault injection: writes made to fail half-way (monkeypatched) and processes killed with
SIGKILL at random points while they save a model, train, or save a converted model. After
each, the directory loads the old or the new state exactly, or raises CheckpointError;
it never loads a mixture."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import linattn
from linattn import CheckpointError, _io
from linattn.models import CausalLM, ModelConfig, load_model
from linattn.train import TrainConfig, build_task, read_metrics, train

SRC = str(Path(linattn.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is as fast, and steadier on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(kind: str, seed: int = 0) -> CausalLM:
    """A FAVOR+ LM; ``kind``: "favor" (softmax kernel) or "relu" (ReLU kernel)."""
    torch.manual_seed(seed)
    return CausalLM(
        ModelConfig(
            vocab_size=13,
            dim=16,
            depth=1,
            heads=2,
            causal=True,
            attention="favor",
            kernel="softmax" if kind == "favor" else kind,
            num_features=8,
            max_seq_len=32,
        )
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------ the write helper
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "result.json"
    _io.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError, match="disk"), _io.atomic_open(target, "w") as f:
        f.write('{"new": ')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp left


def test_atomic_directory_keeps_the_old_folder_when_the_write_fails(tmp_path):
    target = tmp_path / "ckpt"
    with _io.atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), _io.atomic_directory(target) as d:
        (d / "a.txt").write_text("ne")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "old"
    with _io.atomic_directory(target) as d:
        (d / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_a_running_writer_are_not_removed(tmp_path):
    # A write removes what killed earlier writes of the same path left, but not the
    # temporaries of another process's write in flight (its pid is in their names): two
    # writers of one folder must not delete each other's files.
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for target, write in (
            (tmp_path / "result.json", lambda p: _io.write_json(p, {"new": 1})),
            (tmp_path / "ckpt", lambda p: _io.atomic_directory(p).__enter__()),
        ):
            in_flight = tmp_path / f".{target.name}.{live.pid}-abcd1234.tmp"
            stale = tmp_path / f".{target.name}.{dead.pid}-abcd1234.tmp"
            legacy = tmp_path / f".{target.name}.abcd1234.tmp"
            # A live pid on a temporary older than any write: the pid was reused.
            reused = tmp_path / f".{target.name}.{live.pid}-old12345.tmp"
            for p in (in_flight, stale, legacy, reused):
                p.write_text("partial")
            old = time.time() - _io.LEFTOVER_AGE - 60
            os.utime(reused, (old, old))
            write(target)
            assert in_flight.read_text() == "partial"
            assert not stale.exists() and not legacy.exists() and not reused.exists()
    finally:
        live.stdin.close()
        live.wait(timeout=60)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "relative-link"])
def test_atomic_directory_writes_through_a_symlink(tmp_path, relative):
    # A path that is a symlink to a folder: the folder it points to gets the new content,
    # the link stays a link, and no temporary is left beside either.
    real = tmp_path / "store" / "real"
    with _io.atomic_directory(real) as d:
        (d / "a.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(Path("store/real") if relative else real, target_is_directory=True)
    with _io.atomic_directory(link) as d:
        (d / "a.txt").write_text("new")
    assert link.is_symlink() and (real / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "store"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["real"]


def test_atomic_write_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "data" / "result.json"
    real.parent.mkdir()
    _io.write_json(real, {"old": 1})
    (tmp_path / "result.json").symlink_to(real)
    _io.write_json(tmp_path / "result.json", {"new": 1})
    assert (tmp_path / "result.json").is_symlink()
    assert json.loads(real.read_text()) == {"new": 1}
    assert sorted(p.name for p in real.parent.iterdir()) == ["result.json"]


def test_read_metrics_stops_at_a_line_torn_by_a_kill(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n{"step": 3, "sp')
    assert [r["step"] for r in read_metrics(f)] == [1, 2]


@pytest.mark.parametrize("package", ["train", "models", "integrations/hf"])
def test_result_writers_go_through_the_atomic_helpers(package):
    # A direct write (write_text, torch.save, savefig, open for writing) in these packages
    # would bypass linattn._io; the append-only logs (metrics.jsonl, log.jsonl) are the
    # exception, and a torn last line of them is ignored by their readers.
    import re

    root = Path(linattn.__file__).parent / package
    pattern = re.compile(
        r"\.write_text\(|\.write_bytes\(|torch\.save\(|\.savefig\(|"
        r"open\(\s*[\"']w|\.open\(\s*[\"']w"
    )
    offenders = [
        f"{f.name}:{i}: {line.strip()}"
        for f in sorted(root.glob("*.py"))
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line) and "log.jsonl" not in line
    ]
    assert offenders == []


# ------------------------------------------------------------------ model save / load
@pytest.mark.parametrize("fail_at", [1, 2], ids=["during-weights", "between-files"])
def test_interrupted_model_save_never_loads_the_wrong_model(tmp_path, monkeypatch, fail_at):
    old, new = small_model("relu", 0), small_model("favor", 1)
    old.save(tmp_path)
    calls = []
    real = os.replace

    def replace(a, b):
        calls.append(b)
        if len(calls) == fail_at:
            raise OSError("simulated crash")
        return real(a, b)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        new.save(tmp_path)
    monkeypatch.undo()
    if fail_at == 1:
        loaded = load_model(tmp_path)
        assert loaded.cfg.kernel == "relu" and same_weights(loaded, old)
    else:
        # New weights beside the old config: refused, not loaded as a relu model.
        with pytest.raises(CheckpointError, match="different saves"):
            load_model(tmp_path)


@pytest.mark.parametrize("swap", ["weights", "config"])
def test_config_and_weights_of_different_models_are_refused(tmp_path, swap):
    # The state an interrupted in-place save used to leave: one file of each model.
    small_model("relu").save(tmp_path / "a")
    small_model("favor").save(tmp_path / "b")
    name = "model.pt" if swap == "weights" else "config.json"
    (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(CheckpointError, match="different saves"):
        load_model(tmp_path / "a")


def _damage(d: Path, how: str) -> None:
    weights, config = d / "model.pt", d / "config.json"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "random":
        weights.write_bytes(random.Random(0).randbytes(4096))
    elif how == "pickled-object":
        import pickle

        weights.write_bytes(pickle.dumps(random.Random(0)))
    elif how == "not-a-state-dict":
        torch.save({"weights": [1, 2, 3]}, weights)
    elif how == "mis-shaped":
        torch.save(
            small_model("favor").state_dict() | {"encoder.tok.weight": torch.zeros(3, 3)}, weights
        )
    elif how == "missing-keys":
        torch.save({"encoder.tok.weight": torch.zeros(13, 16)}, weights)
    elif how == "missing-weights":
        weights.unlink()
    elif how == "missing-config":
        config.unlink()
    elif how == "bad-json":
        config.write_text(config.read_text()[:40])
    elif how == "config-not-object":
        config.write_text("[1, 2]")
    elif how == "unknown-class":
        meta = json.loads(config.read_text())
        config.write_text(json.dumps({**meta, "class": "Nope"}))
    elif how == "invalid-config":
        meta = json.loads(config.read_text())
        config.write_text(json.dumps({**meta, "config": {**meta["config"], "dim": -4}}))
    elif how == "missing-folder":
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


DAMAGE = [
    "truncated",
    "empty",
    "random",
    "pickled-object",
    "not-a-state-dict",
    "mis-shaped",
    "missing-keys",
    "missing-weights",
    "missing-config",
    "bad-json",
    "config-not-object",
    "unknown-class",
    "invalid-config",
    "missing-folder",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_saved_model_raises_one_error_naming_the_file(tmp_path, how):
    d = tmp_path / "saved"
    small_model("favor").save(d)
    _damage(d, how)
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    msg = str(info.value)
    assert str(d) in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert isinstance(info.value, ValueError)


def test_load_model_reads_weights_with_weights_only(tmp_path, monkeypatch):
    small_model("favor").save(tmp_path)
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(tmp_path)
    assert seen == [True]


# ------------------------------------------------------------------ training: resume
def tiny(**kw) -> TrainConfig:
    base = dict(
        task="bytes",
        attention="favor",
        dim=16,
        depth=1,
        heads=2,
        seq_len=32,
        batch_size=4,
        steps=12,
        lr=3e-3,
        warmup=2,
        eval_every=6,
        eval_batches=1,
        log_every=1,
        checkpoint_every=4,
        num_features=8,
    )
    base.update(kw)
    return TrainConfig(**base)


def byte_data():
    text = ("the quick brown fox jumps over the lazy dog. " * 100).encode()
    t = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return {"train": t[:3000], "val": t[3000:3800], "test": t[3800:]}


def task_for(cfg):
    return build_task(cfg, data=byte_data())


class Interrupting:
    """A task that raises KeyboardInterrupt (as SIGINT does) before step ``at``."""

    def __init__(self, task, at: int):
        self.task, self.at = task, at

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, step, *args):
        if step == self.at:
            raise KeyboardInterrupt
        return self.task.batch(step, *args)


def test_sigint_then_resume_gives_the_same_weights_and_no_duplicate_steps(tmp_path):
    cfg = tiny(dropout=0.1, redraw_interval=3)
    train(cfg, tmp_path / "full", task=task_for(cfg), progress=False)
    with pytest.raises(KeyboardInterrupt):
        # Checkpoints at 4 and 8; steps 9 and 10 are logged, then lost.
        train(cfg, tmp_path / "cut", task=Interrupting(task_for(cfg), 10), progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")][-1] == 10
    train(cfg, tmp_path / "cut", task=task_for(cfg), progress=False, resume=True)
    rows = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    for split in ("train", "val", "test"):
        steps = [r["step"] for r in rows if r["split"] == split]
        assert len(steps) == len(set(steps)), (split, steps)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    strip = ("step_s", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in full
    ]
    assert same_weights(
        load_model(tmp_path / "full" / "model"), load_model(tmp_path / "cut" / "model")
    )


def test_resume_of_a_finished_run_touches_nothing(tmp_path):
    cfg = tiny(steps=6)
    first = train(cfg, tmp_path, task=task_for(cfg), progress=False)
    before = snapshot(tmp_path)
    again = train(cfg, tmp_path, task=task_for(cfg), progress=False, resume=True)
    assert again["already_finished"] and again["finished"]
    assert again["val"] == first["val"] and again["test"] == first["test"]
    assert snapshot(tmp_path) == before


def test_cli_resume_of_a_finished_run_is_a_clear_no_op(tmp_path, capsys):
    from linattn.cli import main

    args = [
        "train",
        "--task",
        "listops",
        "--listops-train",
        "32",
        "--listops-eval",
        "8",
        "--listops-min-len",
        "10",
        "--listops-max-len",
        "40",
        "--seq-len",
        "48",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--num-features",
        "8",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(tmp_path) == before


def test_resume_with_changed_settings_is_refused_and_touches_nothing(tmp_path):
    cfg = tiny()
    train(cfg, tmp_path, task=task_for(cfg), progress=False, stop_after=5)
    before = snapshot(tmp_path)
    changed = tiny(lr=0.5, dim=32, kernel="relu")
    with pytest.raises(ValueError) as info:
        train(changed, tmp_path, task=task_for(changed), progress=False, resume=True)
    msg = str(info.value)
    for text in ("lr 0.003 -> 0.5", "dim 16 -> 32", "kernel 'softmax' -> 'relu'"):
        assert text in msg
    assert "num_features" not in msg and "eval_every" in msg  # named as allowed
    assert snapshot(tmp_path) == before
    # Intervals may change: they only change what is recorded.
    ok = tiny(eval_every=3, log_every=2, checkpoint_every=6, eval_batches=2)
    s = train(ok, tmp_path, task=task_for(ok), progress=False, resume=True)
    assert s["finished"]
    assert json.loads((tmp_path / "config.json").read_text())["eval_every"] == 3


def test_resume_from_a_damaged_checkpoint_raises_checkpoint_error(tmp_path):
    cfg = tiny(steps=8)
    train(cfg, tmp_path, task=task_for(cfg), progress=False, stop_after=4)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        train(cfg, tmp_path, task=task_for(cfg), progress=False, resume=True)
    assert snapshot(tmp_path) == before


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(steps=8)
    train(cfg, tmp_path, task=task_for(cfg), progress=False, stop_after=4)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real = torch.save

    def half_then_crash(obj, f, *a, **k):
        real(obj, f, *a, **k)
        f.truncate(100)
        raise OSError("simulated crash while writing the checkpoint")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, tmp_path, task=task_for(cfg), progress=False, resume=True, stop_after=4)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    s = train(cfg, tmp_path, task=task_for(cfg), progress=False, resume=True)
    assert s["finished"]


BAD_TRAIN_CONFIGS = [
    (dict(warmup=-3), "warmup"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=0.0), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(dropout=1.0), "dropout"),
    (dict(betas=(0.9, 1.2)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(num_features=0), "num_features"),
    (dict(redraw_interval=0), "redraw_interval"),
    (dict(proj_dim=0), "proj_dim"),
    (dict(ff_mult=0), "ff_mult"),
    (dict(seed=-1), "seed"),
    (dict(listops_train=0), "listops_train"),
    (dict(steps=-5), "steps"),
    (dict(listops_min_len=50, listops_max_len=10), "listops_min_len"),
    (dict(eval_every=1.5), "eval_every"),
    (dict(lr="fast"), "lr"),
]


@pytest.mark.parametrize(
    "kw,field",
    BAD_TRAIN_CONFIGS,
    ids=[f"{field}={next(iter(kw.values()))!r}" for kw, field in BAD_TRAIN_CONFIGS],
)
def test_train_config_range_checks_name_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        TrainConfig(**kw)


# ------------------------------------------------------------------ SIGKILL at random points
def _killed_at_random(script: str, tmp_path: Path, ready: Path, seed: int, spread: float) -> None:
    """Run ``script`` in a fresh process; once it has created ``ready``, SIGKILL it after
    a random delay in [0, spread) seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, TESTS]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child never got ready")
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, spread))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


SAVE_LOOP = """
import pathlib, sys, torch
from linattn.models import CausalLM, ModelConfig
def small(attention, seed):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=13, dim=16, depth=1, heads=2, causal=True,
                                attention="favor", kernel=attention, num_features=8,
                                max_seq_len=32))
models = [small("relu", 0), small("softmax", 1)]
models[0].save("ref_relu"); models[1].save("ref_favor")
models[0].save("target")
pathlib.Path("ready").touch()
i = 1
while True:
    models[i % 2].save("target")
    i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_model_save_killed_at_random_loads_old_or_new_or_raises(tmp_path, seed):
    _killed_at_random(SAVE_LOOP, tmp_path, tmp_path / "ready", seed, spread=0.5)
    refs = [load_model(tmp_path / "ref_relu"), load_model(tmp_path / "ref_favor")]
    try:
        got = load_model(tmp_path / "target")
    except CheckpointError:
        got = None
    assert got is None or any(got.cfg == r.cfg and same_weights(got, r) for r in refs)
    # The next save works and clears what the killed one left behind.
    refs[0].save(tmp_path / "target")
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["config.json", "model.pt"]
    assert same_weights(load_model(tmp_path / "target"), refs[0])


TRAIN_STEPS = 24
TRAIN_RUN = """
import pathlib, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_persistence import killed_run_config, task_for
from linattn.train import train
cfg = killed_run_config()
pathlib.Path("ready").touch()
train(cfg, "run", task=task_for(cfg), progress=False)
"""


def killed_run_config() -> TrainConfig:
    return tiny(steps=TRAIN_STEPS, checkpoint_every=3, eval_every=7)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of the kill tests (one thread, as the killed child)."""
    out = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = killed_run_config()
        train(cfg, out, task=task_for(cfg), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_training_killed_at_random_resumes_to_the_same_result(tmp_path, seed, uninterrupted):
    _killed_at_random(TRAIN_RUN.format(tests=TESTS), tmp_path, tmp_path / "ready", seed, spread=4.0)
    run = tmp_path / "run"
    reference = load_model(uninterrupted / "model").state_dict()
    if (run / "model").exists():
        # Whatever is there loads right or is refused.
        try:
            model = load_model(run / "model")
        except CheckpointError:
            pass
        else:
            torch.testing.assert_close(model.state_dict(), reference, rtol=1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = killed_run_config()
        train(cfg, run, task=task_for(cfg), progress=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, TRAIN_STEPS + 1))
    assert [r["step"] for r in rows if r["split"] == "val"] == [7, 14, 21, 24]
    assert [r["split"] for r in rows].count("test") == 1
    torch.testing.assert_close(
        load_model(run / "model").state_dict(), reference, rtol=1e-5, atol=1e-6
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["val"]["step"] == TRAIN_STEPS


# ------------------------------------------------------------------ converted models
def _hf():
    pytest.importorskip("transformers")
    from hf_models import ids, tiny_bert
    from linattn.integrations.hf import convert, load_converted, save_converted

    return tiny_bert, ids, convert, load_converted, save_converted


def _converted_pair():
    tiny_bert, ids, convert, *_ = _hf()
    a = convert(tiny_bert(0), "favor", num_features=16, kernel="relu")
    b = convert(tiny_bert(1), "favor", num_features=8)
    return a, b, ids(2, 9)


def _matches(model, ref, x) -> bool:
    # Reloaded float64 weights may take other BLAS paths (~1e-16); the two saved models
    # differ at order 1.
    return type(model) is type(ref) and torch.allclose(
        model(x).last_hidden_state, ref(x).last_hidden_state, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("where", ["weights-half-written", "before-swap", "between-renames"])
def test_interrupted_save_converted_never_loads_wrong(tmp_path, monkeypatch, where):
    _, _, _, load_converted, save_converted = _hf()
    old, new, x = _converted_pair()
    target = tmp_path / "ckpt"
    save_converted(old, target)
    (target / "tokenizer.json").write_text("{}")  # a file the save must keep
    if where == "weights-half-written":
        real = type(new).save_pretrained

        def crash(self, path, **kw):
            real(self, path, **kw)
            f = Path(path) / "model.safetensors"
            f.write_bytes(f.read_bytes()[:1000])
            raise OSError("simulated crash")

        monkeypatch.setattr(type(new), "save_pretrained", crash)
    elif where == "before-swap":
        monkeypatch.setattr(
            _io, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("simulated crash"))
        )
    else:
        # No atomic exchange on this system, and a crash between the two renames.
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
        real_replace, calls = os.replace, []

        def replace(a, b):
            calls.append(b)
            if len(calls) == 2:
                raise OSError("simulated crash")
            return real_replace(a, b)

        monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save_converted(new, target)
    monkeypatch.undo()
    if where == "between-renames":
        with pytest.raises(CheckpointError, match="no such folder"):
            load_converted(target)
        return
    assert _matches(load_converted(target).eval(), old.eval(), x)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temp left


def test_save_converted_through_a_symlink_updates_its_target(tmp_path):
    _, _, _, load_converted, save_converted = _hf()
    old, new, x = _converted_pair()
    save_converted(old, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    save_converted(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert _matches(load_converted(tmp_path / "real").eval(), new.eval(), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_save_converted_replaces_and_keeps_other_files(tmp_path):
    _, _, _, load_converted, save_converted = _hf()
    old, new, x = _converted_pair()
    save_converted(old, tmp_path / "c")
    (tmp_path / "c" / "notes.txt").write_text("mine")
    save_converted(new, tmp_path / "c")
    assert _matches(load_converted(tmp_path / "c").eval(), new.eval(), x)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "how",
    [
        "missing-folder",
        "missing-config",
        "bad-json",
        "missing-weights",
        "truncated",
        "empty",
        "random",
    ],
)
def test_damaged_converted_model_raises_checkpoint_error(tmp_path, how):
    _, _, _, load_converted, save_converted = _hf()
    old, _, _ = _converted_pair()
    d = tmp_path / "c"
    save_converted(old, d)
    weights = d / "model.safetensors"
    if how == "missing-folder":
        d = tmp_path / "nowhere"
    elif how == "missing-config":
        (d / "config.json").unlink()
    elif how == "bad-json":
        (d / "config.json").write_text('{"a": ')
    elif how == "missing-weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:3000])
    elif how == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(CheckpointError) as info:
        load_converted(d)
    assert str(d) in str(info.value)
    assert "Repo id" not in str(info.value)


CONVERT_LOOP = """
import pathlib, sys, torch
sys.path.insert(0, {tests!r})
from hf_models import tiny_bert
from linattn.integrations.hf import convert, save_converted
a = convert(tiny_bert(0), "favor", num_features=16, kernel="relu")
b = convert(tiny_bert(1), "favor", num_features=8)
save_converted(a, "ref_a"); save_converted(b, "ref_b"); save_converted(a, "target")
pathlib.Path("ready").touch()
i = 1
while True:
    save_converted((a, b)[i % 2], "target")
    i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_save_converted_killed_at_random_loads_old_or_new_or_raises(tmp_path, seed):
    _, ids, _, load_converted, _ = _hf()
    _killed_at_random(
        CONVERT_LOOP.format(tests=TESTS), tmp_path, tmp_path / "ready", seed, spread=0.6
    )
    x = ids(2, 9)
    refs = [load_converted(tmp_path / "ref_a").eval(), load_converted(tmp_path / "ref_b").eval()]
    try:
        got = load_converted(tmp_path / "target").eval()
    except CheckpointError:
        got = None
    assert got is None or any(_matches(got, r, x) for r in refs)
    # The next save works and clears what the killed one left behind.
    _hf()[4](refs[1], tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "ref_a", "ref_b", "target"]
    assert _matches(load_converted(tmp_path / "target").eval(), refs[1], x)


# ------------------------------------------------------------------ convert --steps 0
class SavingTokenizer:
    """The byte tokenizer of hf_models, plus save_pretrained (as a real tokenizer has)."""

    def __init__(self):
        from hf_models import ByteTokenizer

        self.inner = ByteTokenizer()
        self.pad_token = self.eos_token = "<pad>"

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def test_convert_with_zero_steps_converts_measures_and_saves(tmp_path, monkeypatch, capsys):
    tiny_bert, _, _, load_converted, _ = _hf()
    from hf_models import TEXTS
    from linattn.cli import main
    from linattn.experiments import convert as experiment

    monkeypatch.setattr(
        experiment, "load_pretrained", lambda name: (tiny_bert().float(), SavingTokenizer())
    )
    monkeypatch.setattr(
        experiment,
        "corpus_texts",
        lambda corpus, train, test, seed=0: (TEXTS[:train], TEXTS[:test]),
    )
    monkeypatch.setattr("linattn.cli.convert._check_model", lambda name: None)
    code = main(
        [
            "convert",
            "--model",
            "tiny",
            "--steps",
            "0",
            "--num-features",
            "16",
            "--eval-texts",
            "8",
            "--train-texts",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distill"]["steps"] == 0 and summary["after"] == summary["before"]
    assert not (tmp_path / "log.jsonl").exists()
    loaded = load_converted(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "tokenizer_config.json").exists()
    assert loaded.config.linattn_conversion["options"]["num_features"] == 16
    assert "checkpoint/" in capsys.readouterr().out


def test_folder_lock_leaves_no_trace_when_nothing_was_written(tmp_path):
    # A command refused after taking its --out (e.g. bench --suite gpu without CUDA)
    # leaves neither the folder nor the parents the lock created; a folder that existed,
    # or that received a file, stays.
    out = tmp_path / "a" / "b" / "run"
    with _io.folder_lock(out):
        assert (out / _io.LOCK_NAME).exists()
    assert not (tmp_path / "a").exists()
    with _io.folder_lock(out):
        (out / "result.json").write_text("{}")
    assert (out / "result.json").exists() and not (out / _io.LOCK_NAME).read_text()
    kept = tmp_path / "kept"
    kept.mkdir()
    with _io.folder_lock(kept):
        pass
    assert kept.is_dir()
