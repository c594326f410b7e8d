import concurrent.futures
import gzip
import hashlib
import itertools
import json
import logging
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bytelm.data.prepare as prepare_mod
from bytelm.data import sources
from bytelm.data.dataset import PreparedCorpus, _draw_windows, iter_eval_windows, sample_batch
from bytelm.data.prepare import DOC_SEP, META_FILE, ensure_prepared, prepare, read_meta
from bytelm.data.sources import DataError, Download, iter_documents, source_fingerprint
from data.prepare import main as cli_main

SEP = bytes([DOC_SEP])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Downloads in these tests use file:// stand-ins; anything else is a bug in the test."""
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        if not str(getattr(url, "full_url", url)).startswith("file://"):
            raise AssertionError(f"test tried to reach the network: {url}")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def docs_of(source, **kw) -> list[bytes]:
    return list(iter_documents(str(source), **kw))


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def is_val(doc: bytes, val_fraction: float) -> bool:
    """The documented hash split rule."""
    return int.from_bytes(hashlib.blake2b(doc, digest_size=8).digest(), "little") < int(val_fraction * 2**64)


def split_stream(directory: Path, split: str) -> bytes:
    meta = read_meta(directory)
    return b"".join((directory / s["file"]).read_bytes() for s in meta["splits"][split]["shards"])


# --- sources: local files ----------------------------------------------------


def test_text_file_is_one_document_kept_byte_for_byte(tmp_path):
    raw = b"line one\r\n\n  indented\ttab\n\xff\xfe invalid utf-8 \x00 nul\n\n\n"
    assert docs_of(write(tmp_path / "a.txt", raw)) == [raw]
    assert docs_of(write(tmp_path / "b.md", b"# title\n")) == [b"# title\n"]


def test_explicit_file_with_unknown_suffix_is_read(tmp_path):
    assert docs_of(write(tmp_path / "enwik8", b"<mediawiki>")) == [b"<mediawiki>"]


def test_gzipped_text(tmp_path):
    raw = "héllo\nworld\n".encode()
    assert docs_of(write(tmp_path / "a.txt.gz", gzip.compress(raw))) == [raw]


@pytest.mark.parametrize("name", ["a.jsonl", "a.ndjson", "a.jsonl.gz"])
def test_jsonl_one_document_per_line(tmp_path, name):
    texts = ["first\nwith newline", "", "ünïcödé ✓ 🎉", "  spaces  "]
    body = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n  \n"
    data = body.encode()
    path = write(tmp_path / name, gzip.compress(data) if name.endswith(".gz") else data)
    assert docs_of(path) == [t.encode() for t in texts]


def test_jsonl_custom_column(tmp_path):
    path = write(tmp_path / "a.jsonl", b'{"content": "x"}\n{"content": "y"}\n')
    assert docs_of(path, text_column="content") == [b"x", b"y"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (b'{"text": "ok"}\n{"text": oops}\n', "a.jsonl:2: invalid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2: no field 'text'"),
        (b'[1, 2]\n', "a.jsonl:1: no field 'text'"),
        (b'{"text": 5}\n', "a.jsonl:1: text is a int"),
        (b'{"text": "\xff"}\n', "a.jsonl:1: invalid JSON"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "a.jsonl", lines)
    with pytest.raises(DataError, match=message) as err:
        docs_of(path)
    assert "\n" not in str(err.value)


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", "two\n", None, "drei ß"], "n": [1, 2, 3, 4]}), path)
    assert docs_of(path) == [b"one", b"two\n", b"", "drei ß".encode()]
    gz = write(tmp_path / "b.parquet.gz", gzip.compress(path.read_bytes()))
    assert docs_of(gz) == docs_of(path)
    with pytest.raises(DataError, match=r"a\.parquet: no column 'body' \(columns: text, n"):
        docs_of(path, text_column="body")
    with pytest.raises(DataError, match="column 'n' has type int64"):
        docs_of(path, text_column="n")


def test_corrupt_files_raise_data_error_naming_them(tmp_path):
    bad_gz = write(tmp_path / "bad.txt.gz", b"not gzip at all")
    with pytest.raises(DataError, match=f"cannot read {bad_gz}"):
        docs_of(bad_gz)
    truncated = write(tmp_path / "cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(DataError, match="cut.jsonl.gz"):
        docs_of(truncated)
    with pytest.raises(DataError, match="bad.parquet"):
        docs_of(write(tmp_path / "bad.parquet", b"PAR1 garbage"))


def test_directory_is_recursive_sorted_and_skips_hidden_and_binary(tmp_path):
    write(tmp_path / "b.txt", b"B")
    write(tmp_path / "a" / "z.md", b"AZ")
    write(tmp_path / "a" / "y.jsonl", b'{"text": "AY1"}\n{"text": "AY2"}\n')
    write(tmp_path / "c" / "d.py.gz", gzip.compress(b"CD"))
    write(tmp_path / ".git" / "x.txt", b"hidden dir")
    write(tmp_path / ".hidden.txt", b"hidden file")
    write(tmp_path / "image.png", b"\x89PNG")
    write(tmp_path / "blob.bin", b"\x00\x01")
    assert docs_of(tmp_path) == [b"AY1", b"AY2", b"AZ", b"B", b"CD"]


def test_directory_without_text_files(tmp_path):
    write(tmp_path / "data" / "image.png", b"\x89PNG")
    with pytest.raises(DataError, match=f"no text files .* under directory {tmp_path / 'data'}"):
        docs_of(tmp_path / "data")


def test_glob(tmp_path):
    for name in ["2.txt", "1.txt", "3.md", "x.png"]:
        write(tmp_path / name, name.encode())
    assert docs_of(f"{tmp_path}/*.txt") == [b"1.txt", b"2.txt"]
    assert docs_of(f"{tmp_path}/*") == [b"1.txt", b"2.txt", b"3.md"]
    with pytest.raises(DataError, match="match .*nothing"):
        docs_of(f"{tmp_path}/nothing*")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=f"^no such file or directory: {tmp_path}/nope.txt$"):
        docs_of(tmp_path / "nope.txt")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_text_reader_returns_arbitrary_bytes_unchanged(data):
    with tempfile.TemporaryDirectory() as d:
        assert docs_of(write(Path(d) / "a.txt", data)) == [data]
        assert docs_of(write(Path(d) / "b.txt.gz", gzip.compress(data))) == [data]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=8), st.booleans())
def test_jsonl_reader_round_trips_arbitrary_text(texts, ensure_ascii):
    with tempfile.TemporaryDirectory() as d:
        lines = "".join(json.dumps({"text": t}, ensure_ascii=ensure_ascii) + "\n" for t in texts)
        path = write(Path(d) / "a.jsonl", lines.encode())
        assert docs_of(path) == [t.encode() for t in texts]


# --- sources: stdlib, Hugging Face, downloads --------------------------------------


def test_stdlib_files_are_sorted_python_files_without_site_packages():
    files = sources.stdlib_files()
    root = sources.stdlib_dir()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and rel == sorted(rel) and sources.stdlib_files() == files
    assert all(r.endswith(".py") and "site-packages" not in r for r in rel)
    first = list(itertools.islice(iter_documents("stdlib"), 5))
    assert first == [f.read_bytes() for f in files[:5]]


class FakeDatasets:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return iter(self.rows)


@pytest.fixture
def fake_hf(monkeypatch):
    import datasets

    fake = FakeDatasets([{"text": "alpha", "id": 1}, {"text": "beta\n", "id": 2}, {"text": None, "id": 3}])
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    return fake


def test_hf_source(fake_hf):
    assert docs_of("hf:user/stories") == [b"alpha", b"beta\n", b""]
    assert fake_hf.calls[-1] == (("user/stories", None), {"split": "train", "streaming": True})
    docs_of("hf:user/stories:en@validation")
    assert fake_hf.calls[-1] == (("user/stories", "en"), {"split": "validation", "streaming": True})
    with pytest.raises(DataError, match=r"hf:user/stories: no column 'body' \(columns: text, id"):
        docs_of("hf:user/stories", text_column="body")


def test_hf_load_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="^could not load Hugging Face dataset hf:x/y: ConnectionError: Couldn't reach the Hub$"):
        docs_of("hf:x/y")


def test_hf_fingerprint_depends_on_name_config_and_column():
    fp = source_fingerprint("hf:a/b:c")
    assert fp == source_fingerprint("hf:a/b:c")
    assert len({fp, source_fingerprint("hf:a/b"), source_fingerprint("hf:a/b:c", text_column="body")}) == 3


def test_prepare_hf_source(tmp_path, fake_hf):
    meta = prepare("hf:user/stories", tmp_path / "p")
    assert meta["documents"] == 2 and meta["empty_documents_skipped"] == 1


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BYTELM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stand_in(monkeypatch, tmp_path, name, payload: bytes, zip_member=None, sha256=None) -> Download:
    """Point DOWNLOADS[name] at a local file:// copy of `payload`."""
    if zip_member:
        upstream = tmp_path / "upstream" / f"{name}.zip"
        upstream.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(upstream, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(zip_member, payload)
    else:
        upstream = write(tmp_path / "upstream" / "input.txt", payload)
    spec = Download(
        url=upstream.as_uri(),
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        filename=sources.DOWNLOADS[name].filename,
        zip_member=zip_member,
    )
    monkeypatch.setitem(sources.DOWNLOADS, name, spec)
    return spec


def test_download_registry_is_pinned():
    shakespeare = sources.DOWNLOADS["tinyshakespeare"]
    assert shakespeare.size == 1_115_394 and shakespeare.url.endswith("tinyshakespeare/input.txt")
    assert {sources.DOWNLOADS[n].size for n in ("enwik8", "text8")} == {100_000_000}
    assert all(len(d.sha256) == 64 for d in sources.DOWNLOADS.values())


def test_download_once_then_reuse_cache(tmp_path, monkeypatch, cache):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    stand_in(monkeypatch, tmp_path, "tinyshakespeare", payload)
    assert docs_of("tinyshakespeare") == [payload]
    assert (cache / "tinyshakespeare.txt").read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]  # no temp files left

    def no_network(url, dest):
        raise AssertionError("fetched again although cached")

    monkeypatch.setattr(sources, "fetch", no_network)
    assert docs_of("tinyshakespeare") == [payload]


def test_download_zip_member(tmp_path, monkeypatch, cache):
    payload = random_bytes(5000)
    stand_in(monkeypatch, tmp_path, "enwik8", payload, zip_member="enwik8")
    assert docs_of("enwik8") == [payload]
    assert sorted(p.name for p in cache.iterdir()) == ["enwik8"]


def test_download_checksum_mismatch(tmp_path, monkeypatch, cache):
    stand_in(monkeypatch, tmp_path, "text8", b"tampered", zip_member="text8", sha256="0" * 64)
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(DataError, match=f"checksum mismatch for text8 .*expected sha256 0{{64}}, got {actual}"):
        docs_of("text8")
    assert list(cache.iterdir()) == []  # nothing half-written or wrong is kept


def test_download_offline_message(tmp_path, monkeypatch, cache):
    def offline(url, dest):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources, "fetch", offline)
    url = sources.DOWNLOADS["tinyshakespeare"].url
    with pytest.raises(DataError) as err:
        docs_of("tinyshakespeare")
    message = str(err.value)
    assert message.startswith(f"could not download tinyshakespeare from {url} (URLError: ")
    assert message.endswith("download it yourself and pass --data /path/to/tinyshakespeare.txt")
    assert "\n" not in message


def test_download_missing_upstream_file(tmp_path, monkeypatch, cache):
    spec = stand_in(monkeypatch, tmp_path, "tinyshakespeare", b"x")
    Path(spec.url.removeprefix("file://")).unlink()
    with pytest.raises(DataError, match="could not download tinyshakespeare"):
        docs_of("tinyshakespeare")


def test_download_bad_zip(tmp_path, monkeypatch, cache):
    spec = stand_in(monkeypatch, tmp_path, "enwik8", b"x", zip_member="enwik8")
    Path(spec.url.removeprefix("file://")).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot extract enwik8 from the archive downloaded from file://"):
        docs_of("enwik8")


# --- fingerprints ---------------------------------------------------------------


def test_local_fingerprint_tracks_file_changes(tmp_path):
    path = write(tmp_path / "a.txt", b"one")
    fp = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == fp
    write(path, b"one more")
    assert source_fingerprint(str(path)) != fp
    assert source_fingerprint(str(path), text_column="x") != source_fingerprint(str(path))


def test_stdlib_and_download_fingerprints_are_stable():
    assert source_fingerprint("stdlib") == source_fingerprint("stdlib")
    assert source_fingerprint("enwik8") != source_fingerprint("text8")


# --- prepare ------------------------------------------------------------------------


@pytest.fixture
def corpus_dir(tmp_path):
    """A directory of 40 small documents of varied bytes."""
    for i in range(40):
        write(tmp_path / "src" / f"doc{i:02d}.txt", random_bytes(50 + 13 * i, seed=i))
    return tmp_path / "src"


def test_prepare_meta_and_shards(tmp_path, corpus_dir):
    out = tmp_path / "out"
    meta = prepare(str(corpus_dir), out, shard_bytes=500)
    assert meta == json.loads((out / META_FILE).read_text())
    assert meta["format_version"] == 1 and meta["doc_separator"] == DOC_SEP == 0
    assert meta["source"] == str(corpus_dir) and meta["fingerprint"] == source_fingerprint(str(corpus_dir))
    assert (meta["val_fraction"], meta["text_column"], meta["split_rule"]) == (0.1, "text", "hash")
    docs = docs_of(corpus_dir)
    assert meta["documents"] == 40 == meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert [s["file"] for s in info["shards"]] == [f"{split}-{i:05d}.bin" for i in range(len(info["shards"]))]
        for shard in info["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == shard["bytes"] <= 500
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        expected = b"".join(d + SEP for d in docs if is_val(d, 0.1) == (split == "val"))
        assert split_stream(out, split) == expected and info["bytes"] == len(expected)
    assert meta["splits"]["val"]["documents"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp dir left


def test_prepare_is_deterministic(tmp_path, corpus_dir):
    a = prepare(str(corpus_dir), tmp_path / "a")
    b = prepare(str(corpus_dir), tmp_path / "b")
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        assert split_stream(tmp_path / "a", split) == split_stream(tmp_path / "b", split)


@pytest.mark.parametrize("n", [1_115_394, 12_345, 10])
def test_single_document_uses_nanogpt_split(tmp_path, n):
    data = random_bytes(n)
    meta = prepare(str(write(tmp_path / "input.txt", data)), tmp_path / "out")
    cut = int(n * 0.9)
    assert split_stream(tmp_path / "out", "train") == data[:cut]
    assert split_stream(tmp_path / "out", "val") == data[cut:]
    assert meta["split_rule"] == "tail" and meta["documents"] == 1


def test_tinyshakespeare_stand_in_gets_nanogpt_split(tmp_path, monkeypatch, cache):
    payload = random_bytes(20_000, seed=3)
    stand_in(monkeypatch, tmp_path, "tinyshakespeare", payload)
    prepare("tinyshakespeare", tmp_path / "out")
    assert split_stream(tmp_path / "out", "train") == payload[:18_000]
    assert split_stream(tmp_path / "out", "val") == payload[18_000:]


def docs_hashed_to(split: str, val_fraction: float, count: int) -> list[bytes]:
    candidates = (f"document number {i}\n".encode() * 20 for i in itertools.count())
    return list(itertools.islice((d for d in candidates if is_val(d, val_fraction) == (split == "val")), count))


@pytest.mark.parametrize("empty_split, val_fraction", [("val", 0.1), ("train", 0.9)])
def test_empty_split_falls_back_to_byte_split(tmp_path, empty_split, val_fraction):
    other = "train" if empty_split == "val" else "val"
    docs = docs_hashed_to(other, val_fraction, 2)
    for i, d in enumerate(docs):
        write(tmp_path / "src" / f"{i}.txt", d)
    meta = prepare(str(tmp_path / "src"), tmp_path / "out", val_fraction=val_fraction)
    stream = b"".join(d + SEP for d in docs)
    cut = int(len(stream) * (1 - val_fraction))
    assert meta["split_rule"] == "tail" and f"left {empty_split} empty" in meta["split_note"]
    assert split_stream(tmp_path / "out", "train") == stream[:cut]
    assert split_stream(tmp_path / "out", "val") == stream[cut:]
    assert meta["documents"] == 2


def test_val_fraction_zero_keeps_everything_in_train(tmp_path, corpus_dir):
    meta = prepare(str(corpus_dir), tmp_path / "out", val_fraction=0)
    assert meta["splits"]["val"] == {"bytes": 0, "documents": 0, "shards": []}
    assert meta["splits"]["train"]["documents"] == 40


def test_empty_documents_are_counted_not_written(tmp_path):
    write(tmp_path / "src" / "a.txt", b"")
    write(tmp_path / "src" / "b.txt", b"bb")
    write(tmp_path / "src" / "c.txt", b"cc")
    meta = prepare(str(tmp_path / "src"), tmp_path / "out")
    assert meta["empty_documents_skipped"] == 1 and meta["documents"] == 2
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == 6


def test_empty_corpus(tmp_path):
    write(tmp_path / "src" / "a.txt", b"")
    with pytest.raises(DataError, match=f"^corpus {tmp_path / 'src'} is empty$"):
        prepare(str(tmp_path / "src"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"shard_bytes": 0}])
def test_bad_options(tmp_path, kwargs):
    with pytest.raises(DataError):
        prepare(str(write(tmp_path / "a.txt", b"abc")), tmp_path / "out", **kwargs)


def test_out_dir_safety(tmp_path, corpus_dir):
    single = str(write(tmp_path / "one.txt", b"x" * 100))
    out = tmp_path / "out"
    prepare(str(corpus_dir), out)
    prepare(str(corpus_dir), out)  # the same corpus again is fine
    with pytest.raises(DataError, match=f"output dir {out} already holds a different prepared corpus"):
        prepare(single, out)
    assert prepare(single, out, overwrite=True)["source"] == single
    write(tmp_path / "mine" / "notes.txt", b"precious")
    with pytest.raises(DataError, match="holds no prepared corpus"):
        prepare(single, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_bytes() == b"precious"
    with pytest.raises(DataError, match="is not a directory"):
        prepare(single, tmp_path / "one.txt")


def test_failed_prepare_leaves_nothing_behind(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "out"
    prepare(str(corpus_dir), out)
    before = split_stream(out, "train")

    def broken(source, **kwargs):
        yield b"a document"
        raise DataError("disk on fire")

    monkeypatch.setattr(prepare_mod, "iter_documents", broken)
    with pytest.raises(DataError, match="disk on fire"):
        prepare(str(corpus_dir), out, overwrite=True)
    assert split_stream(out, "train") == before  # the old corpus is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_ensure_prepared_reuses_until_source_changes(tmp_path, corpus_dir, monkeypatch, caplog):
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="bytelm.data")
    assert ensure_prepared(str(corpus_dir), out) == out
    assert "prepared" in caplog.records[-1].getMessage()
    real_prepare = prepare_mod.prepare

    def must_not_run(*args, **kwargs):
        raise AssertionError("re-prepared an up-to-date corpus")

    monkeypatch.setattr(prepare_mod, "prepare", must_not_run)
    ensure_prepared(str(corpus_dir), out)
    assert caplog.records[-1].getMessage().startswith(f"reusing prepared corpus {out}")

    monkeypatch.setattr(prepare_mod, "prepare", real_prepare)
    write(corpus_dir / "doc00.txt", b"changed content, different size")
    ensure_prepared(str(corpus_dir), out)
    assert "replacing the previous corpus" in caplog.records[-1].getMessage()
    streams = split_stream(out, "train") + split_stream(out, "val")
    assert b"changed content, different size" + SEP in streams


def test_concurrent_ensure_prepared_prepares_once(tmp_path, corpus_dir, caplog):
    caplog.set_level(logging.INFO, logger="bytelm.data")
    out = tmp_path / "out"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ensure_prepared(str(corpus_dir), out), range(4)))
    assert results == [out] * 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("prepared") for m in messages) == 1
    assert sum(m.startswith("reusing") for m in messages) == 3


def test_ensure_prepared_redoes_damaged_or_differently_configured(tmp_path, corpus_dir):
    out = tmp_path / "out"
    ensure_prepared(str(corpus_dir), out)
    shard = out / read_meta(out)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1])
    ensure_prepared(str(corpus_dir), out)
    assert shard.stat().st_size == read_meta(out)["splits"]["train"]["bytes"]
    ensure_prepared(str(corpus_dir), out, val_fraction=0.5)
    assert read_meta(out)["val_fraction"] == 0.5


def test_ensure_prepared_redoes_a_shard_damaged_in_place(tmp_path, corpus_dir):
    """Same size, different bytes (a flipped bit): the sha256 check catches it."""
    out = tmp_path / "out"
    ensure_prepared(str(corpus_dir), out)
    shard = out / read_meta(out)["splits"]["train"]["shards"][0]["file"]
    good = shard.read_bytes()
    shard.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    ensure_prepared(str(corpus_dir), out)
    assert shard.read_bytes() == good


def test_ensure_prepared_does_not_hash_untouched_shards(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "out"
    ensure_prepared(str(corpus_dir), out)

    def no_hashing(path):
        raise AssertionError(f"hashed {path}, which nobody wrote since it was prepared")

    monkeypatch.setattr(prepare_mod, "_sha256", no_hashing)
    ensure_prepared(str(corpus_dir), out)


def test_default_prepared_dir_names_a_non_default_split():
    from bytelm.training.datamodule import default_prepared_dir

    assert default_prepared_dir("tinyshakespeare") == Path("data_cache/tinyshakespeare")
    assert default_prepared_dir("tinyshakespeare", 0.1) == Path("data_cache/tinyshakespeare")
    assert default_prepared_dir("a/b.txt", 0.05) == Path("data_cache/a_b.txt-val0.05")


def test_prepare_relative_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.txt", b"abc" * 10)
    prepare("a.txt", "out")
    assert read_meta("out")["splits"]["train"]["bytes"] == 27
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_prepare_whole_stdlib(tmp_path):
    meta = prepare("stdlib", tmp_path / "out")
    total = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    n_files = len(sources.stdlib_files())
    assert meta["documents"] + meta["empty_documents_skipped"] == n_files
    assert total == sum(f.stat().st_size for f in sources.stdlib_files()) + meta["documents"]
    assert 0.03 < meta["splits"]["val"]["bytes"] / total < 0.3
    corpus = PreparedCorpus(tmp_path / "out")
    assert sample_batch(corpus, "val", seq_len=256, batch_size=4, seed=0, step=0).shape == (4, 257)


def test_cli(tmp_path, capsys):
    src = write(tmp_path / "a.txt", b"hello world\n" * 100)
    assert cli_main(["--data", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "train: 960 bytes" in out and "val: 240 bytes" in out
    assert cli_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no such file or directory: {tmp_path / 'missing'}\n"


# --- PreparedCorpus ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A corpus with several shards per split; shared by the sampler tests (read-only)."""
    root = tmp_path_factory.mktemp("prepared")
    for i in range(60):
        write(root / "src" / f"{i:02d}.txt", random_bytes(200 + 37 * i, seed=100 + i))
    prepare(str(root / "src"), root / "out", shard_bytes=4000)
    return PreparedCorpus(root / "out")


def test_corpus_sizes(prepared):
    meta = prepared.meta
    assert prepared.split_bytes("train") == meta["splits"]["train"]["bytes"]
    assert prepared.total_bytes == prepared.split_bytes("train") + prepared.split_bytes("val")
    assert len(prepared.shards("train")) > 3
    assert all(isinstance(s, np.memmap) and s.dtype == np.uint8 for s in prepared.shards("train"))
    with pytest.raises(DataError, match="no split 'test'"):
        prepared.split_bytes("test")


def test_corpus_pickles_without_its_memmaps(prepared):
    prepared.shards("train")
    clone = pickle.loads(pickle.dumps(prepared))
    assert clone._maps == {}
    assert np.array_equal(clone.shards("train")[0], prepared.shards("train")[0])


def test_corpus_missing_or_corrupt_meta(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'meta.json'} is missing"):
        PreparedCorpus(tmp_path)
    write(tmp_path / "meta.json", b"{not json")
    with pytest.raises(DataError, match=f"cannot read {tmp_path / 'meta.json'}"):
        PreparedCorpus(tmp_path)
    write(tmp_path / "meta.json", b'{"format_version": 99}')
    with pytest.raises(DataError, match="format_version 99"):
        PreparedCorpus(tmp_path)
    write(tmp_path / "meta.json", b'{"format_version": 1, "splits": {"train": {}}}')
    with pytest.raises(DataError, match="is corrupt"):
        PreparedCorpus(tmp_path)


def test_corpus_checks_shard_files(tmp_path):
    prepare(str(write(tmp_path / "a.txt", b"abcdefghij" * 10)), tmp_path / "out")
    shard = tmp_path / "out" / "train-00000.bin"
    shard.write_bytes(b"short")
    with pytest.raises(DataError, match=f"shard {shard} has 5 bytes but meta.json says 90"):
        PreparedCorpus(tmp_path / "out").shards("train")
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        PreparedCorpus(tmp_path / "out").shards("train")


# --- sampling ---------------------------------------------------------------------------------


def window_positions(corpus, split, batch):
    """(shard, start) of every row, found by searching the shards; each row must occur somewhere."""
    positions = []
    for row in batch:
        needle = row.astype(np.uint8).tobytes()
        hits = [(i, bytes(s).find(needle)) for i, s in enumerate(corpus.shards(split))]
        hits = [(i, p) for i, p in hits if p >= 0]
        assert hits, "row is not a window of any shard"
        positions.append(hits[0])
    return positions


def test_sample_batch_shape_and_determinism(prepared):
    kw = dict(seq_len=63, batch_size=8, seed=1)
    a = sample_batch(prepared, "train", step=5, **kw)
    assert a.shape == (8, 64) and a.dtype == np.int64
    assert np.array_equal(a, sample_batch(prepared, "train", step=5, **kw))
    assert not np.array_equal(a, sample_batch(prepared, "train", step=6, **kw))
    assert not np.array_equal(a, sample_batch(prepared, "train", step=5, seq_len=63, batch_size=8, seed=2))
    window_positions(prepared, "train", a)


def test_ranks_get_disjoint_windows_and_union_equals_single_rank(prepared):
    kw = dict(seq_len=31, seed=7, step=3)
    r0 = sample_batch(prepared, "train", batch_size=16, rank=0, world_size=2, **kw)
    r1 = sample_batch(prepared, "train", batch_size=16, rank=1, world_size=2, **kw)
    single = sample_batch(prepared, "train", batch_size=32, **kw)
    assert np.array_equal(np.concatenate([r0, r1]), single)
    spans = sorted((shard, start, start + 32) for shard, start in window_positions(prepared, "train", single))
    for (s1, _, end1), (s2, start2, _) in zip(spans, spans[1:]):
        assert s1 != s2 or end1 <= start2, "windows overlap"


def test_sampling_covers_all_shards(prepared):
    used = set()
    for step in range(20):
        batch = sample_batch(prepared, "train", seq_len=15, batch_size=16, seed=0, step=step)
        used |= {shard for shard, _ in window_positions(prepared, "train", batch)}
    assert used == set(range(len(prepared.shards("train"))))


def test_split_shorter_than_a_window(tmp_path):
    prepare(str(write(tmp_path / "a.txt", b"x" * 100)), tmp_path / "out")
    corpus = PreparedCorpus(tmp_path / "out")
    with pytest.raises(DataError, match=r"^split 'val' has 10 bytes, fewer than one window of seq_len\+1=11; lower seq_len"):
        sample_batch(corpus, "val", seq_len=10, batch_size=1, seed=0, step=0)
    assert sample_batch(corpus, "val", seq_len=9, batch_size=1, seed=0, step=0).tolist() == [[ord("x")] * 10]


def test_shards_smaller_than_a_window(tmp_path):
    prepare(str(write(tmp_path / "a.txt", random_bytes(100))), tmp_path / "out", shard_bytes=10)
    with pytest.raises(DataError, match="no shard of split 'train' .* re-prepare with a larger shard_bytes"):
        sample_batch(PreparedCorpus(tmp_path / "out"), "train", seq_len=15, batch_size=1, seed=0, step=0)


def test_fewer_slots_than_rows_overlaps_deterministically(tmp_path):
    data = random_bytes(1000)
    prepare(str(write(tmp_path / "a.txt", data)), tmp_path / "out", val_fraction=0)
    corpus = PreparedCorpus(tmp_path / "out")
    a = sample_batch(corpus, "train", seq_len=199, batch_size=12, seed=0, step=0)  # 5 slots, 12 rows
    assert np.array_equal(a, sample_batch(corpus, "train", seq_len=199, batch_size=12, seed=0, step=0))
    for row in a:
        assert data.find(row.astype(np.uint8).tobytes()) >= 0


def test_bad_sampling_arguments(prepared):
    with pytest.raises(ValueError):
        sample_batch(prepared, "train", seq_len=8, batch_size=2, seed=0, step=0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        sample_batch(prepared, "train", seq_len=0, batch_size=2, seed=0, step=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 500), min_size=1, max_size=6),
    st.integers(1, 64),
    st.integers(1, 40),
    st.integers(0, 2**32),
)
def test_draw_windows_in_range_and_distinct(sizes, window, n, seed):
    sizes = np.array(sizes, dtype=np.int64)
    if sizes.max() < window:
        return
    draw = lambda: _draw_windows(np.random.default_rng([seed, 0]), sizes, window, n)  # noqa: E731
    shard_ids, starts = draw()
    assert len(shard_ids) == n
    assert np.all(starts >= 0) and np.all(starts + window <= sizes[shard_ids])
    assert all(np.array_equal(x, y) for x, y in zip(draw(), (shard_ids, starts)))
    if (sizes // window).sum() >= n:  # enough slots: no two windows overlap
        spans = sorted(zip(shard_ids.tolist(), starts.tolist()))
        for (s1, a1), (s2, a2) in zip(spans, spans[1:]):
            assert s1 != s2 or a1 + window <= a2


@settings(max_examples=50, deadline=None)
@given(
    split=st.sampled_from(["train", "val"]),
    seq_len=st.integers(1, 300),
    batch_size=st.integers(1, 8),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    step=st.integers(0, 10**6),
)
def test_sample_batch_property(prepared, split, seq_len, batch_size, world_size, seed, step):
    rows = [
        sample_batch(prepared, split, seq_len=seq_len, batch_size=batch_size, seed=seed, step=step, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    whole = sample_batch(prepared, split, seq_len=seq_len, batch_size=batch_size * world_size, seed=seed, step=step)
    assert np.array_equal(np.concatenate(rows), whole)
    assert whole.min() >= 0 and whole.max() < 256
    window_positions(prepared, split, whole)


# --- evaluation windows --------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 7, 100, 10_000])
def test_eval_windows_tile_the_split(prepared, seq_len):
    stream = np.frombuffer(b"".join(bytes(s) for s in prepared.shards("val")), dtype=np.uint8)
    windows = list(iter_eval_windows(prepared, "val", seq_len))
    assert all(2 <= len(w) <= seq_len + 1 and w.dtype == np.int64 for w in windows)
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))  # one byte of shared context
    targets = np.concatenate([w[1:] for w in windows])
    assert np.array_equal(targets, stream[1:])  # every byte but the first is predicted exactly once
    assert np.array_equal(windows[0][0], stream[0])


def test_eval_windows_span_shards_and_respect_max_bytes(prepared):
    stream = b"".join(bytes(s) for s in prepared.shards("train"))
    windows = list(iter_eval_windows(prepared, "train", 999, max_bytes=5000))
    assert len(prepared.shards("train")[0]) < 5000  # so a window crossed a shard boundary
    rebuilt = bytes(windows[0][:1].astype(np.uint8)) + b"".join(bytes(w[1:].astype(np.uint8)) for w in windows)
    assert rebuilt == stream[:5000]
    assert [w.tolist() for w in windows] == [w.tolist() for w in iter_eval_windows(prepared, "train", 999, max_bytes=5000)]


def test_eval_windows_need_two_bytes(tmp_path, corpus_dir):
    prepare(str(corpus_dir), tmp_path / "out", val_fraction=0)
    with pytest.raises(DataError, match="split 'val' .* has 0 bytes"):
        list(iter_eval_windows(PreparedCorpus(tmp_path / "out"), "val", 16))


