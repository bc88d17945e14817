"""`linattn convert` refuses flags it would not read, and --resume refuses changed
settings (before any model is loaded or trained)."""

import pytest

pytest.importorskip("transformers")

from linattn.cli import main
from linattn.experiments import convert as experiment


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(tmp_path / "model")


@pytest.fixture
def seen(monkeypatch):
    got = {}

    def fake(model, **kw):
        got.update(kw)
        return {}

    monkeypatch.setattr(experiment, "run", fake)
    monkeypatch.setattr(experiment, "run_transfer", fake)
    monkeypatch.setattr(experiment, "sweep", lambda *a, **kw: got.update(kw) or {"results": []})
    monkeypatch.setattr(experiment, "format_summary", lambda s: "")
    monkeypatch.setattr(experiment, "format_transfer_summary", lambda s: "")
    return got


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method", "linformer", "--kernel", "hedgehog"], "--kernel: FAVOR+ only"),
        (
            ["--method", "linformer", "--num-features", "64", "--learn-projection"],
            "--num-features, --learn-projection: FAVOR+ only",
        ),
        (["--method", "linformer", "--window", "4"], "--window: FAVOR+ only"),
        (["--method", "linformer", "--sinks", "1"], "--sinks: FAVOR+ only"),
        (["--method", "linformer", "--recipe", "transfer"], "--recipe transfer: FAVOR+ only"),
        (["--proj-dim", "64", "--sharing", "kv"], "--proj-dim, --sharing: Linformer only"),
        (["--sweep", "--sinks", "3", "--window", "8"], "it does not use --window, --sinks"),
        (["--sweep", "--steps", "10"], "it does not use --steps"),
        (["--sweep", "--recipe", "transfer"], "does not use --recipe transfer"),
        (["--window", "-5"], "--window: expected -1 (none)"),
        (["--recipe", "transfer", "--corpus", "gcide", "gcide"], "--corpus: each corpus once"),
        (["--method", "linformer", "--no-far-rope"], "--no-far-rope: FAVOR+ only"),
        (["--method", "linformer", "--far-decay", "100"], "--far-decay: FAVOR+ only"),
        (["--far-decay", "0"], "--far-decay: expected a number of tokens > 0"),
        (["--far-decay", "inf"], "--far-decay: expected a number of tokens > 0"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(model_dir, seen, tmp_path, capsys, flags, message):
    rc = main(["convert", "--model", model_dir, "--out", str(tmp_path / "o"), *flags])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not seen  # refused before any work


def test_window_minus_one_drops_the_recipes_window(model_dir, seen, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert main(["convert", "--model", model_dir, "--recipe", "transfer", *out]) == 0
    assert seen["options"]["window"] == 16  # the recipe's
    seen.clear()
    assert (
        main(["convert", "--model", model_dir, "--recipe", "transfer", "--window", "-1", *out]) == 0
    )
    assert "window" in seen["options"] and seen["options"]["window"] is None
    seen.clear()
    assert (
        main(["convert", "--model", model_dir, "--method", "linformer", "--proj-dim", "64", *out])
        == 0
    )
    assert seen["options"] == {"seed": 0, "proj_dim": 64}  # the rest: LinformerOptions
    seen.clear()
    argv = ["convert", "--model", model_dir, "--no-far-rope", "--far-decay", "512", *out]
    assert main(argv) == 0
    assert seen["options"]["far_rope"] is False and seen["options"]["far_decay"] == 512.0


def test_resume_refuses_changed_settings_naming_each():
    old = {
        "model": "minilm",
        "options": {"window": 16, "sinks": 0, "kernel": "hedgehog"},
        "corpus": "gcide",
        "train_texts": 100,
        "transfer": {"steps": 400, "lr": 0.01, "eval_every": 100},
        "distill": {"steps": 600},
    }
    same = {**old, "transfer": {**old["transfer"], "eval_every": 50}}
    experiment._refuse_changed_settings(old, same)  # evaluation cadence may change
    new = {
        **old,
        "options": {**old["options"], "sinks": 2},
        "transfer": {**old["transfer"], "lr": 0.001},
    }
    with pytest.raises(ValueError) as err:
        experiment._refuse_changed_settings(old, new)
    text = str(err.value)
    assert "options.sinks: 0 -> 2" in text and "transfer.lr: 0.01 -> 0.001" in text
    assert "distill" not in text and "eval_every" not in text


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda o: o.update(projection=o.pop("proj_kind")), "'projection' is now 'proj_kind'"),
        (lambda o: o.update(sharing="diagonal"), "options cannot be applied"),
    ],
)
def test_a_saved_conversion_with_old_or_bad_options_names_the_file(tmp_path, edit, match):
    import json

    from hf_models import tiny_bert
    from linattn import CheckpointError
    from linattn.integrations.hf import convert, load_converted, save_converted

    save_converted(convert(tiny_bert(), "linformer", proj_dim=8), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    edit(cfg["linattn_conversion"]["options"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as err:
        load_converted(tmp_path / "m")
    assert "config.json" in str(err.value)
