"""Prepare a source once into a directory of uint8 shards that training memory-maps.

Layout of a prepared dir::

    meta.json  train-00000.bin  train-00001.bin ...  val-00000.bin ...

Each document is written as its bytes followed by DOC_SEP. Split rule:

- several documents: a document goes to val when the blake2b hash of its bytes
  falls below val_fraction (deterministic, order-free; duplicates share a split);
- a single document (tinyshakespeare, enwik8, one text file): the first
  int(n * (1 - val_fraction)) bytes are train and the rest val, with no separator,
  which for tinyshakespeare is byte-for-byte nanoGPT's split;
- if hashing leaves a split empty (a handful of documents), the whole document
  stream is split by bytes the same way, and meta.json says so.

The dir is written under a temporary name and renamed at the end, so a prepared
dir is never half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from bytelm.data.sources import DataError, iter_documents, source_fingerprint

FORMAT_VERSION = 1
DOC_SEP = 0x00
META_FILE = "meta.json"
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


def prepare(
    source: str,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    text_column: str = "text",
    shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """Read `source` and write a prepared corpus to `out_dir`; returns its meta.json contents."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_bytes < 1:
        raise DataError(f"shard_bytes must be positive, got {shard_bytes}")
    out = Path(out_dir)
    options = {"text_column": text_column, "val_fraction": val_fraction, "shard_bytes": shard_bytes}
    fingerprint = source_fingerprint(source, text_column=text_column)
    replacing = _check_out_dir(out, fingerprint, options, overwrite)

    start = time.monotonic()
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # not mkdtemp: the prepared dir should get the usual umask permissions, not 0700
    try:
        layout = _write_splits(source, tmp, options, cache_dir)
        meta = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "fingerprint": fingerprint,
            **options,
            "doc_separator": DOC_SEP,
            **layout,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    log.info(
        "prepared %s into %s%s: train %d bytes / %d docs, val %d bytes / %d docs (%s split) in %.1fs",
        source, out, " (replacing the previous corpus)" if replacing else "",
        train["bytes"], train["documents"], val["bytes"], val["documents"], meta["split_rule"],
        time.monotonic() - start,
    )  # fmt: skip
    return meta


def ensure_prepared(
    source: str,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    text_column: str = "text",
    shard_bytes: int = 1 << 30,
    cache_dir: str | Path | None = None,
) -> Path:
    """`out_dir`, holding `source` prepared with these options; prepares it unless it already does."""
    out = Path(out_dir)
    options = {"text_column": text_column, "val_fraction": val_fraction, "shard_bytes": shard_bytes}
    with _exclusive(out):  # concurrent callers (e.g. every rank of a job) wait, then reuse
        meta = _read_meta_or_none(out)
        fingerprint = source_fingerprint(source, text_column=text_column)
        if meta is not None and _matches(meta, fingerprint, options) and _shards_intact(out, meta):
            log.info("reusing prepared corpus %s (%s, %d bytes)", out, source, total_bytes(meta))
            return out
        # A dir with a meta.json was made by prepare(); replacing a stale one is what the caller wants.
        meta = prepare(source, out, **options, overwrite=(out / META_FILE).exists(), cache_dir=cache_dir)
        _record_verified(out, meta)
    return out


def read_meta(directory: str | Path) -> dict:
    """The checked meta.json of a prepared dir; DataError if missing, corrupt or from another format."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"no prepared corpus at {directory}: {path} is missing (run python -m data.prepare)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{path} has format_version {version}, expected {FORMAT_VERSION}; re-run prepare")
    for split in SPLITS:
        if not _split_entry_ok(meta.get("splits"), split):
            raise DataError(f"{path} is corrupt: bad or missing 'splits' entry for {split!r}")
    return meta


def _split_entry_ok(splits, split: str) -> bool:
    try:
        info = splits[split]
        files_ok = all(isinstance(s["file"], str) and "/" not in s["file"] for s in info["shards"])
        return files_ok and isinstance(info["bytes"], int) and sum(s["bytes"] for s in info["shards"]) == info["bytes"]
    except (KeyError, TypeError):
        return False


def total_bytes(meta: dict) -> int:
    return sum(meta["splits"][s]["bytes"] for s in SPLITS)


# --- writing the splits -------------------------------------------------------


class _ShardWriter:
    """Appends bytes to `{split}-NNNNN.bin` files of at most shard_bytes, hashing as it goes."""

    def __init__(self, directory: Path, split: str, shard_bytes: int):
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.bytes = self.documents = 0
        self.shards: list[dict] = []
        self._file = None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._file is None or self._size == self.shard_bytes:
                self._next_shard()
            chunk = view[: self.shard_bytes - self._size]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._size += len(chunk)
            self.bytes += len(chunk)
            view = view[len(chunk) :]

    def write_document(self, doc: bytes) -> None:
        self.write(doc)
        self.write(bytes([DOC_SEP]))
        self.documents += 1

    def close(self) -> dict:
        self._finish_shard()
        return {"bytes": self.bytes, "documents": self.documents, "shards": self.shards}

    def _next_shard(self) -> None:
        self._finish_shard()
        self._name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / self._name, "wb")
        self._hash, self._size = hashlib.sha256(), 0

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.shards.append({"file": self._name, "bytes": self._size, "sha256": self._hash.hexdigest()})


def _write_splits(source: str, directory: Path, options: dict, cache_dir) -> dict:
    """Write both splits' shards into `directory`; returns the split part of meta.json."""
    val_fraction, shard_bytes = options["val_fraction"], options["shard_bytes"]
    skipped = [0]
    docs = _nonempty(iter_documents(source, text_column=options["text_column"], cache_dir=cache_dir), skipped)
    first = next(docs, None)
    if first is None:
        raise DataError(f"corpus {source} is empty")
    second = next(docs, None)
    if second is None:
        splits, _ = _tail_split([first], len(first), val_fraction, directory, shard_bytes, separator=False)
        rule, note, documents = "tail", "one document: its last val_fraction of bytes is val", 1
    else:
        splits = _hash_split(itertools.chain([first, second], docs), val_fraction, directory, shard_bytes)
        rule, note, documents = "hash", "documents assigned by blake2b hash of their bytes", _documents(splits)
        empty = [s for s in SPLITS if splits[s]["bytes"] == 0]
        if val_fraction > 0 and empty:
            # Too few documents to split by hash: split the same document stream by bytes instead.
            total = sum(splits[s]["bytes"] for s in SPLITS)
            for info in splits.values():
                for shard in info["shards"]:
                    (directory / shard["file"]).unlink()
            again = _nonempty(iter_documents(source, text_column=options["text_column"], cache_dir=cache_dir), [0])
            splits, written = _tail_split(again, total, val_fraction, directory, shard_bytes, separator=True)
            if written != total:
                raise DataError(f"source {source} changed while it was being prepared; try again")
            rule = "tail"
            note = f"hash split left {' and '.join(empty)} empty ({documents} documents); split the stream by bytes"
    return {
        "split_rule": rule,
        "split_note": note,
        "documents": documents,
        "empty_documents_skipped": skipped[0],
        "splits": splits,
    }


def _nonempty(docs: Iterable[bytes], skipped: list[int]) -> Iterator[bytes]:
    """Empty documents carry no bytes; skip them but count them for meta.json."""
    for doc in docs:
        if doc:
            yield doc
        else:
            skipped[0] += 1


def _hash_split(docs: Iterable[bytes], val_fraction: float, directory: Path, shard_bytes: int) -> dict:
    train, val = (_ShardWriter(directory, s, shard_bytes) for s in SPLITS)
    threshold = int(val_fraction * 2**64)
    for doc in docs:
        h = int.from_bytes(hashlib.blake2b(doc, digest_size=8).digest(), "little")
        (val if h < threshold else train).write_document(doc)
    return {"train": train.close(), "val": val.close()}


def _tail_split(
    docs: Iterable[bytes], total: int, val_fraction: float, directory: Path, shard_bytes: int, *, separator: bool
) -> tuple[dict, int]:
    """Bytes [0, int(total*(1-val_fraction))) of the stream go to train, the rest to val.

    A document cut in two is counted in both splits. Returns (splits, bytes written).
    """
    train, val = (_ShardWriter(directory, s, shard_bytes) for s in SPLITS)
    cut = int(total * (1 - val_fraction))
    pos = 0
    for doc in docs:
        data = memoryview(doc + bytes([DOC_SEP]) if separator else doc)
        head = min(len(data), max(0, cut - pos))
        if head:
            train.write(data[:head])
            train.documents += 1
        if head < len(data):
            val.write(data[head:])
            val.documents += 1
        pos += len(data)
    return {"train": train.close(), "val": val.close()}, pos


def _documents(splits: dict) -> int:
    return sum(splits[s]["documents"] for s in SPLITS)


# --- the output dir -------------------------------------------------------------


def _check_out_dir(out: Path, fingerprint: str, options: dict, overwrite: bool) -> bool:
    """Raise unless writing to `out` is safe; returns whether a prepared corpus gets replaced."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    if not (out / META_FILE).exists():
        raise DataError(
            f"output dir {out} is not empty and holds no prepared corpus ({META_FILE}); refusing to touch it"
        )
    meta = _read_meta_or_none(out)
    if overwrite or (meta is not None and _matches(meta, fingerprint, options)):
        return True  # re-preparing the same corpus rewrites identical shards
    held = meta.get("source") if meta else "an unreadable corpus"
    raise DataError(
        f"output dir {out} already holds a different prepared corpus ({held}); pass --overwrite to replace it"
    )


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """An advisory lock on a hidden file beside `out`, held for the block."""
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def _read_meta_or_none(directory: Path) -> dict | None:
    try:
        return read_meta(directory)
    except DataError:
        return None


def _matches(meta: dict, fingerprint: str, options: dict) -> bool:
    return meta.get("fingerprint") == fingerprint and all(meta.get(k) == v for k, v in options.items())


def _shards_intact(directory: Path, meta: dict) -> bool:
    """Every shard present, of its recorded size, and of its recorded sha256 if it was written
    since it was prepared (a shard damaged in place at the right size would otherwise be trained
    on; untouched shards are not read, so a start costs no hashing of the corpus)."""
    try:
        verified = json.loads((directory / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        verified = {}
    hashed = False
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return False
            if _stamp(path) == verified.get(shard["file"]) or shard.get("sha256") is None:
                continue
            hashed = True
            if _sha256(path) != shard["sha256"]:
                log.warning("prepared shard %s does not match its sha256: preparing again", path)
                return False
    if hashed:  # remember what was checked, so the next start reads nothing
        _record_verified(directory, meta)
    return True


VERIFIED_FILE = ".verified.json"  # shard -> [size, mtime_ns] when its sha256 last matched


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _record_verified(directory: Path, meta: dict) -> None:
    stamps = {shard["file"]: _stamp(directory / shard["file"])
              for split in SPLITS for shard in meta["splits"][split]["shards"]}
    try:
        (directory / VERIFIED_FILE).write_text(json.dumps(stamps))
    except OSError:  # a read-only corpus: shards are hashed at every start instead
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()
