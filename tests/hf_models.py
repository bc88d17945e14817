"""Tiny randomly initialized Hugging Face models and inputs shared by the tests of
``linattn.integrations`` and of the commands that convert models (no downloads).
Import it after ``pytest.importorskip("transformers")``."""

import inspect

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).double().eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    # Grouped-query attention: 4 query heads share 2 key/value heads.
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


def ids(b, n, seed=0):
    return torch.randint(1, 100, (b, n), generator=torch.Generator().manual_seed(seed))


def left_padded(*seqs):
    """Token ids ``(1, n_i)`` stacked into a left-padded batch ``(B, max n_i)`` (pad id
    0) and its attention mask (1 = real token)."""
    width = max(s.shape[1] for s in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, width - s.shape[1] :], mask[i, width - s.shape[1] :] = s[0], 1
    return x, mask


class ByteTokenizer:
    """Enough of a tokenizer for the tiny models: bytes mod 99 + 1, 0 pads."""

    pad_token = eos_token = "<pad>"

    def __call__(self, texts, padding=True, truncation=True, max_length=32, return_tensors="pt"):
        rows = [[b % 99 + 1 for b in t.encode()[:max_length]] for t in texts]
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        m = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)], m[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": x, "attention_mask": m}


TEXTS = [f"sample text number {i} with some words {'x' * (i % 7)}" for i in range(64)]


def peaky(model):
    """Sharpen the attention (scale the query and key weights), so that few random
    features approximate it poorly and distillation has something to recover."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("query.weight", "key.weight", "q_proj", "k_proj")):
                p.mul_(6.0)
    return model


#: The keyword of a model's cache: transformers 5.25 renames past_key_values to cache (the
#: old name warns).
CACHE = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)
