"""Hash n-gram ids (spec 4.2) and frequency n-gram ids (spec 4.3)."""

import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import hashing
from blt_jax import tokenizer

HELLO = [1, 76, 105, 112, 112, 115, 48, 36, 123, 115, 118, 112, 104, 37, 2]

# Verified vectors from spec 4.2: prime index 0, V_hash = 500002.
SPEC_VECTORS = {
    3: [
        443987,
        124875,
        393970,
        386145,
        358223,
        190185,
        141703,
        484917,
        141967,
        146186,
        10172,
        334275,
        306354,
        205291,
        240335,
    ],
    4: [
        437197,
        433869,
        117936,
        254402,
        246577,
        30240,
        114083,
        12253,
        461502,
        217488,
        33292,
        467104,
        390141,
        114099,
        79681,
    ],
    5: [
        123201,
        168913,
        27892,
        170862,
        307328,
        265602,
        426354,
        435293,
        113380,
        384029,
        106114,
        86218,
        437928,
        431048,
        360501,
    ],
    6: [
        166353,
        160907,
        92310,
        405250,
        48218,
        280239,
        83968,
        362502,
        28514,
        86291,
        48991,
        483472,
        343264,
        40427,
        360250,
    ],
    7: [
        34117,
        338221,
        15158,
        281878,
        94816,
        340137,
        303839,
        101668,
        427355,
        320433,
        480561,
        142061,
        303606,
        395081,
        108661,
    ],
    8: [
        172383,
        205585,
        456240,
        129346,
        299568,
        322649,
        430431,
        246559,
        94549,
        155186,
        258407,
        498251,
        491201,
        418709,
        336343,
    ],
}
SPEC_N4_OTHER_PRIMES = {
    1: [119331, 35167, 471854, 498236, 61869, 365194],
    2: [323937, 235473, 92120, 381528, 385469, 63686],
}


def _signed_hash(window, prime):
  """Reference rule with Python big ints: int64 wrap-around of sum w_i p^i."""
  total = sum(int(w) * prime**i for i, w in enumerate(window))
  total %= 1 << 64
  return total - (1 << 64) if total >= 1 << 63 else total


def _reference_ids(tokens_BL, n, prime_index, vocab_size):
  prime = hashing.PRIMES[prime_index]
  out = np.zeros(tokens_BL.shape, np.int64)
  for b, row in enumerate(tokens_BL.tolist()):
    padded = [0] * (n - 1) + row
    for j in range(len(row)):
      out[b, j] = _signed_hash(padded[j : j + n], prime) % vocab_size
  return out


def test_x64_is_disabled():
  assert not jax.config.jax_enable_x64


def test_primes():
  assert len(hashing.PRIMES) == 11
  assert hashing.PRIMES[0] == 1000000007
  assert hashing.PRIMES[-1] == 3367900313


def test_spec_vectors_prime0():
  sizes = sorted(SPEC_VECTORS)
  ids_MBL = hashing.all_hash_ids(np.asarray([HELLO]), sizes, 1, 500002)
  assert ids_MBL.dtype == jnp.int32
  for i, n in enumerate(sizes):
    np.testing.assert_array_equal(np.asarray(ids_MBL)[i, 0], SPEC_VECTORS[n])


def test_spec_vectors_other_primes():
  ids_MBL = np.asarray(hashing.all_hash_ids(np.asarray([HELLO]), [4], 3, 500002))
  for prime_index, expected in SPEC_N4_OTHER_PRIMES.items():
    np.testing.assert_array_equal(ids_MBL[prime_index, 0, :6], expected)


def test_spec_vectors_from_encoded_text():
  tokens = tokenizer.encode("Hello, world!")
  assert tokens.tolist() == HELLO
  ids = hashing.hash_ngram_ids(tokens[None], 3, 0, 500002)
  np.testing.assert_array_equal(np.asarray(ids)[0], SPEC_VECTORS[3])


def test_random_against_big_integers():
  vocab_sizes = (500002, 1009, (1 << 23) - 15, 1 << 24)
  rng = np.random.default_rng(0)
  tokens_BL = rng.integers(0, 260, size=(2, 20))
  tokens_BL[0, ::3] = rng.integers(0, 1 << 16, size=tokens_BL[0, ::3].shape)
  tokens_BL[1, 5] = (1 << 16) - 1
  sizes = (1, 2, 3, 5, 8, 16)
  # One jit for all vocab sizes (hash_ids nests): a single compilation.
  fn = jax.jit(lambda t: [hashing.all_hash_ids(t, sizes, 11, v) for v in vocab_sizes])
  outputs = fn(jnp.asarray(tokens_BL, jnp.int32))
  for vocab_size, got_MBL in zip(vocab_sizes, outputs):
    got_MBL = np.asarray(got_MBL)
    assert got_MBL.shape == (11 * len(sizes), 2, 20)
    for f in range(11):
      for i, n in enumerate(sizes):
        np.testing.assert_array_equal(
            got_MBL[f * len(sizes) + i],
            _reference_ids(tokens_BL, n, f, vocab_size),
            err_msg=f"f={f} n={n} V={vocab_size}",
        )


def test_negative_int32_tokens_match_big_integers():
  # The generation filler -1 and other negatives hash as int64 would.
  tokens_BL = np.asarray([[-1, 5, -(1 << 31), 259, (1 << 31) - 1, -7, 0]])
  sizes = (1, 3, 7)
  got_MBL = np.asarray(hashing.all_hash_ids(tokens_BL, sizes, 7, 500002))
  for f in (0, 6):
    for i, n in enumerate(sizes):
      np.testing.assert_array_equal(got_MBL[f * len(sizes) + i], _reference_ids(tokens_BL, n, f, 500002))


def test_negative_hashes_use_floor_modulo():
  # Windows whose wrapped int64 hash is negative: the floor mod must differ
  # from both the unsigned residue and C-style truncation.
  rng = np.random.default_rng(0)
  tokens_BL = rng.integers(4, 260, size=(4, 32))
  n, f, vocab = 8, 0, 500002
  got = np.asarray(hashing.hash_ngram_ids(tokens_BL, n, f, vocab))
  num_negative = 0
  for b in range(4):
    padded = [0] * (n - 1) + tokens_BL[b].tolist()
    for j in range(32):
      signed = _signed_hash(padded[j : j + n], hashing.PRIMES[f])
      if signed < 0:
        num_negative += 1
        assert got[b, j] == signed % vocab
        assert got[b, j] != (signed % (1 << 64)) % vocab
  assert num_negative > 10
  assert got.min() >= 0 and got.max() < vocab


def test_all_hash_ids_order():
  body = HELLO[1:-1]  # no BOS/EOS inside a row: one document, zero padding only at the row start
  tokens_BL = np.asarray([body, body[::-1]])
  sizes = (5, 3, 4)  # Unsorted on purpose: the order is the given one.
  got_MBL = np.asarray(hashing.all_hash_ids(tokens_BL, sizes, 2, 1009))
  assert got_MBL.shape == (6, 2, len(body))
  for f in range(2):
    for i, n in enumerate(sizes):
      np.testing.assert_array_equal(got_MBL[f * len(sizes) + i], _reference_ids(tokens_BL, n, f, 1009))


def test_windows_stop_at_document_starts():
  """A document packed behind another (after its EOS, or at a BOS with no EOS before it) hashes as it does alone."""
  doc_a = [1, 76, 105, 112, 112, 115]  # [BOS] "Hello"
  doc_b = [1, 123, 115, 118, 112, 104, 37]  # [BOS] "world!"
  sizes, vocab = (3, 4, 8), 500002
  alone_b = np.asarray(hashing.all_hash_ids(np.asarray([doc_b]), sizes, 2, vocab))[:, 0]
  for packed in (doc_a + doc_b, doc_a + [2] + doc_b):
    got = np.asarray(hashing.all_hash_ids(np.asarray([packed]), sizes, 2, vocab))[:, 0]
    np.testing.assert_array_equal(got[:, len(packed) - len(doc_b) :], alone_b)
    np.testing.assert_array_equal(
        got[:, : len(doc_a)], np.asarray(hashing.all_hash_ids(np.asarray([doc_a]), sizes, 2, vocab))[:, 0]
    )
  # Continuing bytes of the same document still read back across what came before.
  joined = np.asarray(hashing.all_hash_ids(np.asarray([doc_a + doc_b[1:]]), sizes, 2, vocab))[:, 0]
  assert (joined[:, len(doc_a) :] != alone_b[:, 1:]).any()


def test_jit_without_x64_has_no_64bit_types():
  fn = jax.jit(lambda t: hashing.hash_ngram_ids(t, 8, 0, 500002))
  tokens = jnp.asarray([HELLO], jnp.int32)
  np.testing.assert_array_equal(np.asarray(fn(tokens))[0], SPEC_VECTORS[8])
  hlo = fn.lower(tokens).as_text()  # Includes the nested jitted core.
  assert "ui32" in hlo
  values = re.sub(r"<\{.*?\}>", "", hlo)  # op attributes (e.g. reduce_window's padding) may be i64: not values
  assert not re.search(r"[if]64\b", values)  # No i64/ui64/f64 tensor types.


def test_rejects_unsupported_arguments():
  tokens = np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match="hash vocab size"):
    hashing.hash_ngram_ids(tokens, 3, 0, (1 << 24) + 1)
  with pytest.raises(ValueError, match="n-gram size"):
    hashing.hash_ngram_ids(tokens, 17, 0, 1009)
  with pytest.raises(ValueError, match="n-gram size"):
    hashing.hash_ngram_ids(tokens, 0, 0, 1009)
  with pytest.raises(ValueError, match="prime_index"):
    hashing.hash_ngram_ids(tokens, 3, 11, 1009)


def test_frequency_ngram_ids(tmp_path):
  counts2 = [((101, 102), 9), ((102, 103), 5), ((0, 101), 4), ((1, 2), 1)]
  counts3 = [((101, 102, 103), 7), ((0, 0, 101), 2)]
  for n, counts in ((2, counts2), (3, counts3)):
    with open(tmp_path / f"ngram-{n}.pickle", "wb") as f:
      pickle.dump({"counts": counts}, f)
  tables = hashing.load_ngram_tables(tmp_path, {2: 3, 3: 50})
  assert tables[2] == {(101, 102): 0, (102, 103): 1, (0, 101): 2}  # Top 3.
  tokens_BL = np.asarray([[101, 102, 103, 104], [1, 2, 101, 102]])
  got = hashing.ngram_ids(tokens_BL, tables)
  assert got.shape == (2, 2, 4)
  # n=2 (left-padded with one 0): (0,101) rank 2, (101,102) rank 0, ...
  np.testing.assert_array_equal(got[0], [[6, 4, 5, 0], [0, 0, 0, 4]])
  # n=3: (0,0,101) rank 1, (101,102,103) rank 0.
  np.testing.assert_array_equal(got[1], [[5, 0, 4, 0], [0, 0, 0, 0]])
  assert hashing.parse_ngram_to_size("2:38396,3:50000") == {2: 38396, 3: 50000}
  with pytest.raises(ValueError, match="smallest n-gram size"):
    hashing.ngram_ids(tokens_BL, {3: tables[3]})
