"""BPE token corpora: a byte-level BPE trained on a prepared corpus's training split, and both
splits tokenized with it. Layout, inside the prepared byte corpus it is made from::

    <prepared_dir>/bpe-<vocab>/  tokenizer.json  meta.json  train.bin  val.bin

train.bin / val.bin hold each split's token ids (uint16 when the vocabulary fits, else uint32).
meta.json records each split's token count and its UTF-8 byte count (bits per byte need both),
and the hashes of the byte shards it was made from, so a re-prepared corpus is re-tokenized.

Splits are the exact byte streams of the byte corpus (document separators included), so byte
and token models are scored on the same bytes. The stream is tokenized in pieces cut at the end
of an ASCII word (after an ASCII letter followed by an ASCII non-letter, or a digit followed by an
ASCII non-digit): GPT-2's pre-tokenizer always splits there and looks no further back, so the
pieces give exactly the tokens of the whole stream. A long stretch without one (text in another
script only) is cut at a character boundary instead (still lossless).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from bytelm.data.dataset import PreparedCorpus
from bytelm.data.prepare import SPLITS, _exclusive, _replace_dir, read_meta
from bytelm.data.sources import DataError
from bytelm.tokenizer import BPETokenizer, train_bpe, utf8_segments

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
PIECE_BYTES = 1 << 16  # tokenizer input unit; a batch of pieces is encoded in parallel
PIECES_PER_BATCH = 64

log = logging.getLogger(__name__)


def token_dir(prepared_dir: str | Path, vocab_size: int) -> Path:
    return Path(prepared_dir) / f"bpe-{vocab_size}"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# --- cutting a byte stream into pieces --------------------------------------------------------


def _letters(x: np.ndarray) -> np.ndarray:
    return ((x >= 0x41) & (x <= 0x5A)) | ((x >= 0x61) & (x <= 0x7A))


def _digits(x: np.ndarray) -> np.ndarray:
    return (x >= 0x30) & (x <= 0x39)


def _cut_after(data: np.ndarray, lo: int, hi: int) -> int | None:
    """First position p in [lo, hi) where a pre-token surely ends: data[p-1] is an ASCII letter
    (digit) and data[p] an ASCII byte that is not. None if there is none."""
    lo, hi = max(lo, 1), min(hi, len(data))
    if hi <= lo:
        return None
    prev, nxt = data[lo - 1 : hi - 1], data[lo:hi]
    ascii_next = nxt < 0x80
    ends = (_letters(prev) & ascii_next & ~_letters(nxt)) | (_digits(prev) & ascii_next & ~_digits(nxt))
    found = np.flatnonzero(ends)
    return lo + int(found[0]) if len(found) else None


def iter_pieces(data: np.ndarray, piece_bytes: int = PIECE_BYTES) -> Iterator[bytes]:
    """Consecutive pieces of about piece_bytes covering `data` (uint8) exactly once."""
    start, n = 0, len(data)
    while start < n:
        end = start + piece_bytes
        if end < n:
            cut = _cut_after(data, end, end + 4 * piece_bytes)
            if cut is None:  # no word end: any byte that does not continue a UTF-8 character
                cut = end
                while cut < n and (data[cut] & 0xC0) == 0x80:
                    cut += 1
            end = cut
        yield bytes(data[start:min(end, n)])
        start = end


def _split_stream(corpus: PreparedCorpus, split: str) -> Iterator[bytes]:
    for shard in corpus.shards(split):  # pieces never span shards (they may split a character)
        yield from iter_pieces(shard, PIECE_BYTES)


def _training_texts(corpus: PreparedCorpus) -> Iterator[str]:
    for piece in _split_stream(corpus, "train"):
        yield from (s for s in utf8_segments(piece) if isinstance(s, str))


# --- building --------------------------------------------------------------------------------


def corpus_id(byte_meta: dict) -> str:
    """Identity of a prepared byte corpus: the hashes of its shards."""
    shards = {s: [x["sha256"] for x in byte_meta["splits"][s]["shards"]] for s in SPLITS}
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def tokenize(prepared_dir: str | Path, vocab_size: int) -> dict:
    """Train the BPE on the training split and write the token corpus; returns its meta."""
    if vocab_size <= 256:
        raise DataError(f"bpe vocab size {vocab_size} is too small: a byte-level BPE needs more "
                        f"than its 256 single-byte tokens")
    corpus = PreparedCorpus(prepared_dir)
    out = token_dir(prepared_dir, vocab_size).resolve()
    start = time.monotonic()
    tokenizer = train_bpe(_training_texts(corpus), vocab_size)
    dtype = token_dtype(vocab_size)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
        splits = {split: _write_tokens(corpus, split, tokenizer, dtype, tmp / f"{split}.bin")
                  for split in SPLITS}
        meta = {"format_version": FORMAT_VERSION, "source": corpus.meta["source"],
                "corpus": corpus_id(corpus.meta), "requested_vocab_size": vocab_size,
                "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
                "splits": splits}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("BPE %d (%d ids) on %s: train %.3f, val %.3f bytes/token, in %.1fs", vocab_size,
             tokenizer.vocab_size, corpus.meta["source"], splits["train"]["bytes_per_token"],
             splits["val"]["bytes_per_token"], time.monotonic() - start)
    return meta


def _write_tokens(corpus: PreparedCorpus, split: str, tokenizer: BPETokenizer, dtype,
                  path: Path) -> dict:
    tokens = n_bytes = 0
    pieces = _split_stream(corpus, split)
    with open(path, "wb") as f:
        while batch := list(itertools.islice(pieces, PIECES_PER_BATCH)):
            ids = np.fromiter((i for ids in tokenizer.encode_batch_bytes(batch) for i in ids),
                              dtype=np.int64)
            n_bytes += int(tokenizer.token_bytes[ids].sum())
            tokens += len(ids)
            ids.astype(dtype).tofile(f)
    if n_bytes != corpus.split_bytes(split):  # the tokenizer must be lossless
        raise DataError(f"tokenizing {split} of {corpus.directory} gave tokens of {n_bytes} bytes "
                        f"for {corpus.split_bytes(split)} bytes")
    return {"file": path.name, "tokens": tokens, "bytes": n_bytes,
            "bytes_per_token": n_bytes / max(tokens, 1)}


def read_token_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no token corpus at {directory}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a token corpus of format {FORMAT_VERSION}; delete it to re-tokenize")
    return meta


def _intact(directory: Path, meta: dict) -> bool:
    if not (directory / TOKENIZER_FILE).is_file():
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        info = meta["splits"][split]
        path = directory / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
            return False
    return True


def ensure_tokenized(prepared_dir: str | Path, vocab_size: int) -> Path:
    """The token corpus of a prepared byte corpus at this vocab size, made unless it is there
    and was made from these very bytes."""
    out = token_dir(prepared_dir, vocab_size)
    with _exclusive(out):  # every rank of a job waits for one to tokenize, then reuses it
        wanted = corpus_id(read_meta(prepared_dir))
        try:
            meta = read_token_meta(out)
            if meta["corpus"] == wanted and _intact(out, meta):
                log.info("reusing BPE token corpus %s", out)
                return out
        except (DataError, KeyError, TypeError):
            pass
        tokenize(prepared_dir, vocab_size)
    return out


# --- reading ---------------------------------------------------------------------------------


class TokenCorpus:
    """A token corpus, read like PreparedCorpus: shards(split) are memory-maps of token ids."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = read_token_meta(self.directory)
        self._maps: dict[str, list[np.memmap]] = {}
        self._tokenizer: BPETokenizer | None = None
        self._cum_bytes: dict[str, np.ndarray] = {}

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tokenizer is None:
            self._tokenizer = BPETokenizer.from_file(self.directory / TOKENIZER_FILE)
        return self._tokenizer

    def shards(self, split: str) -> list[np.memmap]:
        if split not in self._maps:
            path = self.directory / self._info(split)["file"]
            if not path.is_file():
                raise DataError(f"{path} listed in {self.directory / META_FILE} is missing; "
                                f"delete {self.directory} to re-tokenize")
            self._maps[split] = [np.memmap(path, dtype=self.meta["dtype"], mode="r")]
        return self._maps[split]

    def _info(self, split: str) -> dict:
        if split not in SPLITS:
            raise DataError(f"no split {split!r} in {self.directory} (splits: {', '.join(SPLITS)})")
        return self.meta["splits"][split]

    def split_bytes(self, split: str) -> int:
        """UTF-8 bytes of text the split holds."""
        return self._info(split)["bytes"]

    def split_tokens(self, split: str) -> int:
        return self._info(split)["tokens"]

    def bytes_per_token(self, split: str = "train") -> float:
        return self._info(split)["bytes_per_token"]

    def tokens_covering(self, split: str, n_bytes: int) -> int:
        """How many leading tokens of the split hold at most n_bytes bytes (at least 2)."""
        if split not in self._cum_bytes:
            lengths = self.tokenizer.token_bytes[np.concatenate(self.shards(split))]
            self._cum_bytes[split] = np.cumsum(lengths)
        return max(2, int(np.searchsorted(self._cum_bytes[split], n_bytes, side="right")))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}, "_cum_bytes": {}}

    def __repr__(self) -> str:
        return f"TokenCorpus({str(self.directory)!r}, vocab={self.meta['vocab_size']})"
