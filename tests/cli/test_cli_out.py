"""A command owns its --out folder: concurrent writers, finished results, huge sizes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from linattn import _io
from linattn.cli import main


def _train_argv(out, *extra):
    return [
        "train",
        "--task",
        "listops",
        "--attention",
        "favor",
        "--listops-train",
        "16",
        "--listops-eval",
        "8",
        "--listops-min-len",
        "10",
        "--listops-max-len",
        "40",
        "--seq-len",
        "48",
        "--depth",
        "1",
        "--heads",
        "2",
        "--num-features",
        "8",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _wait_for(predicate, timeout=120.0, proc=None):
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


# ----------------------------------------------------------------- one writer per folder
def test_two_train_processes_at_one_out(tmp_path):
    # Run A takes the folder; run B (other settings) starts while A holds it (A is
    # paused there, so the overlap is certain): B exits 1 with one line naming the
    # folder and A's pid, and the folder is A's run, complete and loadable.
    from linattn.models import load_model

    out = tmp_path / "run"
    env = {**os.environ, "LINATTN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "linattn"]
    a = subprocess.Popen(
        [*cli, *_train_argv(out, "--dim", "16")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out / _io.LOCK_NAME
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(a.pid), proc=a)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            b = subprocess.run(
                [*cli, *_train_argv(out, "--dim", "32")],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            os.kill(a.pid, signal.SIGCONT)
        _, a_err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, a_err[-3000:]
    assert b.returncode == 1
    lines = b.stderr.strip().splitlines()
    assert len(lines) == 1, b.stderr
    assert str(out) in lines[0] and f"pid {a.pid}" in lines[0], lines[0]
    assert json.loads((out / "config.json").read_text())["dim"] == 16
    assert json.loads((out / "summary.json").read_text())["finished"]
    load_model(out / "model")  # complete and consistent
    assert json.loads((out / "model" / "config.json").read_text())["config"]["dim"] == 16
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line


def _hold(folder):
    # Another process that owns ``folder`` until its stdin closes.
    code = (
        "import sys; from linattn import _io\n"
        f"with _io.folder_lock({str(folder)!r}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_folder_lock_refuses_a_second_owner_and_is_reentrant(tmp_path):
    folder = tmp_path / "out"
    holder = _hold(folder)
    try:
        with pytest.raises(_io.FolderInUseError, match=rf"{folder}.*pid {holder.pid}"):
            with _io.folder_lock(folder):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Released with its process: this one takes it, and again inside (re-entrant).
    with _io.folder_lock(folder) as f, _io.folder_lock(folder):
        assert f == folder
        assert (folder / _io.LOCK_NAME).read_text().strip() == str(os.getpid())
        (folder / "result.json").write_text("{}")  # written: the folder stays
    assert (folder / _io.LOCK_NAME).read_text() == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["approx"],
        ["report"],
        ["bench", "--suite", "generate", "--lengths", "8"],
        ["convert", "--model", "m", "--steps", "0"],
    ],
    ids=["approx", "report", "bench", "convert"],
)
def test_every_command_stops_at_a_folder_in_use(tmp_path, monkeypatch, capsys, argv):
    if argv[0] == "convert":
        pytest.importorskip("transformers")
        monkeypatch.setattr("linattn.cli.convert._check_model", lambda name: False)
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        assert main([*argv, "--out", str(out)]) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {holder.pid}" in err[0] and str(out) in err[0], err


# ----------------------------------------------------------------- no silent overwrite
def test_fresh_train_refuses_a_folder_holding_a_run(tmp_path, monkeypatch, capsys):
    # A fresh run (no --resume) into a finished run's --out is refused (exit 2, one
    # line, nothing touched); --resume leaves the finished run as it is; --overwrite
    # replaces it.
    monkeypatch.setenv("LINATTN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(_train_argv(out, "--dim", "16")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(_train_argv(out, "--dim", "32")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "--resume" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main([*_train_argv(out, "--dim", "32"), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["dim"] == 32
    assert main([*_train_argv(out, "--dim", "32"), "--overwrite", "--resume"]) == 2


def test_report_refuses_to_replace_a_report(tmp_path, monkeypatch, capsys):
    from linattn.bench import report

    calls = []

    def fake(out, **kw):
        calls.append(out)
        (tmp_path / "out" / "index.md").write_text("# report\n")
        return tmp_path / "out" / "index.md"

    monkeypatch.setattr(report, "run", fake)
    out = tmp_path / "out"
    assert main(["report", "--out", str(out)]) == 0
    assert main(["report", "--out", str(out)]) == 2
    assert "index.md" in capsys.readouterr().err and len(calls) == 1
    assert main(["report", "--out", str(out), "--overwrite"]) == 0
    assert len(calls) == 2


@pytest.mark.parametrize(
    "argv,held",
    [
        (["--steps", "0"], "summary.json"),
        (["--recipe", "transfer"], "transfer"),
        (["--sweep"], "sweep.json"),
    ],
    ids=["distill", "transfer", "sweep"],
)
def test_convert_refuses_to_replace_results(tmp_path, monkeypatch, capsys, argv, held):
    pytest.importorskip("transformers")
    from linattn.experiments import convert as experiment

    monkeypatch.setattr("linattn.cli.convert._check_model", lambda name: False)
    calls = []
    for name in ("run", "run_transfer"):
        monkeypatch.setattr(experiment, name, lambda *a, **kw: calls.append(kw) or {})
    monkeypatch.setattr(experiment, "sweep", lambda *a, **kw: calls.append(kw) or {"results": []})
    monkeypatch.setattr(experiment, "format_summary", lambda s: "")
    monkeypatch.setattr(experiment, "format_transfer_summary", lambda s: "")
    out = tmp_path / "out"
    out.mkdir()
    (out / held).mkdir() if held == "transfer" else (out / held).write_text("{}")
    cmd = ["convert", "--model", "m", *argv, "--out", str(out)]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and held in err[0] and "--overwrite" in err[0], err
    assert ("--resume" in err[0]) == (held == "transfer")
    assert not calls
    assert main([*cmd, "--overwrite"]) == 0 and len(calls) == 1
    if held == "transfer":
        assert main([*cmd, "--resume"]) == 0 and calls[-1]["resume"]


# ----------------------------------------------------------------- sizes too large
@pytest.mark.parametrize(
    "argv,flag",
    [
        (["train", "--dim", "1000000", "--heads", "1"], "--dim 1000000"),
        (["train", "--num-features", "1000000000"], "--num-features 1000000000"),
        (["train", "--batch-size", "1000000000"], "--batch-size 1000000000"),
        (
            [
                "train",
                "--task",
                "listops",
                "--attention",
                "linformer",
                "--proj-dim",
                "1000000000000",
            ],
            "--proj-dim 1000000000000",
        ),
        (["convert", "--model", "m", "--num-features", "1000000000000"], "--num-features"),
        (["bench", "--suite", "generate", "--lengths", "1000000000000"], "--lengths"),
        (["bench", "--lengths", "1000000000000"], "--lengths 1000000000000"),
        (["bench", "--head-dim", "1000000000"], "--head-dim 1000000000"),
        (["bench", "--suite", "linformer", "--lengths", "100000000000"], "--lengths"),
        (["bench", "--suite", "peers", "--num-features", "1000000000000"], "--num-features"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v)[:40],
)
def test_huge_sizes_are_refused_before_any_allocation(tmp_path, monkeypatch, capsys, argv, flag):
    # One line naming the size, exit 2, nothing written, no case run: fast.
    if argv[0] == "convert":
        pytest.importorskip("transformers")
        monkeypatch.setattr("linattn.cli.convert._check_model", lambda name: False)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "memory" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 4000000000000 bytes. Error code 12"
        ),
        MemoryError(),
    ],
    ids=["torch-cpu", "python"],
)
def test_out_of_memory_during_the_work_is_one_line(tmp_path, monkeypatch, capsys, error):
    import linattn.train

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(linattn.train, "train", fail)
    argv = ["train", "--steps", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "--dim" in err[0], err
    if isinstance(error, RuntimeError):
        assert "3.6 TB" in err[0]
    with pytest.raises(type(error)):
        main([*argv, "--debug"])
    # Other RuntimeErrors are not hidden.
    monkeypatch.setattr(
        linattn.train, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug"))
    )
    with pytest.raises(RuntimeError, match="bug"):
        main(argv)


def test_failed_bench_cases_end_in_one_error_line(tmp_path, monkeypatch, capsys):
    # `bench --windows 1000000000000` failed its window cases and exited 1 without a word.
    from linattn.cli import bench

    rows = [
        {"pass": "fwd", "method": "favor", "length": 64, "median_s": 0.1},
        {
            "pass": "fwd",
            "method": "favor",
            "length": 64,
            "window": 10**12,
            "error": ["MemoryError"],
        },
    ]
    suite = bench.SUITES["favor"]
    monkeypatch.setitem(
        bench.SUITES, "favor", bench.dataclasses.replace(suite, run=lambda args: ("table", rows))
    )
    argv = ["bench", "--windows", "1000000000000", "--lengths", "64", "--out", str(tmp_path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "table" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 cases failed" in err[0], err
    assert "window=1000000000000" in err[0] and "out of memory" in err[0], err


def test_speed_plot_without_a_successful_case_draws_nothing(tmp_path):
    # All cases failed: no figure (it used to fail with "Number of columns must be a
    # positive integer, not 0" and hide the table's reasons).
    from linattn.bench import speed

    result = {"results": [{"pass": "fwd", "length": 64, "error": ["MemoryError"]}]}
    speed.plot(result, tmp_path / "bench.png")
    assert not (tmp_path / "bench.png").exists()


def test_a_fresh_run_drops_the_previous_runs_checkpoint(tmp_path):
    # --overwrite starts a fresh run: should it stop before its first checkpoint, a later
    # --resume must not find the replaced run's checkpoint beside the new config.
    from linattn.train import TrainConfig, train

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the previous run's")

    class Broken:
        def build_model(self):
            raise RuntimeError("stopped before the first checkpoint")

    with pytest.raises(RuntimeError, match="stopped"):
        train(TrainConfig(steps=1), out, task=Broken(), progress=False)
    assert not (out / "checkpoint.pt").exists()
    assert (out / "config.json").is_file()
