"""A small corpus of common English words for tests that run train.py end to end."""

import random
from pathlib import Path

WORDS = "the of and to in is was for on that with as by at from his her it an be".split()


def write_word_corpus(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    """n_words random common words in lines of 70 characters, written to path."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    path.write_text("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))
    return path
