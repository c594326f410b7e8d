"""BPE baselines: the byte-level BPE round-trips anything, token corpora are the exact byte
streams of the splits, and a token model's bits per byte equal a hand computation."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bytelm.config import ConfigError, build_config, parse_overrides
from bytelm.data import bpe
from bytelm.data.bpe import TokenCorpus, ensure_tokenized
from bytelm.data.dataset import PreparedCorpus
from bytelm.data.prepare import prepare
from bytelm.data.sources import DataError
from bytelm.tokenizer import BPETokenizer, train_bpe

TEXT = ("Il était une fois, dans un café à Zürich: « naïve façade ». 日本語のテキスト。\n"
        "def f(x):\n    return x  # comment\n\n\nclass A:\n\tpass\r\n" * 30)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 400)


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_round_trip(tokenizer, data):
    ids = tokenizer.encode_bytes(data)
    assert tokenizer.decode_bytes(ids) == data
    assert int(tokenizer.token_bytes[ids].sum()) == len(data)


def test_tokenizer_learns_merges_and_survives_json(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert 256 < tokenizer.vocab_size <= 400  # a tiny corpus runs out of pairs to merge
    assert len(ids) < len(TEXT.encode()) / 2
    again = BPETokenizer.from_json(tokenizer.to_json())
    assert again.encode(TEXT) == ids and not again.is_bytes
    with pytest.raises(ValueError, match="more than the 256 byte tokens"):
        train_bpe([TEXT], 256)


@pytest.fixture
def prepared(tmp_path):
    """Several documents (hash split), invalid UTF-8 included, a few KB."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i:02d}.txt").write_bytes(TEXT[i * 7: i * 7 + 150 + i].encode() + b"\xff\xfe x\n")
    out = tmp_path / "prepared"
    prepare(str(docs), out, val_fraction=0.3)
    return out


def test_token_corpus_is_the_exact_byte_stream(prepared, monkeypatch):
    monkeypatch.setattr(bpe, "PIECE_BYTES", 64)  # many pieces: cuts must not change the tokens
    corpus = TokenCorpus(ensure_tokenized(prepared, 300))
    assert corpus.meta["dtype"] == "uint16"
    for split in ("train", "val"):
        raw = b"".join(bytes(shard) for shard in PreparedCorpus(prepared).shards(split))
        tokens = np.concatenate(corpus.shards(split))
        assert corpus.tokenizer.decode_bytes(tokens) == raw
        assert tokens.tolist() == corpus.tokenizer.encode_bytes(raw)  # as if tokenized whole
        assert corpus.split_bytes(split) == len(raw) and corpus.split_tokens(split) == len(tokens)


def test_pieces_cover_the_stream_and_cut_at_word_ends():
    data = np.frombuffer(b"ab1\ncd  \xc3\xa9f 42x(" * 50 + b"\xe6\x97\xa5" * 100, dtype=np.uint8)
    pieces = list(bpe.iter_pieces(data, 16))
    assert b"".join(pieces) == data.tobytes() and len(pieces) > 5
    end = 0
    for piece in pieces[:-1]:
        end += len(piece)
        left, right = chr(data[end - 1]), chr(data[end])
        word_end = (left.isascii() and right.isascii() and (left.isalpha() and not right.isalpha()
                    or left.isdigit() and not right.isdigit()))
        assert word_end or (end >= 800 and data[end] & 0xC0 != 0x80)  # else a char boundary


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abZ09 \n\t\r'.,-_(\"séßÉ日²\x00")), max_size=80))
def test_cutting_at_every_word_end_keeps_the_tokens_of_the_whole(tokenizer, text):
    """The pre-tokenizer always splits at an ASCII word end (contractions like 's, digit runs,
    whitespace runs and their lookahead included), so pieces cut there tokenize like the whole."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    cuts = [p for p in range(1, len(data)) if bpe._cut_after(data, p, p + 1) == p]
    pieces = [data[a:b].tobytes() for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert sum(tokenizer.encode_batch_bytes(pieces), []) == tokenizer.encode_bytes(data.tobytes())


def test_tokenizing_is_reused_and_redone_when_the_bytes_change(prepared, tmp_path):
    out = ensure_tokenized(prepared, 300)
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert ensure_tokenized(prepared, 300) == out
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "corpus": "another corpus"}))
    ensure_tokenized(prepared, 300)
    assert json.loads((out / "meta.json").read_text())["corpus"] == meta["corpus"]

    (tmp_path / "docs" / "d00.txt").write_text("something else entirely\n" * 20)
    prepare(str(tmp_path / "docs"), prepared, val_fraction=0.3, overwrite=True)
    corpus = TokenCorpus(ensure_tokenized(prepared, 300))
    text = b"".join(corpus.tokenizer.decode_bytes(corpus.shards(s)[0]) for s in ("train", "val"))
    assert b"something else" in text


def test_too_small_vocab_is_a_clear_error(prepared):
    with pytest.raises(DataError, match="bpe vocab size 100 is too small"):
        ensure_tokenized(prepared, 100)
    with pytest.raises(ConfigError, match="data.bpe_vocab_size 256 is too small"):
        build_config(parse_overrides(["--data.tokenizer", "bpe", "--data.bpe_vocab_size", "256"]))
    with pytest.raises(ConfigError, match="data.tokenizer: unknown tokenizer 'words'"):
        build_config(parse_overrides(["--data.tokenizer", "words"]))


def test_model_vocab_follows_the_tokenizer():
    assert build_config(parse_overrides(["--data.tokenizer", "bpe", "--data.bpe_vocab_size",
                                         "1000"])).model.vocab_size == 1000
    assert build_config({}).model.vocab_size == 259
    with pytest.raises(ConfigError, match="model.vocab_size 300 does not match data.tokenizer"):
        build_config(parse_overrides(["--model.vocab_size", "300"]))


def test_val_bpb_of_a_token_model_equals_a_hand_computation(tmp_path):
    """Summed token NLL over the split / (ln 2 x the bytes the scored tokens hold)."""
    import lightning as L

    from bytelm.checkpoint import load_tokenizer
    from bytelm.training.datamodule import ByteDataModule
    from bytelm.training.lm_module import LMTask

    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = build_config(parse_overrides([
        "--data", str(tmp_path / "corpus.txt"), "--data.prepared_dir", str(tmp_path / "prep"),
        "--data.tokenizer", "bpe", "--data.bpe_vocab_size", "320", "--data.seq_len", "16",
        "--data.batch_size", "4", "--data.val_bytes", "null", "--data.val_fraction", "0.2",
        "--model.layer_pattern", "AF", "--model.d_model", "32", "--model.n_layer", "1"]))
    dm = ByteDataModule(cfg.data, cfg.seed)
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(0)
    task = LMTask(cfg.model, cfg.optim, cfg.data.seq_len, tokenizer=dm.tokenizer)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    (metrics,) = trainer.validate(task, datamodule=dm, verbose=False)

    val = TEXT.encode()[int(len(TEXT.encode()) * (1 - 0.2)):]  # the tail split of one document
    tok = load_tokenizer(cfg)  # no checkpoint: the one beside the prepared data
    ids = torch.tensor(tok.encode_bytes(val))
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            window = ids[start:start + 17]
            logits = task.model(window[None, :-1])[0]
            nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
    n_bytes = len(val) - len(tok.decode_bytes(ids[:1]))  # the first token is never predicted
    assert metrics["val/bytes"] == n_bytes and metrics["val/tokens"] == len(ids) - 1
    assert metrics["val/bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["val/token_ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
