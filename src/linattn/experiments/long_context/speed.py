"""Speed and memory of a converted decoder against its original (SDPA attention):
prefill time and peak memory by prompt length, decoding time per token and cache size
by context length, through ``generate()`` and through a hand-written
``forward(use_cache=True)`` loop.

Memory on CPU is the peak resident set size added by one prefill (the kernel's
high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` before it, as
``linattn bench`` measures); on CUDA, ``torch.cuda.max_memory_allocated`` over what
was allocated before. A length whose estimated need exceeds the available memory is
skipped with a note, as is one that fails for lack of memory.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ...bench.checks import summarize
from ...bench.worker import _reset_peak, _rss_now, _rss_peak
from ...integrations.hf.hooks import _cache_key

#: Share of the available memory a length's estimated need may take.
MEMORY_SHARE = 0.8


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: ``MemAvailable`` of
    ``/proc/meminfo``), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_bytes(model: nn.Module, length: int) -> int:
    """A rough upper estimate of what one prefill of ``length`` tokens holds (float32):
    the key/value cache of every layer (the exact model's; a converted one needs less)
    and one layer's activations (hidden states, MLP, attention outputs), times 2 for the
    allocator's slack."""
    cfg = model.config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    cache = 2 * cfg.num_hidden_layers * kv * head_dim * length * 4
    acts = length * (8 * hidden + 3 * inter + 2 * heads * head_dim) * 4
    return 2 * (cache + acts)


def cache_bytes(cache) -> int:
    """Bytes a ``transformers`` cache holds: :class:`~linattn.integrations.hf.FavorCache`
    by its ``state_bytes()``, a key/value cache by its layers' keys and values."""
    if hasattr(cache, "state_bytes"):
        return int(cache.state_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(model: nn.Module, length: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(length)
    return torch.randint(1, vocab, (1, length), generator=g).to(next(model.parameters()).device)


def _is_decoder(model: nn.Module) -> bool:
    return hasattr(model, "generate") and model.get_output_embeddings() is not None


def _forward_kwargs(model: nn.Module) -> dict:
    # A decoder's prefill as generate() runs it: no cache kept, last-position logits.
    return {"use_cache": False, "logits_to_keep": 1} if _is_decoder(model) else {}


@torch.no_grad()
def prefill(model: nn.Module, length: int, repeats: int) -> dict:
    """Median seconds of ``repeats`` forwards over a ``length``-token prompt (decoders: no
    cache, the logits of the last position only, as ``generate()`` computes them) and the peak
    memory the first one added (``peak_bytes``; None where it cannot be measured)."""
    device = next(model.parameters()).device
    ids = _prompt(model, length)
    times = []
    peak = None
    for i in range(repeats):
        gc.collect()
        if i == 0:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            else:
                base = _rss_now() if _reset_peak() else None
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, **_forward_kwargs(model))
        _sync(device)
        times.append(time.perf_counter() - t0)
        if i == 0:
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - base
            elif base is not None:
                peak = max(0, _rss_peak() - base)
    return {**summarize(times), "peak_bytes": peak}


class _Clock:
    """A ``generate()`` streamer that notes the time of each ``put`` (the prompt first,
    then one per new token)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def decode_generate(model: nn.Module, length: int, new_tokens: int) -> dict:
    """``generate()`` (greedy, ``new_tokens`` tokens exactly) after a ``length``-token
    prompt: ``first_token_s`` (time to the first new token: the prefill),
    ``ms_per_token`` (median over the following tokens), ``cache_bytes`` at the end and
    the cache's class."""
    device = next(model.parameters()).device
    ids = _prompt(model, length)
    clock = _Clock(device)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id or 0,
    )
    # times[0]: the prompt was handed over; times[1]: the first new token.
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    return {
        "first_token_s": clock.times[1] - start,
        "ms_per_token": 1e3 * statistics.median(steps) if steps else None,
        "cache_bytes": cache_bytes(cache),
        "cache": type(cache).__name__,
    }


@torch.no_grad()
def decode_loop(model: nn.Module, length: int, new_tokens: int) -> dict:
    """A hand-written greedy loop, as a user writes it: ``out = model(ids,
    use_cache=True)``, then the argmax token fed back with the returned cache
    (``cache=`` where the model's forward takes it, else ``past_key_values=``).
    ``first_token_s``, ``ms_per_token`` (median), ``cache_bytes`` and the cache's
    class."""
    device = next(model.parameters()).device
    ids = _prompt(model, length)
    key = _cache_key(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    first = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens - 1):
        cache = out[key] if key in out else out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{key: cache})
        _sync(device)
        steps.append(time.perf_counter() - t0)
    cache = out[key] if key in out else out.past_key_values
    return {
        "first_token_s": first,
        "ms_per_token": 1e3 * statistics.median(steps) if steps else None,
        "cache_bytes": cache_bytes(cache),
        "cache": type(cache).__name__,
    }


def speed(
    models: dict[str, nn.Module],
    lengths: tuple[int, ...],
    *,
    repeats: int = 3,
    new_tokens: int = 16,
    decode: bool = True,
    progress: bool = True,
) -> list[dict]:
    """For each length and model (``models``: name -> model, e.g. ``{"exact": ...,
    "hybrid": ...}``): one row per measurement ``kind`` (``"prefill"``, and for
    decoders with ``decode`` ``"generate"`` and ``"loop"``), with ``skipped`` (why)
    where the length does not fit in memory, and ``past_context`` where the length
    exceeds the model's ``max_position_embeddings`` (speed only: its outputs there are
    not meaningful). Models run in turn at each length."""
    rows = []
    cases = [(n, name) for n in sorted(lengths) for name in models]
    for length, name in tqdm(cases, desc="speed", disable=not progress):
        model = models[name]
        device = next(model.parameters()).device
        trained = getattr(model.config, "max_position_embeddings", None)
        base = {"length": length, "model": name, "past_context": bool(trained and length > trained)}
        kinds = ["prefill"]
        if decode and _is_decoder(model):
            kinds += ["generate", "loop"]
        need, free = estimate_bytes(model, length), available_bytes(device)
        for kind in kinds:
            if not _is_decoder(model) and trained and length > trained:
                # Learned absolute positions (BERT) stop at max_position_embeddings.
                rows.append(
                    {
                        **base,
                        "kind": kind,
                        "skipped": f"longer than the model's {trained} positions",
                    }
                )
                continue
            if free is not None and need > MEMORY_SHARE * free:
                rows.append(
                    {
                        **base,
                        "kind": kind,
                        "skipped": f"estimated {need / 2**30:.1f} GiB > {MEMORY_SHARE:.0%} of "
                        f"the {free / 2**30:.1f} GiB available",
                    }
                )
                continue
            try:
                if kind == "prefill":
                    r = prefill(model, length, repeats)
                elif kind == "generate":
                    r = decode_generate(model, length, new_tokens)
                else:
                    r = decode_loop(model, length, new_tokens)
            except (RuntimeError, MemoryError) as exc:
                if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                    raise
                gc.collect()
                rows.append({**base, "kind": kind, "skipped": f"out of memory ({exc})"[:200]})
                continue
            rows.append({**base, "kind": kind, **r})
        gc.collect()
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """``speedup``: the exact model's time over this row's (prefill: median seconds;
    generate/loop: ms per token) at the same length and kind; ``cache_share``: this
    row's cache bytes over the exact model's."""
    exact = {(r["length"], r["kind"]): r for r in rows if r["model"] == "exact"}
    for r in rows:
        ref = exact.get((r["length"], r["kind"]))
        if ref is None or "skipped" in r or "skipped" in ref:
            continue
        key = "median_s" if r["kind"] == "prefill" else "ms_per_token"
        if r.get(key) and ref.get(key):
            r["speedup"] = ref[key] / r[key]
        if r["kind"] != "prefill":
            if r.get("first_token_s") and ref.get("first_token_s"):
                r["first_token_speedup"] = ref["first_token_s"] / r["first_token_s"]
            if ref.get("cache_bytes"):
                r["cache_share"] = r["cache_bytes"] / ref["cache_bytes"]
