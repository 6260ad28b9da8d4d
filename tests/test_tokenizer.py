"""Byte tokenizer against the reference fixtures (spec section 1)."""

import json

import numpy as np
import pytest

from blt_jax import tokenizer


def _load(fixtures_dir, name):
  return json.loads((fixtures_dir / name).read_text())


def test_constants():
  assert (tokenizer.BOE_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (0, 1, 2)
  assert (tokenizer.BPE_ID, tokenizer.OFFSET) == (3, 4)
  assert tokenizer.VOCAB_SIZE == 260
  assert tokenizer.ByteTokenizer().get_vocab_size() == 260
  assert tokenizer.ByteTokenizer.pad_id == tokenizer.BOE_ID


def test_encode_matches_fixture(fixtures_dir):
  data = _load(fixtures_dir, "tokenizer_data.json")
  for text, tokens in zip(data["texts"], data["tokens"]):
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, tokens)
    assert tokenizer.decode(tokens) == text
    np.testing.assert_array_equal(tokenizer.ByteTokenizer().encode(text), tokens)


def test_decode_drops_bpe_delimiters(fixtures_dir):
  # The bpe_delim fixture only differs by id 3 markers, which decode drops.
  data = _load(fixtures_dir, "tokenizer_data_bpe_delim.json")
  for text, tokens in zip(data["texts"], data["tokens"]):
    assert tokenizer.BPE_ID in tokens
    assert tokenizer.decode(tokens) == text


def test_bos_eos_flags():
  np.testing.assert_array_equal(tokenizer.encode("ab"), [1, 101, 102, 2])
  np.testing.assert_array_equal(tokenizer.encode("ab", add_eos=False), [1, 101, 102])
  np.testing.assert_array_equal(tokenizer.encode("ab", add_bos=False, add_eos=False), [101, 102])
  assert tokenizer.encode("").tolist() == [1, 2]
  tok = tokenizer.ByteTokenizer(add_bos=False, add_eos=False)
  assert tok.encode("a").tolist() == [101]
  assert tok.encode("a", add_bos=True).tolist() == [1, 101]


def test_utf8_multibyte():
  ids = tokenizer.encode("é€", add_bos=False, add_eos=False)
  np.testing.assert_array_equal(ids - 4, list("é€".encode()))
  assert tokenizer.decode(ids) == "é€"


def test_raw_bytes_round_trip_losslessly():
  every_byte = bytes(range(256)) + b"\xff\xfe\x80"  # Invalid UTF-8 included.
  ids = tokenizer.encode(every_byte)
  assert ids.min() >= 0 and ids.max() == 259
  assert tokenizer.decode_bytes(ids) == every_byte
  assert tokenizer.ByteTokenizer().decode_bytes(ids) == every_byte


def test_decode_ignores_invalid_utf8():
  ids = tokenizer.encode(b"a\xffb\xc3")
  assert tokenizer.decode(ids) == "ab"


def test_decode_drops_specials_and_generation_filler():
  ids = [1, 101, 0, 3, -1, 102, 2]
  assert tokenizer.decode(ids) == "ab"
  assert tokenizer.decode(np.asarray(ids)) == "ab"


def test_cut_at_eos():
  ids = [1, 101, 2, 102, 2]
  assert tokenizer.decode(ids) == "ab"
  assert tokenizer.decode(ids, cut_at_eos=True) == "a"
  assert tokenizer.decode_bytes(ids, cut_at_eos=True) == b"a"
  assert tokenizer.decode([1, 101], cut_at_eos=True) == "a"


def test_bad_inputs():
  with pytest.raises(ValueError, match="outside the byte vocabulary"):
    tokenizer.decode([1, 260])
  with pytest.raises(TypeError):
    tokenizer.encode(123)
