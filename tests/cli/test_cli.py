"""The command line: help that answers questions, and errors that are one line."""

import importlib.metadata
import subprocess
import sys

import pytest

from linattn import cli
from linattn.cli import main


def one_line_error(capsys, prog: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def forbid(monkeypatch, module, name="run"):
    """Fail the test if the work starts (errors must come before it)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} started despite a bad command line")

    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--steps", "-5"], "--steps: must be >= 1, got -5"),
        (["train", "--steps", "abc"], "expected an integer, got 'abc'"),
        (["train", "--num-features", "0"], "--num-features: must be >= 1"),
        (["train", "--task", "nope"], "invalid choice: 'nope'"),
        (["train", "--attention", "relu"], "invalid choice: 'relu'"),
        (["train", "--lr", "-1"], "lr must be"),
        (["train", "--task", "bytes", "--attention", "linformer"], "Linformer cannot be causal"),
        (["report", "--quick", "--full"], "not allowed with argument"),
        (["bench", "--suite", "generate", "--heads", "4"], "does not use --heads"),
        (["bench", "--suite", "linformer", "--passes", "fwd"], "does not use --passes"),
        (["convert", "--model", "no-such-model"], "expected 'minilm', 'smollm2' or a local"),
        (["convert", "--model", "minilm", "--kernel", "nope"], "invalid choice: 'nope'"),
        (["convert", "--model", "minilm", "--steps", "-1"], "--steps: must be >= 0"),
    ],
    ids=[
        "steps-negative",
        "steps-text",
        "num-features-0",
        "task",
        "attention",
        "lr",
        "bytes-linformer",
        "quick-full",
        "bench-heads",
        "bench-passes",
        "convert-model",
        "convert-kernel",
        "convert-steps",
    ],
)
def test_bad_values_give_one_line_and_exit_2(argv, needle, tmp_path, monkeypatch, capsys):
    from linattn import train as train_pkg
    from linattn.bench import report, speed

    for module, name in ((train_pkg, "train"), (report, "run"), (speed, "run")):
        forbid(monkeypatch, module, name)
    if argv[0] == "convert":
        pytest.importorskip("transformers")
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert needle in one_line_error(capsys, f"linattn {argv[0]}")


@pytest.mark.parametrize(
    "content", ["{bad", "[1, 2]", '{"stepz": 3}'], ids=["bad-json", "not-object", "unknown-key"]
)
def test_bad_config_file(content, tmp_path, monkeypatch, capsys):
    from linattn import train as train_pkg

    forbid(monkeypatch, train_pkg, "train")
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys, "linattn train")
    assert str(path) in line or "stepz" in line


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in one_line_error(capsys, "linattn train")


@pytest.mark.parametrize("command", ["approx", "report", "bench", "train"])
def test_unwritable_out_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    from linattn import train as train_pkg
    from linattn.bench import approx, report, speed

    for module, name in ((approx, "run"), (report, "run"), (speed, "run"), (train_pkg, "train")):
        forbid(monkeypatch, module, name)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([command, "--out", str(blocker / "sub")]) == 2
    assert "cannot write there" in one_line_error(capsys, f"linattn {command}")
    assert main([command, "--out", str(blocker)]) == 2
    assert "is a file" in one_line_error(capsys, f"linattn {command}")


def test_missing_data_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    from linattn.data import fortunes

    monkeypatch.setattr(fortunes, "FORTUNES_DIR", tmp_path / "none")
    assert (
        main(
            [
                "train",
                "--task",
                "fortunes",
                "--steps",
                "1",
                "--dim",
                "16",
                "--depth",
                "1",
                "--heads",
                "1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    line = one_line_error(capsys, "linattn train")
    assert "apt-get install fortunes" in line and "LINATTN_FORTUNES" in line


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(cli.UsageError, match="must be >= 1"):
        main(["--debug", "train", "--steps", "-5"])
    monkeypatch.setenv("LINATTN_DEBUG", "1")
    with pytest.raises(cli.UsageError):
        main(["train", "--steps", "-5"])


def test_help_lists_choices_and_defaults(capsys):
    from linattn import KERNELS
    from linattn.nn.linformer import PROJ_KINDS, SHARING

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--task {bytes,listops,fortunes}" in text
    assert "--attention {exact,favor,linformer}" in text
    assert "--kernel {" + ",".join(KERNELS) + "}" in text
    assert "(default: 1000)" in text and "(default: favor)" in text
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, values in (
        ("--kernel", KERNELS),
        ("--proj-kind", PROJ_KINDS),
        ("--sharing", SHARING),
    ):
        assert f"{flag} {{{','.join(values)}}}" in text
    assert "default: distill 300, transfer 600" in text and "(default: results/convert)" in text
    for command in ("bench", "approx", "convert", "train", "report"):
        parser = cli.build_parser()
        sub = parser._subparsers._group_actions[0].choices[command]
        assert sub.description, command
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "debug"):
                assert action.help, (command, action.dest)
                shown = sub.formatter_class("x")._get_help_string(action)
                assert action.default in (None, False) or "default" in shown, (command, action.dest)
                if action.default is None and not action.required:  # stated in words
                    assert "default" in action.help, (command, action.dest)


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == (f"linattn {importlib.metadata.version('linattn')}")
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: linattn") and "train" in out and "report" in out


def test_entry_point_prints_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "linattn", "train", "--steps", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "linattn train: error: argument --steps: must be >= 1, got -5"


def test_linformer_flag_defaults_are_linformer_options():
    from linattn import LinformerOptions

    sub = cli.build_parser()._subparsers._group_actions[0].choices["convert"]
    # convert's flags default to None (so that a Linformer flag given with --method favor
    # is refused) and state LinformerOptions' values, which convert() then applies.
    actions = {a.dest: a for a in sub._actions}
    for name, value in vars(LinformerOptions()).items():
        assert actions[name].default is None
        assert f"(default: {value})" in actions[name].help
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    # train's flags default to None and take TrainConfig's (LinformerOptions') values.
    assert {a.dest: a.default for a in train._actions}["proj_dim"] is None


def test_recipe_defaults_are_the_config_dataclasses():
    pytest.importorskip("transformers")
    from linattn import FavorOptions
    from linattn.experiments.recipes import RECIPES, recipe_defaults
    from linattn.integrations.hf.distill import DistillConfig
    from linattn.integrations.hf.transfer import TransferConfig

    distill = recipe_defaults("distill")
    assert distill["kernel"] == FavorOptions().kernel and distill["window"] is None
    for name in (
        "steps",
        "batch_size",
        "max_length",
        "lr",
        "warmup",
        "eval_every",
        "train",
        "lora_rank",
        "checkpoint_every",
    ):
        assert distill[name] == getattr(DistillConfig(), name), name
    assert not any(k.startswith("transfer_") for k in distill)
    transfer = recipe_defaults("transfer")
    for name in ("steps", "batch_size", "max_length", "lr", "warmup"):
        assert transfer["transfer_" + name] == getattr(TransferConfig(), name), name
    assert RECIPES["transfer"].transfer == TransferConfig()
    # The documented recipe (docs/results/hf_transfer.md): 400 transfer steps, then 600
    # LoRA distillation steps at lr 1e-3 with 10 warm-up steps.
    assert (
        transfer["transfer_steps"],
        transfer["steps"],
        transfer["lr"],
        transfer["warmup"],
        transfer["train"],
        transfer["kernel"],
        transfer["num_features"],
        transfer["window"],
    ) == (400, 600, 1e-3, 10, "lora", "hedgehog", 64, 16)


def test_decoders_get_the_decoder_recipe(tmp_path, monkeypatch):
    # `--recipe transfer` on a causal LM takes DECODER_RECIPES' SmolLM2 settings (window
    # 64, 200 transfer steps, 60 LoRA steps at lr 1e-4), an encoder the MiniLM ones; a
    # flag still replaces either; a recipe with no decoder form is the same for both.
    pytest.importorskip("transformers")
    import json

    from linattn.experiments import convert as experiment
    from linattn.experiments import recipes
    from linattn.experiments.pretrained import is_decoder

    enc, dec = tmp_path / "enc", tmp_path / "dec"
    for folder, arch in ((enc, "BertModel"), (dec, "LlamaForCausalLM")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    assert is_decoder(str(dec)) and not is_decoder(str(enc))
    assert is_decoder("smollm2") and not is_decoder("minilm")
    with pytest.raises(ValueError, match=r"config\.json"):
        is_decoder(str(tmp_path / "none"))
    assert recipes.recipe_for("distill", True) is recipes.RECIPES["distill"]
    assert recipes.recipe_for("transfer", False) is recipes.RECIPES["transfer"]
    with pytest.raises(ValueError, match="recipe"):
        recipes.recipe_for("other")
    d = recipes.recipe_defaults("transfer", decoder=True)
    assert (d["window"], d["transfer_steps"], d["steps"], d["lr"], d["train"]) == (
        64,
        200,
        60,
        1e-4,
        "lora",
    )
    seen = {}
    monkeypatch.setattr(experiment, "run_transfer", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(experiment, "format_transfer_summary", lambda s: "")
    for folder, recipe in ((dec, recipes.DECODER_RECIPES["transfer"]), (enc, None)):
        recipe = recipe or recipes.RECIPES["transfer"]
        argv = ["convert", "--model", str(folder), "--recipe", "transfer"]
        assert main([*argv, "--out", str(tmp_path / "o1")]) == 0
        assert seen["config"] == recipe.distill
        assert seen["options"]["window"] == recipe.favor.window
        assert seen["transfer_config"].steps == recipe.transfer.steps
        assert main([*argv, "--window", "8", "--out", str(tmp_path / "o2")]) == 0
        assert seen["options"]["window"] == 8


@pytest.mark.parametrize("recipe", ["distill", "transfer"])
def test_convert_runs_the_recipe_configs(recipe, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import dataclasses

    from linattn.experiments import convert as experiment
    from linattn.experiments import recipes

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(experiment, "run", fake)
    monkeypatch.setattr(experiment, "run_transfer", fake)
    monkeypatch.setattr(experiment, "format_summary", lambda s: "")
    monkeypatch.setattr(experiment, "format_transfer_summary", lambda s: "")
    monkeypatch.setattr(cli.convert, "_check_model", lambda name: None)
    argv = ["convert", "--model", "m", "--recipe", recipe, "--out", str(tmp_path)]
    assert main(argv) == 0
    r = recipes.RECIPES[recipe]
    assert seen["config"] == r.distill
    assert seen["options"]["kernel"] == r.favor.kernel
    if recipe == "transfer":
        assert seen["options"]["window"] == r.favor.window
        # One --eval-every for both stages; a transfer checkpoint at each evaluation.
        assert seen["transfer_config"] == dataclasses.replace(
            r.transfer, eval_every=r.distill.eval_every, checkpoint_every=r.distill.eval_every
        )
    # A flag replaces the recipe's value.
    assert main([*argv, "--lr", "0.5", "--steps", "7"]) == 0
    assert seen["config"] == dataclasses.replace(r.distill, lr=0.5, steps=7)


def test_eval_is_a_command_and_checks_its_flags_before_loading(capsys, tmp_path, monkeypatch):
    from linattn.experiments import long_context

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint" in text and "--overwrite" in text
    forbid(monkeypatch, long_context)
    assert main(["eval", "--out", str(tmp_path / "e")]) == 2
    assert "--model" in one_line_error(capsys, "linattn eval")
    # An --out holding an earlier evaluation is refused unless --overwrite.
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text("{}")
    assert main(["eval", "--model", "smollm2", "--out", str(tmp_path / "e")]) == 2
    assert "--overwrite" in one_line_error(capsys, "linattn eval")


@pytest.mark.parametrize(
    "flag", [["--num-features", "0"], ["--warmup", "-3"]], ids=["num-features-0", "warmup-neg"]
)
def test_cli_train_refuses_before_any_work(tmp_path, flag):
    from linattn.cli import main

    out = tmp_path / "run"
    try:
        rc = main(["train", "--steps", "1", "--out", str(out), *flag])
    except (ValueError, SystemExit) as err:
        rc = err.code if isinstance(err, SystemExit) else 1
    assert rc not in (0, None)
    assert not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------- command line
def test_train_flag_reaches_the_model(monkeypatch, tmp_path, capsys):
    from linattn import train as train_pkg
    from linattn.cli import main
    from linattn.models import CausalLM
    from linattn.train.tasks import ByteLM

    seen = {}

    def fake_train(cfg, out, resume=False):
        seen["cfg"] = cfg
        return {"finished": False}

    monkeypatch.setattr(train_pkg, "train", fake_train)
    assert (
        main(
            [
                "train",
                "--attention",
                "favor",
                "--window",
                "4",
                "--sinks",
                "2",
                "--dim",
                "16",
                "--heads",
                "2",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    cfg = seen["cfg"]
    assert (cfg.window, cfg.sinks) == (4, 2)
    layers = CausalLM(ByteLM(cfg, data={}).model_config()).encoder.performer_layers()
    assert layers and all(a.sinks == 2 and a.window == 4 for a in layers)
    assert main(["train", "--sinks", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--sinks: must be >= 0" in capsys.readouterr().err
    assert (
        main(["train", "--attention", "exact", "--sinks", "1", "--out", str(tmp_path / "y")]) == 2
    )
    assert "sinks applies to attention='favor' only" in capsys.readouterr().err
    assert "attention sinks" in _help(["train", "--help"], capsys)


def _help(argv, capsys):
    from linattn.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_convert_flag_reaches_the_options(monkeypatch, tmp_path, capsys):
    pytest.importorskip("transformers")
    from linattn.cli import main
    from linattn.experiments import convert as experiment

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    seen = {}

    def fake_run(model, **kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(experiment, "run", fake_run)
    monkeypatch.setattr(experiment, "format_summary", lambda s: "")
    base = [
        "convert",
        "--model",
        str(tmp_path / "model"),
        "--steps",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*base, "--window", "4", "--sinks", "2"]) == 0
    assert seen["options"]["sinks"] == 2 and seen["options"]["window"] == 4
    seen.clear()
    assert main(base) == 0
    assert "sinks" not in seen["options"]  # default: none, the conversion's own default
    assert main([*base, "--sinks", "-2"]) == 2
    assert "--sinks: must be >= 0" in capsys.readouterr().err
    assert main([*base, "--method", "linformer", "--sinks", "1"]) == 2
    assert "--sinks: FAVOR+ only" in capsys.readouterr().err
    assert "attention sinks" in _help(["convert", "--help"], capsys)
