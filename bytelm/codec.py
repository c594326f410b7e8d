"""Byte codec: ids 0-255 are raw bytes, followed by a few special ids (hnet-style).

There is nothing to train or store: text is its UTF-8 bytes.
"""

from __future__ import annotations

from typing import Iterable

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259


def padded_vocab_size(multiple: int = 8) -> int:
    """VOCAB_SIZE rounded up to `multiple` (embedding tables like aligned sizes)."""
    return -(-VOCAB_SIZE // multiple) * multiple


def encode_bytes(data: bytes, bos: bool = False, eos: bool = False) -> list[int]:
    return [BOS_ID] * bos + list(data) + [EOS_ID] * eos


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    return encode_bytes(text.encode("utf-8"), bos=bos, eos=eos)


def decode_bytes(ids: Iterable[int]) -> bytes:
    """The bytes among `ids` (list, 1-D numpy array or 1-D torch tensor); special ids are skipped."""
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    ids = list(ids)
    if any(not isinstance(i, int) for i in ids):
        raise ValueError("decode expects a flat sequence of integer ids")
    if any(i < 0 for i in ids):
        raise ValueError(f"negative id {min(ids)} is not a byte or special id")
    return bytes(i for i in ids if i < 256)


def decode(ids: Iterable[int]) -> str:
    """Text of the byte ids; invalid UTF-8 becomes U+FFFD instead of raising."""
    return decode_bytes(ids).decode("utf-8", errors="replace")
