"""Property tests filling what test_codec.py and test_data.py leave open: the whole prepare path
over arbitrary documents (any bytes, invalid UTF-8, empty documents, separators inside them),
huge lines, and the sampler and evaluation windows over arbitrary corpora and shard sizes."""

import gzip
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bytelm.codec import BOS_ID, EOS_ID, VOCAB_SIZE, decode_bytes, encode_bytes
from bytelm.data.dataset import PreparedCorpus, iter_eval_windows, sample_batch
from bytelm.data.prepare import DOC_SEP, prepare, read_meta
from bytelm.data.sources import DataError, iter_documents

SEP = bytes([DOC_SEP])


def split_stream(directory: Path, split: str) -> bytes:
    meta = read_meta(directory)
    return b"".join((directory / s["file"]).read_bytes() for s in meta["splits"][split]["shards"])


def expected_splits(docs: list[bytes], val_fraction: float) -> tuple[bytes, bytes]:
    """train and val streams by the rule documented in bytelm/data/prepare.py."""
    docs = [d for d in docs if d]
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return docs[0][:cut], docs[0][cut:]
    threshold = int(val_fraction * 2**64)
    is_val = [int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), "little") < threshold
              for d in docs]
    train = b"".join(d + SEP for d, v in zip(docs, is_val) if not v)
    val = b"".join(d + SEP for d, v in zip(docs, is_val) if v)
    if val_fraction > 0 and not (train and val):  # too few documents: split the stream by bytes
        stream = b"".join(d + SEP for d in docs)
        cut = int(len(stream) * (1 - val_fraction))
        return stream[:cut], stream[cut:]
    return train, val


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.binary(max_size=200), min_size=1, max_size=6),
       val_fraction=st.sampled_from([0.0, 0.1, 0.5]),
       shard_bytes=st.integers(1, 300))
def test_prepare_keeps_every_byte_of_arbitrary_documents(docs, val_fraction, shard_bytes):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        for i, doc in enumerate(docs):  # one file per document, read in name order
            (src / f"{i:03d}.txt").write_bytes(doc)
        assert list(iter_documents(str(src))) == docs
        if not any(docs):
            with pytest.raises(DataError, match="is empty"):
                prepare(str(src), Path(d) / "out", val_fraction=val_fraction)
            return
        meta = prepare(str(src), Path(d) / "out", val_fraction=val_fraction,
                       shard_bytes=shard_bytes)
        train, val = expected_splits(docs, val_fraction)
        assert split_stream(Path(d) / "out", "train") == train
        assert split_stream(Path(d) / "out", "val") == val
        assert meta["empty_documents_skipped"] == docs.count(b"")
        assert all(s["bytes"] <= shard_bytes for sp in ("train", "val")
                   for s in meta["splits"][sp]["shards"])


def test_huge_lines_are_read_whole(tmp_path):
    line = (bytes(range(1, 256)) * 8300)[:2_000_000]  # 2 MB, no newline, invalid UTF-8 included
    (tmp_path / "a.txt").write_bytes(line)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(line + b"\n" + line))
    text = "é" * 600_000
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n" + '{"text": ""}\n')
    assert list(iter_documents(str(tmp_path / "a.txt"))) == [line]
    assert list(iter_documents(str(tmp_path / "b.txt.gz"))) == [line + b"\n" + line]
    assert list(iter_documents(str(tmp_path / "c.jsonl"))) == [text.encode(), b""]
    meta = prepare(str(tmp_path / "a.txt"), tmp_path / "out", shard_bytes=1 << 20)
    assert split_stream(tmp_path / "out", "train") + split_stream(tmp_path / "out", "val") == line
    assert len(meta["splits"]["train"]["shards"]) == 2


@settings(max_examples=30, deadline=None)
@given(size=st.integers(2, 400), shard_bytes=st.integers(1, 120), seq_len=st.integers(1, 50),
       batch_size=st.integers(1, 6), seed=st.integers(0, 2**32), step=st.integers(0, 10**9),
       max_bytes=st.none() | st.integers(2, 500))
def test_sampler_and_eval_windows_on_arbitrary_corpora(size, shard_bytes, seq_len, batch_size,
                                                       seed, step, max_bytes):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.txt").write_bytes(data)
        prepare(str(Path(d) / "a.txt"), Path(d) / "out", val_fraction=0.5, shard_bytes=shard_bytes)
        corpus = PreparedCorpus(Path(d) / "out")
        shards = [bytes(s) for s in corpus.shards("train")]
        kw = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, step=step)
        if max(len(s) for s in shards) < seq_len + 1:
            with pytest.raises(DataError, match="window of seq_len"):
                sample_batch(corpus, "train", **kw)
        else:
            batch = sample_batch(corpus, "train", **kw)
            assert batch.shape == (batch_size, seq_len + 1)
            assert np.array_equal(batch, sample_batch(corpus, "train", **kw))  # deterministic
            for row in batch:  # every row is a window lying inside one shard
                assert any(row.astype(np.uint8).tobytes() in s for s in shards)

        val = split_stream(Path(d) / "out", "val")
        n = len(val) if max_bytes is None else min(max_bytes, len(val))
        if n < 2:
            with pytest.raises(DataError, match="evaluation needs at least 2"):
                list(iter_eval_windows(corpus, "val", seq_len, max_bytes=max_bytes))
            return
        windows = list(iter_eval_windows(corpus, "val", seq_len, max_bytes=max_bytes))
        targets = b"".join(w[1:].astype(np.uint8).tobytes() for w in windows)
        assert targets == val[1:n] and all(len(w) <= seq_len + 1 for w in windows)


@given(st.binary(), st.booleans(), st.booleans())
def test_markers_wrap_any_bytes(data, bos, eos):
    ids = encode_bytes(data, bos=bos, eos=eos)
    assert all(0 <= i < VOCAB_SIZE for i in ids) and len(ids) == len(data) + bos + eos
    assert ids[bos:len(ids) - eos] == list(data)
    assert ids.count(BOS_ID) == bos and ids.count(EOS_ID) == eos
    assert decode_bytes(ids) == data
    assert decode_bytes(np.array(ids, dtype=np.int64)) == data
