"""Probe tasks (bytelm.probes): generators and checkers on known words, the word-list split,
word lists from files and corpora, and the deterministic mixing of probes into training."""

import random

import numpy as np
import pytest

from bytelm import codec, probes
from bytelm.config import DataConfig
from bytelm.data.sources import DataError


@pytest.mark.parametrize("task, args, answer", [
    ("count", {"c": "r"}, "3"),
    ("count", {"c": "z"}, "0"),
    ("spell", {}, "s t r a w b e r r y"),
    ("reverse", {}, "yrrebwarts"),
    ("contains", {"c": "w"}, "yes"),
    ("contains", {"c": "q"}, "no"),
    ("index", {"k": 1}, "s"),
    ("index", {"k": 10}, "y"),
    ("insert", {"c": "x", "k": 3}, "strxawberry"),
    ("insert", {"c": "x", "k": 10}, "strawberryx"),
    ("delete", {"c": "r"}, "stawbey"),
    ("substitute", {"c": "r", "d": "l"}, "stlawbelly"),
])
def test_answers_on_strawberry(task, args, answer):
    ex = probes.build_example(task, "strawberry", **args)
    assert ex.answer == answer
    assert ex.prompt.startswith("Q: ") and ex.prompt.endswith("\nA:") and "strawberry" in ex.prompt
    assert ex.text == f"{ex.prompt} {answer}\n"
    assert probes.check(ex, f" {answer}") and probes.check(ex, answer)
    assert not probes.check(ex, answer + "s") and not probes.check(ex, "")


def test_questions_name_their_arguments():
    assert probes.build_example("count", "banana", c="a").prompt == \
        'Q: How many times does "a" occur in "banana"?\nA:'
    assert '"o"' in probes.build_example("substitute", "banana", c="a", d="o").prompt
    assert "letter 4" in probes.build_example("index", "banana", k=4).prompt


@pytest.mark.parametrize("task", probes.TASK_NAMES)
def test_drawn_examples_are_consistent_and_seeded(task):
    words = ["strawberry", "banana", "abc", "mississippi", "queue"]
    for word in words:
        a = probes.make_example(task, word, random.Random(f"7:{word}"))
        b = probes.make_example(task, word, random.Random(f"7:{word}"))
        assert a == b
        if a.choices:
            assert a.answer in a.choices
    drawn = {probes.make_example(task, "strawberry", random.Random(s)).prompt for s in range(30)}
    assert len(drawn) == 1 if task in ("spell", "reverse") else len(drawn) > 1


def test_count_and_contains_draw_both_present_and_absent_letters():
    answers = {probes.make_example("contains", "banana", random.Random(s)).answer
               for s in range(40)}
    assert answers == {"yes", "no"}
    counts = {probes.make_example("count", "banana", random.Random(s)).answer for s in range(40)}
    assert counts == {"0", "1", "2", "3"}


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown probe task 'spelling'"):
        probes.make_example("spelling", "cat", random.Random(0))


def test_split_is_by_word_and_roughly_half():
    words = ["w" + chr(97 + i % 26) + chr(97 + i // 26 % 26) + chr(97 + i // 676)
             for i in range(2000)]
    train, held = probes.split_words(words)
    assert sorted(train + held) == sorted(words) and not set(train) & set(held)
    assert 0.45 < len(held) / len(words) < 0.55
    assert probes.split_words(list(reversed(words)))[1] == list(reversed(held))  # order-free


def test_load_words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("Apple\n\nbanana\napple\ncherry\n")
    assert probes.load_words(path) == ["apple", "banana", "cherry"]
    path.write_text("apple\nice cream\n")
    with pytest.raises(DataError, match=r"line 2: 'ice cream' is not a word"):
        probes.load_words(path)
    with pytest.raises(DataError, match="cannot read word list"):
        probes.load_words(tmp_path / "missing.txt")


class FakeCorpus:
    def __init__(self, text: bytes, directory="fake"):
        self.text, self.directory = text, directory

    def shards(self, split):
        return [np.frombuffer(self.text, dtype=np.uint8)]


def test_corpus_words_are_frequent_alphabetic_and_lowercased():
    text = b"The cat; the CAT sat. the dog_dog x9 ab abcdefghijklmnop " * 3
    assert probes.corpus_words(FakeCorpus(text), n=3) == ["the", "cat", "dog"]  # 9, 6, 6 times
    assert probes.corpus_words(FakeCorpus(text)) == ["the", "cat", "dog", "sat"]
    with pytest.raises(DataError, match="has 0 words"):
        probes.corpus_words(FakeCorpus(b"12 ab 34"))


WORDS = ["strawberry", "banana", "cherry", "apple", "grape", "melon", "lemon", "peach", "plum",
         "mango", "kiwi", "lime", "fig", "date", "pear", "olive"]


def test_mixer_is_deterministic_and_uses_probe_train_words_only():
    mixer = probes.ProbeMixer(WORDS, fraction=0.5)
    base = np.full((16, 65), ord("."), dtype=np.int64)
    a = mixer.mix(base.copy(), seed=1, step=3, rank=0)
    assert np.array_equal(a, mixer.mix(base.copy(), seed=1, step=3, rank=0))
    assert not np.array_equal(a, mixer.mix(base.copy(), seed=1, step=4, rank=0))
    assert not np.array_equal(a, mixer.mix(base.copy(), seed=1, step=3, rank=1))
    mixed = [row for row in a if not (row == ord(".")).all()]
    assert 2 <= len(mixed) <= 14
    held_out = set(probes.split_words(WORDS)[1])
    for row in mixed:
        text = codec.decode(row)
        assert text.startswith("Q: ")
        quoted = {w for w in WORDS if f'"{w}"' in text}
        assert quoted and not quoted & held_out


def test_datamodule_mixes_probes_at_the_configured_fraction(tmp_path):
    from bytelm.training.datamodule import ByteDataModule

    corpus = tmp_path / "c.txt"
    corpus.write_text("plain text without questions. " * 300)
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))

    def first_batches(fraction):
        cfg = DataConfig(source=str(corpus), prepared_dir=str(tmp_path / "prep"), seq_len=48,
                         batch_size=8, probe_fraction=fraction, probe_words=str(words))
        dm = ByteDataModule(cfg, seed=5)
        dm.prepare_data()
        dm.setup()
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(25)]

    mixed, again, plain = first_batches(0.1), first_batches(0.1), first_batches(0.0)
    assert all((a == b).all() for a, b in zip(mixed, again))
    rows = [codec.decode(r) for b in mixed for r in b]
    probe_rows = sum(r.startswith("Q: ") for r in rows)
    assert 5 <= probe_rows <= 40  # 10% of 200 rows
    assert not any("Q: " in codec.decode(r) for b in plain for r in b)
    kept = [(a == b).all().item() for x, y in zip(mixed, plain) for a, b in zip(x, y)]
    assert sum(kept) == len(rows) - probe_rows  # the other rows are the usual windows
