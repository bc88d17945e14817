"""linattn eval (linattn.experiments.long_context) on tiny random BERT and Llama models:
each metric against a plain float64 reference, each ablation, the recall tasks checked
for what they claim, the speed table's shape, and the files written."""

import argparse
import copy
import json
import random

import pytest
import torch

from linattn.cli import evaluate

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from linattn.experiments import long_context as lc  # noqa: E402
from linattn.experiments.long_context import measure, metrics, tasks  # noqa: E402
from linattn.experiments.long_context import speed as speed_mod  # noqa: E402
from linattn.integrations.hf import convert  # noqa: E402


# ----------------------------------------------------------------- tiny models
def byte_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges): 258 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", *alphabet])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<s>", pad_token="<pad>"
    )


def tiny_llama(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bert(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return BertModel(cfg).to(dtype).eval()


def converted(model, **options):
    opts = {"kernel": "hedgehog", "num_features": 8, "window": 8, "sinks": 1, **options}
    return convert(copy.deepcopy(model), "favor", **opts)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def saved(tmp_path, make, tok):
    path = tmp_path / "model"
    make(dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------- metrics
def test_token_stats_equal_the_definitions():
    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    targets = torch.randint(0, 11, (7,), generator=g)
    s = metrics.token_stats(ref.float(), other.float(), targets)
    p, q = torch.softmax(ref.double(), -1), torch.softmax(other.double(), -1)
    for i in range(7):
        assert s["nll_ref"][i].item() == pytest.approx(-torch.log(p[i, targets[i]]).item())
        assert s["nll"][i].item() == pytest.approx(-torch.log(q[i, targets[i]]).item())
        kl = sum(p[i, v] * torch.log(p[i, v] / q[i, v]) for v in range(11)).item()
        assert s["kl"][i].item() == pytest.approx(kl, rel=1e-5)
        assert s["agree"][i].item() == float(p[i].argmax() == q[i].argmax())
    same = metrics.token_stats(ref, ref, targets)
    assert torch.equal(same["kl"], torch.zeros(7, dtype=torch.float64))
    assert torch.equal(same["agree"], torch.ones(7, dtype=torch.float64))


def test_sliced_stats_equal_one_call():
    g = torch.Generator().manual_seed(1)
    head_a, head_b = torch.nn.Linear(6, 13).double(), torch.nn.Linear(6, 13).double()
    ha, hb = torch.randn(63, 6, dtype=torch.float64), torch.randn(63, 6, dtype=torch.float64)
    targets = torch.randint(0, 13, (63,), generator=g)
    whole = metrics.token_stats(head_a(ha), head_b(hb), targets)
    sliced = metrics.stats_from_hidden(head_a, head_b, ha, hb, targets, slice_len=10)
    for k in whole:
        torch.testing.assert_close(sliced[k], whole[k])


def test_summary_and_buckets():
    stats = {
        "nll_ref": torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64),
        "nll": torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=torch.float64),
        "kl": torch.tensor([0.0, 0.5, 0.0, 1.0], dtype=torch.float64),
        "agree": torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64),
    }
    s = metrics.summarize(stats)
    assert s["ppl_ratio"] == pytest.approx(torch.exp(torch.tensor(0.75)).item())
    assert s["kl"] == pytest.approx(0.375) and s["top1_agreement"] == 0.75
    assert s["tokens"] == 4
    assert metrics.bucket_edges((0, 2, 3, 64), 4) == [(0, 2), (2, 3), (3, 4)]
    assert metrics.bucket_edges((0, 8), 4) == [(0, 4)]
    rows = metrics.by_bucket([stats, stats], (0, 2, 8))
    assert [(r["from"], r["to"], r["tokens"]) for r in rows] == [(0, 2, 4), (2, 4, 4)]
    assert rows[1]["ppl_ratio"] == pytest.approx(torch.exp(torch.tensor(1.0)).item())


def test_answer_score_and_retrieval():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    assert metrics.answer_score(logits, torch.tensor([1, 0]))["exact"] == 1.0
    wrong = metrics.answer_score(logits, torch.tensor([1, 2]))
    assert wrong["exact"] == 0.0
    lp = torch.log_softmax(logits.double(), -1)
    assert wrong["logprob"] == pytest.approx(((lp[0, 1] + lp[1, 2]) / 2).item())
    docs = torch.eye(4, dtype=torch.float64)
    queries = docs.clone()
    queries[3] = docs[0] + 0.1 * docs[3]  # query 3 finds document 0 first, its own second
    r = metrics.retrieval_scores(queries, docs)
    assert r["recall@1"] == 0.75 and r["recall@5"] == 1.0
    assert r["mrr"] == pytest.approx((3 + 0.5) / 4)


def test_last_hidden_through_the_head_equals_the_logits():
    model = converted(tiny_llama())
    ids = torch.randint(2, 258, (1, 37), generator=torch.Generator().manual_seed(0))
    logits = model.get_output_embeddings()(measure.last_hidden(model, ids))
    torch.testing.assert_close(logits, model(ids).logits[0])


# ----------------------------------------------------------------- recall tasks
@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("distance", [150, 257, 1000])
def test_tasks_put_the_answer_at_the_stated_distance(tok, task, distance):
    for ex in tasks.make_examples(tok, task, (distance,), 3, seed=1):
        tasks.check_example(ex)
        ids = ex.input_ids
        assert ex.distance == distance == ex.answer_start - ex.source_start
        assert ids[ex.answer_start :] == ids[ex.source_start : ex.source_end]
        assert ex.answer_start + ex.answer_len == len(ids)
        assert 0 < ex.chance < 1e-3
        where = tasks.placement(ex, window=8, sinks=1, layers=2)
        assert where["beyond_window"] and where["after_sinks"]
        # Two 8-key windows relay 14 positions back; the source is further away.
        assert where["beyond_receptive_field"]
        near = tasks.placement(ex, window=distance, sinks=1, layers=2)
        assert not near["beyond_window"] and not near["beyond_receptive_field"]


def test_examples_are_seeded_and_differ(tok):
    a = tasks.make_examples(tok, "kv", (200,), 4, seed=0)
    assert a == tasks.make_examples(tok, "kv", (200,), 4, seed=0)
    assert len({ex.input_ids for ex in a}) == 4


def test_placement_at_the_edge_of_the_window(tok):
    ex = tasks.make_examples(tok, "passkey", (100,), 1)[0]
    # The last source token is within w of the first answer query exactly when
    # distance < answer_len + w.
    w = ex.distance - ex.answer_len
    assert tasks.placement(ex, window=w, sinks=0, layers=1)["beyond_window"]
    assert not tasks.placement(ex, window=w + 1, sinks=0, layers=1)["beyond_window"]


def test_bad_tasks_are_refused(tok):
    with pytest.raises(ValueError, match="too short"):
        tasks.make_examples(tok, "copy", (10,), 1)
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.make_examples(tok, "sorting", (100,), 1)
    ex = tasks.make_examples(tok, "passkey", (100,), 1)[0]
    bad = tasks.RecallExample(**{**ex.__dict__, "distance": 99})
    with pytest.raises(ValueError, match="malformed passkey"):
        tasks.check_example(bad)


def test_window_only_cannot_see_a_key_beyond_its_receptive_field(tok):
    """Two passkey examples that differ only in their key: the window-only model's
    prediction of the first answer token is the same for both (so over random keys it
    scores at chance), while the exact and the hybrid model's differ."""
    exact = tiny_llama()
    model = converted(exact)
    a, b = tasks.make_examples(tok, "passkey", (120,), 2, seed=3)
    assert a.input_ids != b.input_ids and len(a.input_ids) == len(b.input_ids)
    assert tasks.placement(a, window=8, sinks=1, layers=2)["beyond_receptive_field"]
    q = a.answer_start - 1

    def first_answer_logits(m, ex):
        return measure.last_hidden(m, torch.tensor([ex.input_ids]))[q]

    with measure.variant(model, "window-only") as m:
        torch.testing.assert_close(first_answer_logits(m, a), first_answer_logits(m, b))
    for m in (exact, model):
        assert not torch.allclose(first_answer_logits(m, a), first_answer_logits(m, b))


# ----------------------------------------------------------------- ablations
def test_variants_switch_parts_and_restore(tok):
    exact = tiny_llama()
    model = converted(exact)
    ids = torch.randint(2, 258, (1, 40), generator=torch.Generator().manual_seed(2))
    before = measure.last_hidden(model, ids)
    outs = {}
    for name in measure.VARIANTS:
        with measure.variant(model, name) as m:
            outs[name] = measure.last_hidden(m, ids)
    torch.testing.assert_close(outs["hybrid"], before)
    assert not torch.allclose(outs["window-only"], before)
    assert not torch.allclose(outs["linear-only"], before)
    torch.testing.assert_close(measure.last_hidden(model, ids), before)
    # With the window over the whole text, window-only is the exact model.
    wide = converted(exact, window=64)
    with measure.variant(wide, "window-only") as m:
        torch.testing.assert_close(measure.last_hidden(m, ids), measure.last_hidden(exact, ids))
    with pytest.raises(ValueError, match="variant must be one of"):
        with measure.variant(model, "exact"):
            pass


def test_window_only_is_left_out_without_window_or_sinks():
    names, skipped = measure.variants_of(converted(tiny_llama(), window=None, sinks=0))
    assert names == ["hybrid", "linear-only"] and "window-only" in skipped
    assert measure.variants_of(converted(tiny_llama()))[0] == list(measure.VARIANTS)


# ----------------------------------------------------------------- measurements
def test_decoder_quality_rows(tok):
    exact = tiny_llama()
    model = converted(exact)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, 258, (1, 48), generator=g) for _ in range(2)]
    texts = {n: [t[:, :n] for t in ids] for n in (24, 48)}
    rows, buckets = measure.decoder_quality(
        exact, model, texts, variants=list(measure.VARIANTS), buckets=(0, 8, 32), progress=False
    )
    assert [(r["length"], r["model"]) for r in rows] == [
        (n, m) for n in (24, 48) for m in measure.MODELS
    ]
    for r in rows:
        assert r["tokens"] == 2 * (r["length"] - 1)
        if r["model"] == "exact":
            assert r["ppl_ratio"] == pytest.approx(1.0) and r["kl"] == 0.0
            assert r["top1_agreement"] == 1.0
        else:
            assert r["kl"] > 0
    # Reference: the plain forward's logits of the hybrid on the first text.
    hybrid48 = next(r for r in rows if r["length"] == 48 and r["model"] == "hybrid")
    lt = torch.cat([exact(t).logits[0, :-1] for t in ids])
    ls = torch.cat([model(t).logits[0, :-1] for t in ids])
    tgt = torch.cat([t[0, 1:] for t in ids])
    ref = metrics.summarize(metrics.token_stats(lt, ls, tgt))
    for key in ("ppl_ratio", "kl", "top1_agreement", "ppl", "ppl_exact"):
        assert hybrid48[key] == pytest.approx(ref[key], rel=1e-9)
    for n, m in [(48, "hybrid"), (24, "linear-only")]:
        parts = [b for b in buckets if b["length"] == n and b["model"] == m]
        expected = {47: [(0, 8), (8, 32), (32, 47)], 23: [(0, 8), (8, 23)]}[n - 1]
        assert [(b["from"], b["to"]) for b in parts] == expected
        assert sum(b["tokens"] for b in parts) == 2 * (n - 1)


def test_recall_rows_and_a_wide_window_scores_as_exact(tok):
    exact = tiny_llama()
    exs = [ex for t in tasks.TASKS for ex in tasks.make_examples(tok, t, (150, 200), 2)]
    model = converted(exact, window=512)
    rows, per = measure.recall(exact, model, exs, variants=list(measure.VARIANTS), progress=False)
    assert len(rows) == 3 * 2 * 4 and len(per) == len(exs) * 4
    by = {(r["task"], r["distance"], r["model"]): r for r in rows}
    for (task, distance, name), r in by.items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["logprob"] < 0
        assert r["examples"] == 2 and not r["beyond_window"]
        if name == "window-only":
            # The window covers everything: window-only is the exact model.
            assert r["logprob"] == pytest.approx(by[(task, distance, "exact")]["logprob"])


def test_encoder_quality_rows(tok):
    exact = tiny_bert()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(tasks.WORDS) for _ in range(40)) for i in range(6)]
    assert len({d[:128] for d in docs}) == 6
    wide = converted(exact, window=256)
    rows = measure.encoder_quality(
        exact, wide, tok, docs, variants=list(measure.VARIANTS), max_length=128, progress=False
    )
    assert [r["model"] for r in rows] == list(measure.MODELS)
    by = {r["model"]: r for r in rows}
    assert by["exact"]["mean_cosine"] == pytest.approx(1.0)
    assert by["window-only"]["mean_cosine"] > 1.0 - 1e-12
    assert by["window-only"]["mrr"] == pytest.approx(by["exact"]["mrr"])
    # (A random tiny BERT's mean-pooled embeddings barely depend on its attention.)
    assert by["linear-only"]["mean_cosine"] < 1.0 - 1e-12
    for r in rows:
        assert r["documents"] == 6 and 0 <= r["recall@1"] <= r["recall@5"] <= 1


def test_retrieval_queries_come_from_the_second_half(tok):
    docs = ["abcdefghij" * 10]
    (q,) = measure.retrieval_queries(tok, docs, max_length=64, query_tokens=8)
    assert len(q) == 8 and q in docs[0][32:64]


def word_tokenizer():
    """One token per word (spaces are no tokens): joined passages have fewer tokens than
    their separate counts plus one separator each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "<pad>": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<pad>")


def test_long_texts_reach_the_length():
    words = word_tokenizer()
    texts = lc._long_texts(words, "python-docs", 300, 3, 0)
    assert len(texts) == 3
    assert [ids.shape[1] for ids in measure.text_ids(words, texts, 300)] == [300] * 3


# ----------------------------------------------------------------- speed
def test_speed_table_shape(monkeypatch):
    exact = tiny_llama(dtype=torch.float32)
    model = converted(exact)
    rows = speed_mod.speed(
        {"exact": exact, "hybrid": model}, (16, 1100), repeats=2, new_tokens=3, progress=False
    )
    assert [(r["length"], r["model"], r["kind"]) for r in rows] == [
        (n, m, k)
        for n in (16, 1100)
        for m in ("exact", "hybrid")
        for k in ("prefill", "generate", "loop")
    ]
    for r in rows:
        assert r["past_context"] == (r["length"] > 1024)
        if r["kind"] == "prefill":
            assert r["median_s"] > 0 and r["n"] == 2
        else:
            assert r["ms_per_token"] > 0 and r["first_token_s"] > 0
            assert r["cache_bytes"] > 0
        if r["model"] == "hybrid":
            assert r["speedup"] > 0
    gen = {(r["length"], r["model"]): r for r in rows if r["kind"] == "generate"}
    assert gen[(16, "hybrid")]["cache"] == "FavorCache"
    assert gen[(16, "exact")]["cache"] == "DynamicCache"
    # The exact cache grows with the context; the FAVOR+ state does not.
    assert gen[(1100, "exact")]["cache_bytes"] > 10 * gen[(16, "exact")]["cache_bytes"]
    assert gen[(1100, "hybrid")]["cache_bytes"] == gen[(16, "hybrid")]["cache_bytes"]
    # A length that would not fit is skipped with a note.
    monkeypatch.setattr(speed_mod, "available_bytes", lambda device: 1)
    rows = speed_mod.speed({"exact": exact}, (16,), progress=False)
    assert len(rows) == 3 and all("estimated" in r["skipped"] for r in rows)


def test_speed_of_an_encoder_is_prefill_within_its_positions():
    exact = tiny_bert(dtype=torch.float32)
    model = converted(exact)
    rows = speed_mod.speed({"exact": exact, "hybrid": model}, (16, 200), progress=False)
    assert [(r["length"], r["model"], r["kind"]) for r in rows] == [
        (n, m, "prefill") for n in (16, 200) for m in ("exact", "hybrid")
    ]
    assert all(r["median_s"] > 0 for r in rows[:2])
    assert all("128 positions" in r["skipped"] for r in rows[2:])


def test_cache_bytes_of_a_key_value_cache():
    exact = tiny_llama(dtype=torch.float32)
    out = exact(torch.ones(1, 10, dtype=torch.long), use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values
    # 2 layers x (keys + values) x 2 kv heads x 10 tokens x 8 dims x 4 bytes
    assert speed_mod.cache_bytes(cache) == 2 * 2 * 2 * 10 * 8 * 4


# ----------------------------------------------------------------- command line
def parse(argv):
    parser = argparse.ArgumentParser()
    lc.configure_parser(parser)
    return parser.parse_args(argv)


SMALL = [
    "--window", "8", "--num-features", "8", "--sinks", "1", "--lengths", "64", "128",
    "--buckets", "0", "16", "64", "--texts", "1", "--distances", "150", "--examples", "1",
    "--speed-lengths", "32", "--new-tokens", "2", "--repeats", "1", "--docs", "4",
]  # fmt: skip


def test_decoder_run_writes_its_files(tmp_path, tok, capsys):
    model = saved(tmp_path, tiny_llama, tok)
    out = tmp_path / "out"
    args = parse(["--model", model, *SMALL, "--out", str(out)])
    assert evaluate.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in result["by_length"]} == set(measure.MODELS)
    assert {r["task"] for r in result["recall"]} == set(tasks.TASKS)
    assert {(r["model"], r["kind"]) for r in result["speed"]} == {
        (m, k) for m in ("exact", "hybrid") for k in ("prefill", "generate", "loop")
    }
    assert result["conversion"] == {
        "window": 8,
        "sinks": 1,
        "slots": 0,
        "slot_rule": "error",
        "layers": 2,
    }
    for name in ("by_length.csv", "by_position.csv", "recall.csv", "speed.csv", "summary.md",
                 "quality.png", "recall.png", "speed.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "summary.md").read_text()
    assert "window-only" in text and "linear-only" in text and "past context" in text
    assert "FavorCache" in text  # the cache class generate() got
    assert "summary.md" in capsys.readouterr().out


def test_encoder_run_and_checkpoint(tmp_path, tok):
    from linattn.integrations.hf import save_converted

    model = saved(tmp_path, tiny_bert, tok)
    ckpt = tmp_path / "conv" / "checkpoint"
    save_converted(converted(tiny_bert(dtype=torch.float32)), ckpt, tokenizer=tok)
    (tmp_path / "conv" / "summary.json").write_text(json.dumps({"model": model}))
    out = tmp_path / "out"
    args = parse(["--checkpoint", str(ckpt), "--parts", "quality", "recall", "--docs", "4",
                  "--out", str(out)])  # fmt: skip
    assert evaluate.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in result["encoder"]] == list(measure.MODELS)
    assert result["settings"]["model"] == model
    assert result["encoder"][0]["max_length"] == 128
    assert (out / "encoder.csv").is_file()
    assert "recall" not in result and "need a decoder" in result["notes"][0]


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "give --model"),
        (["--model", "nonexistent-folder"], "expected 'minilm', 'smollm2'"),
        (["--model", "{model}", "--window", "-2"], "--window"),
        (["--checkpoint", "{model}", "--kernel", "relu"], "conversion flags"),
        (["--checkpoint", "{model}"], "no summary.json"),
        (["--checkpoint", "{tmp}"], "expected a folder holding config.json"),
        (["--model", "{model}", "--slot-rule", "mass"], "give --slots too"),
        (["--model", "{model}", "--slots", "4", "--window", "-1"], "give a --window"),
        (["--model", "{model}", "--far-decay", "-3"], "--far-decay"),
        (["--model", "{model}", "--far-decay", "nan"], "--far-decay"),
        (["--checkpoint", "{model}", "--no-far-rope"], "--no-far-rope: conversion flags"),
    ],
    ids=[
        "nothing",
        "unknown-model",
        "window",
        "checkpoint-and-kernel",
        "no-original",
        "not-ckpt",
        "slot-rule-alone",
        "slots-without-window",
        "negative-far-decay",
        "nan-far-decay",
        "checkpoint-and-far-rope",
    ],
)
def test_bad_flags_are_refused_before_loading(tmp_path, tok, argv, match):
    from linattn.cli import UsageError

    model = saved(tmp_path, tiny_llama, tok)
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    with pytest.raises(UsageError, match=match):
        lc.run_from_args(parse([*argv, "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out" / "results.json").exists()


def test_slots_on_a_decoder_checkpoint(tmp_path, tok):
    from linattn.integrations.hf import save_converted

    model = saved(tmp_path, tiny_llama, tok)
    ckpt = tmp_path / "conv" / "checkpoint"
    save_converted(converted(tiny_llama(dtype=torch.float32)), ckpt, tokenizer=tok)
    out = tmp_path / "out"
    args = parse(["--checkpoint", str(ckpt), "--model", model, "--slots", "3", "--parts",
                  "recall", "--distances", "150", "--examples", "1", "--tasks", "passkey",
                  "--out", str(out)])  # fmt: skip
    assert evaluate.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["conversion"]["slots"] == 3 and result["settings"]["conversion"]["slots"] == 3
    models = [r["model"] for r in result["recall"]]
    assert models == ["exact", "hybrid", "no-slots", "no-far", "window-only", "linear-only"]
    assert "no-slots" in (out / "summary.md").read_text()
    # --variants picks ablations; one the model does not have is left out with its reason.
    args = parse(["--checkpoint", str(ckpt), "--model", model, "--variants", "hybrid",
                  "no-far", "--parts", "recall", "--distances", "150", "--examples", "1",
                  "--tasks", "passkey", "--out", str(out), "--overwrite"])  # fmt: skip
    assert evaluate.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in result["recall"]] == ["exact", "hybrid"]
    assert "no slots" in result["skipped_variants"]["no-far"]


def test_slots_on_an_encoder_are_refused(tmp_path, tok):
    from linattn.cli import UsageError

    model = saved(tmp_path, tiny_bert, tok)
    with pytest.raises(UsageError, match="for decoders"):
        lc.run_from_args(parse(["--model", model, "--slots", "2", "--out", str(tmp_path / "o")]))


def test_recall_on_an_encoder_is_refused(tmp_path, tok):
    from linattn.cli import UsageError

    model = saved(tmp_path, tiny_bert, tok)
    with pytest.raises(UsageError, match="need a decoder"):
        lc.run_from_args(parse(["--model", model, "--parts", "recall"]))


def test_bad_values_are_refused_by_the_parser(capsys):
    for argv in (["--examples", "0"], ["--new-tokens", "1"], ["--parts", "everything"]):
        with pytest.raises(SystemExit):
            parse(argv)


def test_a_model_with_slots_adds_the_slot_ablations(tok):
    from linattn.integrations.hf import set_slots

    exact = tiny_llama()
    model = set_slots(converted(exact), 2)
    names, skipped = measure.variants_of(model)
    assert names == ["hybrid", "no-slots", "no-far", "window-only", "linear-only"] and not skipped
    ids = torch.randint(2, 258, (1, 40), generator=torch.Generator().manual_seed(2))
    outs = {}
    for name in names:
        with measure.variant(model, name) as m:
            outs[name] = measure.last_hidden(m, ids)
    # no-slots is the model without slots; window-only drops the slots too.
    plain = converted(exact)
    torch.testing.assert_close(outs["no-slots"], measure.last_hidden(plain, ids))
    with measure.variant(plain, "window-only") as m:
        torch.testing.assert_close(outs["window-only"], measure.last_hidden(m, ids))
    for a, b in [("hybrid", "no-slots"), ("hybrid", "no-far"), ("no-far", "window-only")]:
        assert not torch.allclose(outs[a], outs[b])
    exs = tasks.make_examples(tok, "passkey", (150,), 1)
    rows, _ = measure.recall(exact, model, exs, variants=names, progress=False)
    assert [r["model"] for r in rows] == ["exact", *names]


def test_compile_step_decodes_through_the_compiled_step(tmp_path, tok, compiled_steps):
    calls = compiled_steps
    model = saved(tmp_path, tiny_llama, tok)
    out = tmp_path / "out"
    args = parse(["--model", model, "--window", "8", "--num-features", "8", "--parts",
                  "speed", "--speed-lengths", "32", "--new-tokens", "3", "--repeats", "1",
                  "--compile-step", "--out", str(out)])  # fmt: skip
    assert evaluate.run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["compile_step"] is True
    # generate() and the loop: 2 steps after the prefill each, in both layers.
    assert len(calls) == 2 * 2 * 2
    assert {r["model"] for r in result["speed"]} == {"exact", "hybrid"}


def test_far_options_on_a_zero_shot_conversion_and_a_checkpoint(tmp_path, tok):
    from linattn.integrations.hf import save_converted

    model = saved(tmp_path, tiny_llama, tok)
    out = tmp_path / "out"
    args = parse(["--model", model, "--no-far-rope", "--far-decay", "300", "--parts",
                  "recall", "--distances", "150", "--examples", "1", "--tasks", "passkey",
                  "--out", str(out)])  # fmt: skip
    assert evaluate.run(args) == 0
    conv = json.loads((out / "results.json").read_text())["settings"]["conversion"]
    assert conv["far_rope"] is False and conv["far_decay"] == 300.0
    # On a checkpoint the decay (no parameters) is set; 0 removes it.
    ckpt = tmp_path / "conv" / "checkpoint"
    save_converted(converted(tiny_llama(dtype=torch.float32), far_decay=50.0), ckpt, tokenizer=tok)
    args = parse(["--checkpoint", str(ckpt), "--model", model, "--far-decay", "0", "--parts",
                  "recall", "--distances", "150", "--examples", "1", "--tasks", "passkey",
                  "--out", str(out), "--overwrite"])  # fmt: skip
    assert evaluate.run(args) == 0
    conv = json.loads((out / "results.json").read_text())["settings"]["conversion"]
    assert conv["far_decay"] is None
