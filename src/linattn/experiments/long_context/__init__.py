"""``linattn eval``: a converted model against its original at length, with ablations.

For a FAVOR+-converted checkpoint (``--checkpoint DIR``, loaded with
:func:`~linattn.integrations.hf.load_converted`) or a zero-shot conversion of
``--model minilm|smollm2|PATH`` (conversion flags over the transfer recipe's attention),
every table compares the original model (``exact``, SDPA) with the converted model's
ablations (:data:`~.measure.VARIANTS`: ``hybrid``, ``window-only``, ``linear-only``, and
with slots ``no-slots``, ``no-far``):

* ``quality`` (decoders): perplexity ratio, KL and top-1 agreement by length on held-out
  long texts (their first ``L`` tokens for each length) and by position bucket within
  them (:func:`~.measure.decoder_quality`); (encoders) embedding cosine and retrieval at
  the model's full length (:func:`~.measure.encoder_quality`);
* ``recall`` (decoders): passkey, key-value and copying tasks at stated distances
  (:mod:`.tasks`), teacher-forced;
* ``speed``: prefill time and peak memory, decoding ms/token and cache bytes through
  ``generate()`` and a hand-written ``forward(use_cache=True)`` loop (:mod:`.speed`).

Writes ``results.json``, ``by_length.csv``, ``by_position.csv``, ``recall.csv``,
``encoder.csv``, ``speed.csv``, ``quality.png``, ``recall.png``, ``speed.png`` and
``summary.md`` to ``out`` (after each part, so that an interrupted run keeps what it
measured).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

PARTS = ("quality", "recall", "speed")

#: Defaults of the sizes, and the smaller ``--quick`` ones.
DEFAULTS = {
    "lengths": (512, 2048, 4096, 8192),
    "buckets": (0, 64, 512, 2048, 4096, 8192),
    "texts": 4,
    "distances": (128, 256, 512, 1024, 2048, 4096, 8000),
    "examples": 10,
    "docs": 64,
    "speed_lengths": (1024, 2048, 4096, 8192, 16384, 32768),
    "new_tokens": 16,
    "repeats": 3,
}
QUICK = {
    "lengths": (256, 512),
    "buckets": (0, 64, 256, 512),
    "texts": 2,
    "distances": (128, 512),
    "examples": 3,
    "docs": 16,
    "speed_lengths": (512, 1024),
    "new_tokens": 4,
    "repeats": 1,
}


def _load(model_name: str, checkpoint: str | None, options: dict, device: str):
    """``(teacher, student, tokenizer, source)``: the original model, the converted one
    and where it came from."""
    from ...integrations.hf import convert, load_converted
    from ...integrations.hf.distill import is_causal_lm
    from ..convert import recipe_for
    from ..pretrained import load_pretrained

    teacher, tok = load_pretrained(model_name)
    if checkpoint is not None:
        student = load_converted(checkpoint).eval()
        source = f"checkpoint {checkpoint}"
    else:
        recipe = recipe_for("transfer", decoder=is_causal_lm(teacher))
        options = {**recipe.favor_options(), **options}
        student = convert(copy.deepcopy(teacher), "favor", **options)
        source = f"zero-shot conversion of {model_name}"
    return teacher.to(device), student.to(device), tok, source


def _long_texts(tok, corpus: str, length: int, count: int, seed: int) -> list[str]:
    """``count`` held-out texts of at least ``length`` tokens: passages joined as
    :func:`~linattn.experiments.convert.eval_sets` joins its longer held-out sets (the
    passages ``linattn convert`` never trains on)."""
    from ..convert import eval_sets

    # eval_sets gives its shortest length single passages: a length of 1 is asked for
    # too, so that `length` gets joined texts. It counts each passage's tokens alone; a
    # joined text can have a few fewer: a margin keeps it at `length` tokens at least.
    packed = length + length // 16 + 16
    sets = eval_sets(
        tok,
        (corpus,),
        train_corpus="gcide",
        train_texts=20000 if corpus == "gcide" else 0,
        eval_texts=count,
        lengths=(1, packed),
        long_eval_texts=count,
        seed=seed,
    )
    return sets[f"{corpus}@{packed}"][0]


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over what was allocated before"
    return "peak resident set size added: VmHWM reset through /proc/self/clear_refs"


def run(
    model_name: str,
    *,
    checkpoint: str | None = None,
    options: dict | None = None,
    slots: dict | None = None,
    far_decay: float | None = None,
    compile_step: bool = False,
    variants: tuple[str, ...] | None = None,
    parts: tuple[str, ...] = PARTS,
    lengths: tuple[int, ...] = DEFAULTS["lengths"],
    buckets: tuple[int, ...] = DEFAULTS["buckets"],
    corpus: str = "python-docs",
    texts: int = DEFAULTS["texts"],
    tasks: tuple[str, ...] = ("passkey", "kv", "copy"),
    distances: tuple[int, ...] = DEFAULTS["distances"],
    examples: int = DEFAULTS["examples"],
    docs: int = DEFAULTS["docs"],
    speed_lengths: tuple[int, ...] = DEFAULTS["speed_lengths"],
    new_tokens: int = DEFAULTS["new_tokens"],
    repeats: int = DEFAULTS["repeats"],
    device: str = "cpu",
    seed: int = 0,
    out: str | Path = "results/eval",
    progress: bool = True,
) -> dict:
    """Measure ``parts`` of :data:`PARTS` for ``model_name`` (``"minilm"``,
    ``"smollm2"`` or a model folder: the original) converted zero-shot with
    ``options`` over the transfer recipe's attention, or as saved in ``checkpoint``, with
    ``slots`` (None, or the arguments of :func:`linattn.integrations.hf.set_slots`:
    ``{"slots", "rule", "interval"}``) given to the converted decoder, and ``far_decay``
    (None: the conversion's; 0: none; else :func:`~linattn.integrations.hf.set_far_decay`),
    ``compile_step``: the converted decoder's one-token steps through ``torch.compile``
    (:func:`~linattn.integrations.hf.set_compiled_decoding`); write the results
    into ``out`` (see the module docstring) and return them. ``variants``: the ablations
    to compare (default: every one that exists for the model, :func:`.measure.variants_of`);
    one that does not exist is left out with its reason."""
    from ...bench.speed import machine_info
    from ...integrations.hf.distill import is_causal_lm
    from . import measure, report
    from .speed import speed
    from .tasks import make_examples

    started = time.perf_counter()
    out = Path(out)
    dev = torch.device(device)
    teacher, student, tok, source = _load(model_name, checkpoint, dict(options or {}), device)
    decoder = is_causal_lm(teacher)
    if slots is not None:
        from ...integrations.hf import set_slots

        set_slots(student, slots["slots"], rule=slots["rule"], interval=slots["interval"])
    if far_decay is not None:
        from ...integrations.hf import set_far_decay

        set_far_decay(student, far_decay or None)
    if compile_step:
        from ...integrations.hf import set_compiled_decoding

        set_compiled_decoding(student)
    available, skipped = measure.variants_of(student)
    if variants is None:
        variants = available
    else:
        for name in variants:
            if name not in available and name not in skipped:
                skipped[name] = "the model has no slots (convert with slots > 0 or --slots)"
        variants = [name for name in available if name in variants]
    result = {
        "settings": {
            "model": model_name,
            "source": source,
            "kind": "decoder" if decoder else "encoder",
            "conversion": student.config.linattn_conversion["options"],
            "exact_attention": getattr(teacher.config, "_attn_implementation", None),
            "compile_step": compile_step,
            "parts": list(parts),
            "corpus": corpus,
            "lengths": list(lengths),
            "buckets": list(buckets),
            "texts": texts,
            "tasks": list(tasks),
            "distances": list(distances),
            "examples": examples,
            "docs": docs,
            "speed_lengths": list(speed_lengths),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "seed": seed,
            "seconds": 0.0,
        },
        "conversion": measure.conversion(student),
        "skipped_variants": skipped,
        "machine": machine_info(),
        "memory_note": memory_note(dev),
        "notes": [],
    }

    def save() -> None:
        result["settings"]["seconds"] = round(time.perf_counter() - started, 1)
        result["files"] = report.write(out, result)

    if "quality" in parts:
        if decoder:
            long = _long_texts(tok, corpus, max(lengths), texts, seed)
            ids = measure.text_ids(tok, long, max(lengths))
            if len(ids) < texts:
                result["notes"].append(
                    f"quality: {len(ids)} of {texts} held-out texts reach {max(lengths)} tokens"
                )
            by_len = {n: [t[:, :n] for t in ids] for n in sorted(lengths)}
            result["by_length"], result["by_position"] = measure.decoder_quality(
                teacher, student, by_len, variants=variants, buckets=buckets, progress=progress
            )
        else:
            max_length = int(getattr(teacher.config, "max_position_embeddings", 512))
            documents = _long_texts(tok, corpus, max_length, docs, seed)
            result["encoder"] = measure.encoder_quality(
                teacher,
                student,
                tok,
                documents,
                variants=variants,
                max_length=max_length,
                progress=progress,
            )
        save()
    if "recall" in parts and not decoder:
        result["notes"].append("recall: left out, its tasks need a decoder (a causal LM)")
    if "recall" in parts and decoder:
        exs = [
            ex for task in tasks for ex in make_examples(tok, task, distances, examples, seed=seed)
        ]
        result["recall"], result["recall_examples"] = measure.recall(
            teacher, student, exs, variants=variants, progress=progress
        )
        save()
    if "speed" in parts:
        result["speed"] = speed(
            {"exact": teacher, "hybrid": student},
            speed_lengths,
            repeats=repeats,
            new_tokens=new_tokens,
            decode=decoder,
            progress=progress,
        )
        save()
    save()
    return result


# The command line (flags and their checks) lives in .cli; imported last (it uses run).
from .cli import configure_parser, run_from_args  # noqa: E402

__all__ = ["DEFAULTS", "PARTS", "QUICK", "configure_parser", "run", "run_from_args"]
