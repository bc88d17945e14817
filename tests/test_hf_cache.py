"""Which cache a converted decoder uses: ``generate()`` and ``forward(use_cache=True)``
follow the attention implementation in force (issue 26 item 9); a hand-written decoding
loop gets ``FavorCache`` (issue 25 build item 3)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from linattn.integrations.hf import FavorCache, convert  # noqa: E402
from test_hf import ids, tiny_llama  # noqa: E402


def test_switching_back_to_exact_attention_generates_as_the_original():
    original = tiny_llama()
    prompt = ids(2, 7)
    expect = original.generate(prompt, max_new_tokens=6, do_sample=False)
    model = convert(copy.deepcopy(original), "favor", num_features=16, window=3, sinks=1)
    converted = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert (model(prompt).logits - original(prompt).logits).abs().max() > 1e-4

    model.set_attn_implementation("sdpa")
    res = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(res.sequences, expect)
    assert not isinstance(res.past_key_values, FavorCache)
    torch.testing.assert_close(model(prompt).logits, original(prompt).logits)
    # A FavorCache cannot serve the exact attention: refused, not silently wrong.
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model(prompt, past_key_values=FavorCache(model), use_cache=True)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model.generate(prompt, max_new_tokens=2, past_key_values=FavorCache(model))

    # And back to linear attention: FavorCache again, the converted model's tokens.
    model.set_attn_implementation("linattn")
    res = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, FavorCache)
    assert torch.equal(res.sequences, converted)
