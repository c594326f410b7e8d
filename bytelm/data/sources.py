"""Where raw documents come from.

`iter_documents(source)` yields every document of a corpus as raw bytes, in a
deterministic order, exactly as stored (no stripping, no re-encoding). A source is:

- ``stdlib``: every ``.py`` file of the running interpreter's standard library
  (the default corpus: offline, tens of MB, always there).
- ``tinyshakespeare``, ``enwik8``, ``text8``: downloaded once into the cache dir
  (``$BYTELM_CACHE`` or ``~/.cache/bytelm``) and checksum-verified. Each is one
  document. Publications split enwik8/text8 90M/5M/5M; we use the last 10% as
  validation (that is valid + test of the standard split).
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset, streamed (split defaults to train).
- a local file, directory (recursive, sorted by path, hidden entries skipped) or glob.
  ``.jsonl``/``.ndjson`` give one document per line (the text column),
  ``.parquet`` one per row; any other file is one document. Any of them may be
  ``.gz``-compressed. Directories and globs only pick known text suffixes, while
  a file named explicitly is always read (e.g. an unzipped ``enwik8``).

Names win over local paths: pass ``./text8`` to read a local file called text8.
Every user-facing failure is a one-line `DataError` naming what is wrong.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(Exception):
    """A problem with the user's data or data source; the message is one line."""


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str  # of the payload (the unzipped member for zips)
    size: int  # payload bytes
    filename: str  # payload name in the cache dir
    zip_member: str | None = None


# Checksums as published by many independent projects. The payload is hashed,
# not the zip, because mirrors have re-packed the archives over the years.
DOWNLOADS = {
    "tinyshakespeare": Download(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # md5 6fb458f1232090904fb40fe944165e91
        size=1_115_394,
        filename="tinyshakespeare.txt",
    ),
    "enwik8": Download(
        url="http://mattmahoney.net/dc/enwik8.zip",
        sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        size=100_000_000,
        filename="enwik8",
        zip_member="enwik8",
    ),
    "text8": Download(
        url="http://mattmahoney.net/dc/text8.zip",
        sha256="6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
        size=100_000_000,
        filename="text8",
        zip_member="text8",
    ),
}

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
TEXT_SUFFIXES = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".log",
    ".csv", ".tsv", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".xml", ".html", ".htm",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt",
    ".js", ".ts", ".css", ".sh", ".sql", ".lua", ".rb", ".hs", ".ml", ".jl", ".r",
}  # fmt: skip
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
_GLOB_CHARS = set("*?[")


def iter_documents(source: str, *, text_column: str = "text", cache_dir: str | Path | None = None) -> Iterator[bytes]:
    """Yield the documents of `source` as raw bytes, deterministically ordered."""
    if source == "stdlib":
        for path in stdlib_files():
            yield _read_file(path)
    elif source in DOWNLOADS:
        yield _read_file(download(source, cache_dir))
    elif source.startswith("hf:"):
        yield from _iter_hf(source, text_column)
    else:
        for path in local_files(source):
            yield from _iter_file(path, text_column)


def source_fingerprint(source: str, *, text_column: str = "text", cache_dir: str | Path | None = None) -> str:
    """Cheap identity of `source`, read from names, sizes and mtimes (never contents).

    It changes whenever the documents would (as far as cheaply knowable), so a prepared dir
    with the same fingerprint can be reused.
    """
    del cache_dir  # where a download is cached does not change its bytes
    if source == "stdlib":
        files = stdlib_files()
        identity = ["stdlib", sys.version, str(stdlib_dir()), len(files), sum(f.stat().st_size for f in files)]
    elif source in DOWNLOADS:
        identity = [source, DOWNLOADS[source].sha256]
    elif source.startswith("hf:"):
        identity = ["hf", *parse_hf_source(source)]
    else:
        identity = ["local", *([str(p.resolve()), *_size_and_mtime(p)] for p in local_files(source))]
    payload = json.dumps([text_column, identity])
    return hashlib.sha256(payload.encode()).hexdigest()


# --- stdlib ---------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib's .py files, sorted by path relative to the stdlib dir."""
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # pruned, not filtered: site-packages is often far bigger than the stdlib itself
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    if not files:
        raise DataError(f"no .py files found in the standard library dir {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# --- local files ------------------------------------------------------------


def local_files(source: str) -> list[Path]:
    """The files a local path/dir/glob source reads, in reading order."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"no text files ({_suffix_hint()}) found under directory {source}")
        return files
    if _GLOB_CHARS & set(source):
        files = []
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            m = Path(match)
            files += _walk(m) if m.is_dir() else [m] if _is_known(m) else []
        if not files:
            raise DataError(f"no text files ({_suffix_hint()}) match {source}")
        return files
    raise DataError(f"no such file or directory: {source}")


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".") and _is_known(Path(f))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _kind(path: Path) -> str:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _is_known(path: Path) -> bool:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    return suffix.lower() in KNOWN_SUFFIXES


def _suffix_hint() -> str:
    return ".txt, .md, .py, .jsonl, .parquet, ... optionally .gz"


def _size_and_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _read_file(path: Path) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {path}: {_reason(e)}") from None


def _iter_file(path: Path, text_column: str) -> Iterator[bytes]:
    kind = _kind(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path, text_column)
    elif kind == "parquet":
        yield from _iter_parquet(path, text_column)
    else:
        yield _read_file(path)


def _iter_jsonl(path: Path, text_column: str) -> Iterator[bytes]:
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _jsonl_text(line, text_column, f"{path}:{lineno}")
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {path}: {_reason(e)}") from None


def _jsonl_text(line: bytes, text_column: str, where: str) -> bytes:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: invalid JSON ({_reason(e)})") from None
    if not isinstance(record, dict) or text_column not in record:
        raise DataError(f"{where}: no field {text_column!r} in this record (set --text-column)")
    return _text_bytes(record[text_column], where)


def _text_bytes(value, where: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise DataError(f"{where}: text is a {type(value).__name__}, expected a string")
    # surrogatepass keeps lone surrogates from JSON escapes instead of failing the whole corpus
    return value.encode("utf-8", errors="surrogatepass")


def _iter_parquet(path: Path, text_column: str) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pa.BufferReader(_read_file(path)) if path.suffix == ".gz" else path
        table_file = pq.ParquetFile(source)
        names = table_file.schema_arrow.names
        if text_column not in names:
            raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(names)}; set --text-column)")
        column_type = table_file.schema_arrow.field(text_column).type
        text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        if not any(is_text(column_type) for is_text in text_types):
            raise DataError(f"{path}: column {text_column!r} has type {column_type}, expected strings")
        for batch in table_file.iter_batches(columns=[text_column]):
            for value in batch.column(0).to_pylist():
                yield _text_bytes(value, str(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {_reason(e)}") from None


# --- Hugging Face -------------------------------------------------------------


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split)."""
    spec = source.removeprefix("hf:")
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"bad Hugging Face source {source!r}; expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or "train"


def _iter_hf(source: str, text_column: str) -> Iterator[bytes]:
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source} needs the 'datasets' package: pip install datasets") from None
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as e:  # offline, unknown name, bad config: all reported the same way
        raise DataError(f"could not load Hugging Face dataset {source}: {_reason(e)}") from None
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"error while streaming {source} at row {index}: {_reason(e)}") from None
        if text_column not in row:
            raise DataError(f"{source}: no column {text_column!r} (columns: {', '.join(row)}; set --text-column)")
        yield _text_bytes(row[text_column], f"{source} row {index}")
        index += 1


# --- downloads ------------------------------------------------------------------


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("BYTELM_CACHE") or Path.home() / ".cache" / "bytelm").expanduser()


def fetch(url: str, dest: Path) -> None:
    """Copy `url` to `dest` (tests replace this, or use a file:// URL)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def download(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the verified payload of DOWNLOADS[name], downloading it once."""
    spec = DOWNLOADS[name]
    root = cache_root(cache_dir)
    dest = root / spec.filename
    if dest.is_file() and dest.stat().st_size == spec.size and _sha256(dest) == spec.sha256:
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{spec.filename}.{os.getpid()}.tmp"
    fetched = tmp.with_name(tmp.name + ".zip") if spec.zip_member else tmp
    try:
        try:
            fetch(spec.url, fetched)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DataError(
                f"could not download {name} from {spec.url} ({_reason(e)}); "
                f"download it yourself and pass --data /path/to/{spec.filename}"
            ) from None
        if spec.zip_member:
            _unzip_member(fetched, spec.zip_member, tmp, spec.url)
        actual = _sha256(tmp)
        if actual != spec.sha256:
            raise DataError(
                f"checksum mismatch for {name} from {spec.url}: expected sha256 {spec.sha256}, got {actual}"
            )
        os.replace(tmp, dest)  # atomic: the cache never holds a partial file under the real name
    finally:
        for leftover in {tmp, fetched}:
            leftover.unlink(missing_ok=True)
    return dest


def _unzip_member(archive: Path, member: str, dest: Path, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {member} from the archive downloaded from {url}: {_reason(e)}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    """A one-line description of an exception."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


__all__ = [
    "DOWNLOADS",
    "DataError",
    "Download",
    "cache_root",
    "download",
    "fetch",
    "iter_documents",
    "local_files",
    "parse_hf_source",
    "source_fingerprint",
    "stdlib_files",
]
