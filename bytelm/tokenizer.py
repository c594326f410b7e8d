"""Tokenizers behind one interface: encode(str) -> ids, decode(ids) -> str, vocab_size, is_bytes,
plus exact byte-level methods (encode_bytes / decode_bytes / token_bytes) for bits per byte.

ByteTokenizer is the identity on UTF-8 bytes. BPETokenizer is a byte-level BPE trained with
Hugging Face `tokenizers` (GPT-2's byte alphabet and pre-tokenizer, no normalizer, no prefix
space), so every string round-trips exactly; bytes that are not valid UTF-8 are encoded as the
single-byte tokens every byte-level vocabulary starts with, so any bytes round-trip too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bytelm import codec


class ByteTokenizer:
    """The identity 'tokenizer' of byte models, with the interface token models also offer."""

    is_bytes = True
    vocab_size = codec.VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return codec.encode(text)

    def decode(self, ids) -> str:
        return codec.decode(ids)

    def encode_bytes(self, data: bytes) -> list[int]:
        return codec.encode_bytes(data)

    def decode_bytes(self, ids) -> bytes:
        return codec.decode_bytes(ids)

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: 1 per byte id, 0 for the special ids."""
        return (np.arange(self.vocab_size) < 256).astype(np.int64)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (what the ByteLevel
    pre-tokenizer of `tokenizers` uses to spell tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class BPETokenizer:
    is_bytes = False

    def __init__(self, tokenizer):
        """tokenizer: a `tokenizers.Tokenizer` built by train_bpe (byte-level)."""
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        self._bytes = [bytes(to_byte[c] for c in tokenizer.id_to_token(i))
                       for i in range(self.vocab_size)]
        self._byte_ids = [tokenizer.token_to_id(byte_to_unicode()[b]) for b in range(256)]
        if None in self._byte_ids:
            raise ValueError("not a byte-level BPE tokenizer: some single bytes have no token")
        self.token_bytes = np.array([len(b) for b in self._bytes], dtype=np.int64)

    # ---- the shared interface -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        """Text of the ids; a token sequence cut inside a character decodes it as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- bytes ---------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes: valid UTF-8 runs through BPE, each invalid byte as its single-byte token."""
        return [i for ids in self.encode_batch_bytes([data]) for i in ids]

    def encode_batch_bytes(self, pieces: Iterable[bytes]) -> list[list[int]]:
        """encode_bytes of many pieces, BPE in parallel (the Rust tokenizer's thread pool)."""
        segments, owners = [], []  # str to tokenize or a list of byte ids, and whose it is
        pieces = list(pieces)
        for n, piece in enumerate(pieces):
            for segment in utf8_segments(bytes(piece)):
                segments.append(segment if isinstance(segment, str)
                                else [self._byte_ids[b] for b in segment])
                owners.append(n)
        texts = [s for s in segments if isinstance(s, str)]
        encoded = iter(e.ids for e in self._tok.encode_batch(texts)) if texts else iter(())
        out: list[list[int]] = [[] for _ in pieces]
        for owner, segment in zip(owners, segments):
            out[owner].extend(next(encoded) if isinstance(segment, str) else segment)
        return out

    def decode_bytes(self, ids) -> bytes:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return b"".join(self._bytes[i] for i in ids)

    # ---- storage -------------------------------------------------------------------------
    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def utf8_segments(data: bytes) -> Iterator[str | bytes]:
    """Split bytes into maximal valid UTF-8 runs (as str) and the invalid bytes between them."""
    while data:
        try:
            yield data.decode("utf-8")
            return
        except UnicodeDecodeError as e:
            if e.start:
                yield data[: e.start].decode("utf-8")
            yield data[e.start : e.end]
            data = data[e.end :]


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of at most vocab_size ids (the 256 bytes included) on `texts`.
    A small corpus may run out of pairs to merge first: the result's vocab_size says."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256:
        raise ValueError(f"a byte-level BPE vocabulary needs more than the 256 byte tokens, "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)
