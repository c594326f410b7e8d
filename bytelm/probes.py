"""Character-level probe tasks (after CUTE): templated questions about the letters of a word.

    Q: How many times does "r" occur in "strawberry"?
    A: 3

An example is a prompt ending in "A:" and a continuation " ANSWER\\n" (the space starts the
answer so that BPE tokenizers split prompt and answer the way they split the whole line).
Words are lowercase a-z; every word list is cut by a hash of the word into a probe-train half,
which training may see (data.probe_fraction), and a held-out half, which only evaluation sees.
Used by training (ProbeMixer) and by `python -m eval.probes`.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bytelm import codec
from bytelm.data.sources import DataError

LETTERS = string.ascii_lowercase
DIGITS = tuple(str(i) for i in range(10))
VOCAB_WORDS = 2000  # size of the default word list taken from a corpus
MIN_LEN, MAX_LEN = 3, 12  # lengths of words taken from a corpus
SCAN_BYTES = 16 << 20  # how much of the train split the corpus vocabulary is counted over


@dataclass(frozen=True)
class Task:
    question: str  # str.format template over w (word), c and d (letters), k (1-based position)
    answer: Callable[..., str]
    choices: tuple[str, ...] | None  # the closed answer set, for likelihood ranking


TASKS: dict[str, Task] = {
    "count": Task('How many times does "{c}" occur in "{w}"?',
                  lambda w, c, **_: str(w.count(c)), DIGITS),
    "spell": Task('Spell "{w}" letter by letter.', lambda w, **_: " ".join(w), None),
    "reverse": Task('Write "{w}" backwards.', lambda w, **_: w[::-1], None),
    "contains": Task('Does "{w}" contain the letter "{c}"?',
                     lambda w, c, **_: "yes" if c in w else "no", ("yes", "no")),
    "index": Task('What is letter {k} of "{w}"?', lambda w, k, **_: w[k - 1], tuple(LETTERS)),
    "insert": Task('Insert "{c}" after letter {k} of "{w}".',
                   lambda w, c, k, **_: w[:k] + c + w[k:], None),
    "delete": Task('Delete every "{c}" from "{w}".', lambda w, c, **_: w.replace(c, ""), None),
    "substitute": Task('Replace every "{c}" in "{w}" with "{d}".',
                       lambda w, c, d, **_: w.replace(c, d), None),
}
TASK_NAMES = tuple(TASKS)


@dataclass(frozen=True)
class ProbeExample:
    task: str
    word: str
    prompt: str  # "Q: ...\nA:"
    answer: str
    choices: tuple[str, ...] | None = None

    @property
    def continuation(self) -> str:
        return f" {self.answer}\n"

    @property
    def text(self) -> str:
        return self.prompt + self.continuation


def build_example(task: str, word: str, c: str | None = None, d: str | None = None,
                  k: int | None = None) -> ProbeExample:
    """The example of `task` on `word` with these arguments (c, d: letters; k: 1-based)."""
    t = TASKS[task]
    question = t.question.format(w=word, c=c, d=d, k=k)
    return ProbeExample(task, word, f"Q: {question}\nA:", t.answer(w=word, c=c, d=d, k=k),
                        t.choices)


def make_example(task: str, word: str, rng: random.Random) -> ProbeExample:
    """An example of `task` on `word` with arguments drawn from `rng`."""
    present = sorted(set(word))
    absent = [x for x in LETTERS if x not in word]
    if task == "count":
        countable = [x for x in present if word.count(x) <= 9]  # answers stay within 0-9
        use_absent = absent and (not countable or rng.random() < 0.25)
        return build_example(task, word, c=rng.choice(absent if use_absent else countable))
    if task == "contains":
        use_absent = absent and rng.random() < 0.5
        return build_example(task, word, c=rng.choice(absent if use_absent else present))
    if task == "index":
        return build_example(task, word, k=rng.randint(1, len(word)))
    if task == "insert":
        return build_example(task, word, c=rng.choice(LETTERS), k=rng.randint(1, len(word)))
    if task == "delete":
        return build_example(task, word, c=rng.choice(present))
    if task == "substitute":
        c = rng.choice(present)
        return build_example(task, word, c=c, d=rng.choice([x for x in LETTERS if x != c]))
    if task in TASKS:
        return build_example(task, word)
    raise ValueError(f"unknown probe task {task!r} ({', '.join(TASK_NAMES)})")


def check(example: ProbeExample, output: str) -> bool:
    """Exact match of a model's answer (the text before the newline), outer spaces ignored."""
    return output.strip() == example.answer


# ---- word lists ---------------------------------------------------------------------------

def is_held_out(word: str) -> bool:
    return hashlib.blake2b(word.encode(), digest_size=8).digest()[0] & 1 == 1


def split_words(words: list[str]) -> tuple[list[str], list[str]]:
    """(probe-train, held-out) halves; a word's side depends on the word alone."""
    return [w for w in words if not is_held_out(w)], [w for w in words if is_held_out(w)]


def load_words(path: str | Path) -> list[str]:
    """One word a line, lowercased; blank lines skipped, duplicates dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read word list {path}: {type(e).__name__}: {e}") from None
    words = []
    for number, line in enumerate(lines, 1):
        word = line.strip().lower()
        if word and not re.fullmatch(r"[a-z]+", word):
            raise DataError(f"word list {path} line {number}: {line.strip()!r} is not a word "
                            f"of letters a-z")
        if word:
            words.append(word)
    words = list(dict.fromkeys(words))
    if len(words) < 2:
        raise DataError(f"word list {path} holds {len(words)} words; probes need at least 2")
    return words


def corpus_words(corpus, n: int = VOCAB_WORDS, scan_bytes: int = SCAN_BYTES) -> list[str]:
    """The n most frequent alphabetic words (lowercased, 3-12 letters) of the first scan_bytes
    of a PreparedCorpus's train split; ties broken alphabetically, so the list is fixed."""
    data, left = [], scan_bytes
    for shard in corpus.shards("train"):
        data.append(bytes(shard[:left]))
        left -= len(data[-1])
        if left <= 0:
            break
    counts = collections.Counter(m.lower() for m in re.findall(rb"[A-Za-z]+", b"\n".join(data))
                                 if MIN_LEN <= len(m) <= MAX_LEN)
    words = [w.decode() for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    if len(words) < 2:
        raise DataError(f"the train split of {corpus.directory} has {len(words)} words of "
                        f"{MIN_LEN}-{MAX_LEN} letters; give a word list instead")
    return words


# ---- mixing probes into training ----------------------------------------------------------

class ProbeMixer:
    """Replaces each training row, with probability `fraction`, by probe examples over
    probe-train words packed back to back. The choice and the examples are drawn from
    (seed, step, rank), so a batch stays a pure function of them."""

    STREAM = 0x9B0BE  # keeps these draws apart from the window sampler's default_rng([seed, step])

    def __init__(self, words: list[str], fraction: float, tasks=TASK_NAMES,
                 encode: Callable[[str], list[int]] = codec.encode):
        self.words = split_words(words)[0]
        if not self.words:
            raise DataError("no probe-train words: every word of the list hashed to the "
                            "held-out half")
        self.fraction, self.tasks, self.encode = fraction, tuple(tasks), encode

    def mix(self, batch: np.ndarray, seed: int, step: int, rank: int = 0) -> np.ndarray:
        """batch: (rows, length) ids, changed in place and returned."""
        rng = np.random.default_rng([seed, step, rank, self.STREAM])
        for row in np.flatnonzero(rng.random(len(batch)) < self.fraction):
            batch[row] = self.packed_row(random.Random(int(rng.integers(1 << 62))), batch.shape[1])
        return batch

    def packed_row(self, rng: random.Random, length: int) -> np.ndarray:
        ids: list[int] = []
        while len(ids) < length:
            example = make_example(rng.choice(self.tasks), rng.choice(self.words), rng)
            ids += self.encode(example.text)
        return np.asarray(ids[:length], dtype=np.int64)
