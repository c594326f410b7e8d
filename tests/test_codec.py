import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bytelm import codec
from bytelm.codec import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, decode_bytes, encode, encode_bytes


def test_vocab_layout():
    assert (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE) == (256, 257, 258, 259)
    assert codec.padded_vocab_size() == 264
    assert codec.padded_vocab_size(64) == 320
    assert codec.padded_vocab_size(1) == VOCAB_SIZE


def test_encode_is_utf8_with_optional_markers():
    assert encode("hi") == [104, 105]
    assert encode("é") == [0xC3, 0xA9]
    assert encode("hi", bos=True, eos=True) == [BOS_ID, 104, 105, EOS_ID]
    assert encode_bytes(b"\x00\xff", eos=True) == [0, 255, EOS_ID]
    assert encode("") == []


def test_decode_skips_special_ids():
    assert decode([BOS_ID, 104, PAD_ID, 105, EOS_ID, PAD_ID]) == "hi"
    assert decode([BOS_ID, EOS_ID]) == ""


@pytest.mark.parametrize(
    "ids",
    [
        np.array([BOS_ID, 104, 105], dtype=np.int64),
        np.array([104, 105], dtype=np.uint8),
        torch.tensor([104, 105, EOS_ID]),
        torch.tensor([104, 105], dtype=torch.int32),
        (104, 105),
    ],
)
def test_decode_accepts_arrays_and_tensors(ids):
    assert decode(ids) == "hi"


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError):
        decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        decode([-1, 104])


def test_invalid_utf8_becomes_replacement_chars():
    assert decode([0x68, 0xFF, 0x69]) == "h\ufffdi"
    assert decode([0xC3]) == "\ufffd"  # truncated sequence


@given(st.text(), st.booleans(), st.booleans())
def test_text_round_trip(text, bos, eos):
    ids = encode(text, bos=bos, eos=eos)
    assert decode(ids) == text
    assert decode(torch.tensor(ids)) == text
    assert all(0 <= i < 256 for i in ids[bos : len(ids) - eos])


@given(st.binary())
def test_arbitrary_bytes_never_raise(data):
    ids = encode_bytes(data)
    assert decode_bytes(ids) == data
    assert decode(ids) == data.decode("utf-8", errors="replace")
    assert decode(np.frombuffer(data, dtype=np.uint8)) == decode(ids)


@given(st.lists(st.integers(0, VOCAB_SIZE - 1)))
def test_any_vocab_ids_decode(ids):
    assert decode(ids) == bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
