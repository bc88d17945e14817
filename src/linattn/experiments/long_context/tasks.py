"""Long-range recall tasks whose answer lies a stated number of tokens after its source.

Each example is one token sequence: an introduction, the *source* (a pass key, a
key-value list, a word list), filler text, a question, then the *answer*, which repeats
the source's tokens (all of them, or the queried value). It is scored teacher-forced
(:func:`~.metrics.answer_score`): the model reads the whole sequence once and each
answer token is predicted from the positions before it.

``distance`` = first answer token's position - first source token's position (the same
offset for every answer token). The answer lies beyond a causal window of ``w`` keys
(``i - w < j <= i``) when every source token is outside the window of the first answer
query (position ``answer_start - 1``): ``source_end <= answer_start - w``. With ``D``
layers a window-only model can relay information ``D (w - 1)`` positions back (its
receptive field): only beyond that can it not see the source at all.

* ``passkey``: a 5-digit number in one sentence, repeated filler, "What is the pass
  key? The pass key is" + the number (Mohtashami & Jaggi 2023, with the key said once).
  Chance (uniform guess): 10^-5.
* ``kv``: eight ``name: 4-digit code`` pairs; after the filler one name is asked for.
  Chance: 10^-4 (a model that saw the list could guess one of its eight codes: 1/8).
* ``copy``: a list of eight words drawn from :data:`WORDS`; after the filler, "Repeat
  the list of words:" + the list. Chance: ``len(WORDS)^-8`` (47 words).

Pieces are tokenized separately and joined as token ids, so the answer's ids are the
source's ids exactly, whatever the tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

TASKS = ("passkey", "kv", "copy")

FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)

WORDS = (
    "apple river stone cloud garden window silver forest candle mirror violin harbor "
    "pepper rabbit castle meadow lantern pencil thunder blanket island feather engine "
    "basket ladder orange planet saddle tunnel velvet wagon anchor bottle camera dragon "
    "falcon glacier hammer jacket kettle lemon marble needle ocean parrot quartz rocket"
).split()

NAMES = (
    "Alice Bruno Clara David Elena Felix Greta Hugo Irene Jonas Karla Lukas Maria Nils "
    "Olga Pablo Rosa Simon Tanja Ugo Vera Walter Xenia Yusuf Zora"
).split()


@dataclass(frozen=True)
class RecallExample:
    """One teacher-forced recall example.

    ``input_ids``: the whole sequence, answer included; the answer is
    ``input_ids[answer_start : answer_start + answer_len]`` and equals
    ``input_ids[source_start : source_start + answer_len]``; ``distance =
    answer_start - source_start``; ``chance``: the probability of an exact answer by a
    uniform guess over the answer space."""

    task: str
    input_ids: tuple[int, ...]
    answer_start: int
    answer_len: int
    source_start: int
    distance: int
    chance: float

    @property
    def source_end(self) -> int:
        return self.source_start + self.answer_len

    def as_row(self) -> dict:
        row = asdict(self)
        row.pop("input_ids")
        row["length"] = len(self.input_ids)
        return row


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix(tokenizer) -> list[int]:
    # What the tokenizer puts in front of a text (a BOS token, or nothing).
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = getattr(tokenizer, "sep_token_id", None)
    return [i for i in ids if i not in (eos, sep)]


def _filler(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of :data:`FILLER` repeated."""
    unit = _encode(tokenizer, FILLER)
    reps = n // max(1, len(unit)) + 1
    return (unit * reps)[:n]


def _assemble(
    task: str,
    head: list[int],
    source: list[int],
    after_source: list[int],
    question: list[int],
    distance: int,
    chance: float,
    tokenizer,
) -> RecallExample:
    """``head + source + after_source + filler + question + source`` with the filler
    sized so that the answer starts ``distance`` tokens after the source."""
    fill = distance - len(source) - len(after_source) - len(question)
    if fill < 0:
        raise ValueError(
            f"distance {distance} is too short for task {task!r}: its source and question "
            f"take {distance - fill} tokens"
        )
    ids = head + source + after_source + _filler(tokenizer, fill) + question + source
    start = len(head)
    answer_start = len(ids) - len(source)
    return RecallExample(
        task=task,
        input_ids=tuple(ids),
        answer_start=answer_start,
        answer_len=len(source),
        source_start=start,
        distance=answer_start - start,
        chance=chance,
    )


def passkey(tokenizer, distance: int, rng: random.Random) -> RecallExample:
    key = rng.randrange(10_000, 100_000)
    head = _prefix(tokenizer) + _encode(
        tokenizer,
        "There is an important pass key hidden inside a lot of irrelevant text. "
        "Find it and memorize it. The pass key is",
    )
    return _assemble(
        "passkey",
        head,
        _encode(tokenizer, f" {key}"),
        _encode(tokenizer, ". Remember it."),
        _encode(tokenizer, " What is the pass key? The pass key is"),
        distance,
        1e-5,
        tokenizer,
    )


def kv_recall(tokenizer, distance: int, rng: random.Random, pairs: int = 8) -> RecallExample:
    names = rng.sample(NAMES, pairs)
    codes = [rng.randrange(1000, 10_000) for _ in names]
    asked = rng.randrange(pairs)
    head = _prefix(tokenizer) + _encode(tokenizer, "Remember the codes of these people.")
    for name, code in zip(names[:asked], codes[:asked]):
        head += _encode(tokenizer, f" {name}:") + _encode(tokenizer, f" {code}.")
    head += _encode(tokenizer, f" {names[asked]}:")
    after: list[int] = _encode(tokenizer, ".")
    for name, code in zip(names[asked + 1 :], codes[asked + 1 :]):
        after += _encode(tokenizer, f" {name}:") + _encode(tokenizer, f" {code}.")
    return _assemble(
        "kv",
        head,
        _encode(tokenizer, f" {codes[asked]}"),
        after,
        _encode(tokenizer, f" What is the code of {names[asked]}? {names[asked]}:"),
        distance,
        1e-4,
        tokenizer,
    )


def copying(tokenizer, distance: int, rng: random.Random, words: int = 8) -> RecallExample:
    chosen = [rng.choice(WORDS) for _ in range(words)]
    head = _prefix(tokenizer) + _encode(tokenizer, "Here is a list of words:")
    return _assemble(
        "copy",
        head,
        _encode(tokenizer, " " + " ".join(chosen)),
        _encode(tokenizer, "."),
        _encode(tokenizer, " Repeat the list of words:"),
        distance,
        float(len(WORDS)) ** -words,
        tokenizer,
    )


_BUILDERS = {"passkey": passkey, "kv": kv_recall, "copy": copying}


def make_examples(
    tokenizer, task: str, distances: tuple[int, ...], count: int, *, seed: int = 0
) -> list[RecallExample]:
    """``count`` examples of ``task`` (one of :data:`TASKS`) at each of ``distances``,
    seeded (the same examples for the same arguments)."""
    if task not in _BUILDERS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = []
    for distance in distances:
        rng = random.Random(f"{task}-{distance}-{seed}")
        out += [_BUILDERS[task](tokenizer, distance, rng) for _ in range(count)]
    return out


def placement(example: RecallExample, *, window: int | None, sinks: int, layers: int) -> dict:
    """Where the source lies for a causal window hybrid: ``beyond_window`` (no source
    token within ``window`` keys of the first answer query; False without a window:
    everything is then linear), ``after_sinks`` (the source is not among the first
    ``sinks`` tokens) and ``beyond_receptive_field`` (further back than ``layers``
    stacked windows can relay: ``source_end - 1 < answer_start - 1 - layers (window - 1)``)."""
    first_query = example.answer_start - 1
    if window is None:
        beyond = reach = False
    else:
        beyond = example.source_end - 1 <= first_query - window
        # Each layer reaches window - 1 positions further back.
        reach = example.source_end - 1 < first_query - layers * max(window - 1, 0)
    return {
        "beyond_window": beyond,
        "after_sinks": example.source_start >= sinks,
        "beyond_receptive_field": reach and example.source_start >= sinks,
    }


def check_example(example: RecallExample) -> None:
    """``ValueError`` unless ``example`` is what it claims: the answer tokens equal the
    source tokens and start ``distance`` tokens after them, and the answer ends the
    sequence."""
    ids = example.input_ids
    a, s, n = example.answer_start, example.source_start, example.answer_len
    if ids[a : a + n] != ids[s : s + n] or a + n != len(ids) or a - s != example.distance:
        raise ValueError(
            f"malformed {example.task} example: answer at {a}, source at {s}, "
            f"length {n}, distance {example.distance}, sequence of {len(ids)} tokens"
        )
