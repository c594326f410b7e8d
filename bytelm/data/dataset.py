"""Reading a prepared corpus: lazy memory-maps, a resumable batch sampler, eval windows."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from bytelm.data.prepare import SPLITS, read_meta
from bytelm.data.sources import DataError


class PreparedCorpus:
    """A directory written by `prepare`. Shards are memory-mapped on first use, read-only."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self._maps: dict[str, list[np.memmap]] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS

    @property
    def doc_separator(self) -> int:
        return self.meta["doc_separator"]

    def split_bytes(self, split: str) -> int:
        return self._split_info(split)["bytes"]

    @property
    def total_bytes(self) -> int:
        return sum(self.split_bytes(s) for s in SPLITS)

    def shards(self, split: str) -> list[np.memmap]:
        """The split's shards as uint8 memmaps (opened once per process, sizes checked)."""
        if split not in self._maps:
            self._maps[split] = [self._open_shard(s) for s in self._split_info(split)["shards"]]
        return self._maps[split]

    def _split_info(self, split: str) -> dict:
        if split not in SPLITS:
            raise DataError(f"no split {split!r} in {self.directory} (splits: {', '.join(SPLITS)})")
        return self.meta["splits"][split]

    def _open_shard(self, shard: dict) -> np.memmap:
        path = self.directory / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in meta.json is missing; re-run prepare")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"shard {path} has {size} bytes but meta.json says {shard['bytes']}; re-run prepare")
        return np.memmap(path, dtype=np.uint8, mode="r")

    def __getstate__(self) -> dict:
        # Memmaps are not sent to worker processes; each reopens its own lazily.
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.directory)!r}, source={self.meta['source']!r}, bytes={self.total_bytes})"


def sample_batch(
    corpus: PreparedCorpus,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Rows of seq_len+1 consecutive bytes, shape (batch_size, seq_len+1), int64.

    The whole world's batch is drawn at once from default_rng([seed, step]) as
    distinct, non-overlapping window slots; rank r takes rows [r*B, (r+1)*B). So a
    batch depends only on (seed, step) and the global batch size: resuming at a step
    reproduces it, ranks never share a window, and 2 ranks x B equals 1 rank x 2B.
    """
    if seq_len < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sampling arguments: {seq_len=} {batch_size=} {rank=} {world_size=}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative: {seed=} {step=}")
    window = seq_len + 1
    shards = corpus.shards(split)
    sizes = np.array([len(s) for s in shards], dtype=np.int64)
    _check_window_fits(corpus, split, sizes, window)
    rng = np.random.default_rng([seed, step])
    shard_ids, starts = _draw_windows(rng, sizes, window, world_size * batch_size)
    batch = np.empty((batch_size, window), dtype=np.int64)
    for i, row in enumerate(range(rank * batch_size, (rank + 1) * batch_size)):
        batch[i] = shards[shard_ids[row]][starts[row] : starts[row] + window]
    return batch


def _check_window_fits(corpus: PreparedCorpus, split: str, sizes: np.ndarray, window: int) -> None:
    total = int(sizes.sum())
    if total < window:
        raise DataError(
            f"split {split!r} has {total} bytes, fewer than one window of seq_len+1={window}; "
            "lower seq_len or use a larger corpus"
        )
    if sizes.max() < window:
        raise DataError(
            f"no shard of split {split!r} in {corpus.directory} holds a window of seq_len+1={window} bytes "
            f"(largest {sizes.max()}); re-prepare with a larger shard_bytes"
        )


def _draw_windows(rng: np.random.Generator, sizes: np.ndarray, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, start) of n windows; distinct slots when there are enough."""
    slots = sizes // window
    if slots.sum() >= n:
        # Slot k of a shard starts at offset + k*window; the random offset moves the grid
        # so window edges are not always at the same bytes.
        offsets = rng.integers(0, sizes - slots * window + 1)
        shard_ids, index = _locate(rng.choice(slots.sum(), size=n, replace=False), slots)
        return shard_ids, offsets[shard_ids] + index * window
    # Fewer slots than rows: sample any start (windows may overlap), still deterministic.
    starts = np.maximum(sizes - window + 1, 0)
    return _locate(rng.integers(0, starts.sum(), size=n), starts)


def _locate(picks: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map indices into the concatenation of per-shard ranges to (shard, index within shard)."""
    ends = np.cumsum(counts)
    shard_ids = np.searchsorted(ends, picks, side="right")
    return shard_ids, picks - (ends[shard_ids] - counts[shard_ids])


def iter_eval_windows(
    corpus: PreparedCorpus, split: str, seq_len: int, max_bytes: int | None = None
) -> Iterator[np.ndarray]:
    """Windows (1-D int64, at most seq_len+1 bytes) over the first max_bytes bytes of the split, in order.

    Window k is bytes [k*seq_len, k*seq_len + seq_len + 1): consecutive windows share one
    byte, so their targets (window[1:]) tile the split exactly once, which gives exact
    bits per byte over it. The last window may be shorter. Windows may span shards.
    A token corpus (bytelm.data.bpe.TokenCorpus) is read the same way, in tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    shards = corpus.shards(split)
    total = sum(len(s) for s in shards)  # bytes, or tokens of a token corpus
    n = total if max_bytes is None else min(max_bytes, total)
    if n < 2:
        raise DataError(f"split {split!r} of {corpus.directory} has {n} bytes; evaluation needs at least 2")
    for start in range(0, n - 1, seq_len):
        yield _read_range(shards, start, min(start + seq_len + 1, n))


def _read_range(shards: list[np.memmap], start: int, stop: int) -> np.ndarray:
    parts, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + len(shard))
        if lo < hi:
            parts.append(shard[lo - offset : hi - offset])
        offset += len(shard)
    return np.concatenate(parts).astype(np.int64)
