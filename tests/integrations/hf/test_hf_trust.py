"""Issue 15 on converted Hugging Face models: left padding without position_ids, padding
contents, conversion options checked up front."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import ids, left_padded, tiny_bert, tiny_llama
from linattn.integrations.hf import convert


def test_original_llama_is_exact_under_left_padding_without_position_ids():
    # Why the original is exact: positions start at the first pad, a constant shift per row,
    # and exact attention depends on rotary positions through i - j only.
    model = tiny_llama()
    a, b = ids(1, 11, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    out = model(x, attention_mask=mask).logits
    # Up to rounding: Llama computes the rotary cos/sin in float32, at other angles here.
    torch.testing.assert_close(out[1, 5:], model(b).logits[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_converted_llama_left_padding_without_position_ids_equals_alone(kernel):
    model = convert(tiny_llama(), "favor", num_features=32, kernel=kernel)
    a, b = ids(1, 11, seed=1), ids(1, 6, seed=2)
    x, mask = left_padded(a, b)
    out = model(x, attention_mask=mask).logits
    torch.testing.assert_close(out[0], model(a).logits[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1, 5:], model(b).logits[0], rtol=1e-10, atol=1e-10)
    # Explicit position_ids are left alone.
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    torch.testing.assert_close(model(x, attention_mask=mask, position_ids=pos).logits, out)


def test_converted_llama_left_padding_continues_a_cache():
    # Prefill a left-padded batch, then one more token through the cache: positions come
    # from the (longer) mask, as for the sequence alone.
    model = convert(tiny_llama(), "favor", num_features=32)
    a, b = ids(1, 9, seed=1), ids(1, 5, seed=2)
    x, mask = left_padded(a, b)
    res = model(x, attention_mask=mask, use_cache=True)
    nxt = torch.tensor([[7], [9]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    step = model(nxt, attention_mask=mask2, past_key_values=res.past_key_values).logits
    alone = model(torch.cat([b, nxt[1:]], dim=1)).logits[0, -1]
    torch.testing.assert_close(step[1, -1], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "method,opts", [("favor", {}), ("linformer", {"proj_dim": 8})], ids=["favor", "linformer"]
)
def test_converted_encoder_padding_contents_do_not_matter(method, opts):
    # Padded hidden states holding NaN (e.g. from a broken embedding row) stay out.
    model = convert(tiny_bert(), method, **opts)
    x = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ref = model(x, attention_mask=mask).last_hidden_state
    emb = model.embeddings.word_embeddings
    with torch.no_grad():
        emb.weight[0] = float("nan")
    x2 = x.clone()
    x2[1, 6:] = 0
    out = model(x2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[1, :6], ref[1, :6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "method,opts,exc,match",
    [
        ("favor", {"num_features": 0}, ValueError, "num_features"),
        ("favor", {"seed": "a"}, TypeError, "seed"),
        ("favor", {"chunk_size": 0}, ValueError, "chunk_size"),
        ("linformer", {"max_seq_len": 0}, ValueError, "max_seq_len"),
        ("linformer", {"proj_dim": 0}, ValueError, "proj_dim"),
        ("linformer", {"seed": 1.5}, TypeError, "seed"),
    ],
    ids=["num-features-0", "seed-str", "chunk-0", "max-seq-len-0", "proj-dim-0", "seed-float"],
)
def test_convert_options_are_checked_up_front(method, opts, exc, match):
    model = tiny_bert()
    with pytest.raises(exc, match=match):
        convert(model, method, **opts)
    # Nothing was attached: the model is still the original.
    assert not any(hasattr(m, "linattn") for m in model.modules())
