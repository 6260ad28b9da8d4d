"""Hash n-gram ids (spec 4.2) and frequency n-gram ids (spec 4.3).

The reference hashes with signed 64-bit wrap-around arithmetic and a floor
modulo. We reproduce it bit-exactly without `jax_enable_x64`: every 64-bit
quantity is held as four 16-bit limbs in uint32 lanes, so all partial sums
stay far below 2**32 and no step can overflow silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import masks, tokenizer

# Primes of the rolling hash, indexed by hash function `f` (spec 4.2).
PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

MAX_NGRAM = 16
# Horner reduction multiplies a residue < V by 256 in uint32: V <= 2**24.
MAX_HASH_VOCAB = 1 << 24

_LIMB_BITS = 16
_NUM_LIMBS = 4  # 4 x 16 = 64 bits.
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_MOD64 = 1 << 64


def _limbs_of(value: int) -> list[int]:
  """Splits an int in [0, 2**64) into 16-bit limbs, least significant first."""
  return [(value >> (_LIMB_BITS * k)) & _LIMB_MASK for k in range(_NUM_LIMBS)]


def _check_args(n: int, prime_index: int, vocab_size: int) -> None:
  if not 1 <= n <= MAX_NGRAM:
    raise ValueError(f"n-gram size must be in [1, {MAX_NGRAM}], got {n}")
  if not 0 <= prime_index < len(PRIMES):
    raise ValueError(f"prime_index must be in [0, {len(PRIMES)}), got {prime_index}")
  if not 1 <= vocab_size <= MAX_HASH_VOCAB:
    raise ValueError(
        f"hash vocab size must be in [1, {MAX_HASH_VOCAB}] (2**24, the limit of"
        f" the uint32 limb arithmetic), got {vocab_size}"
    )


def _token_limbs(tokens_KBL: jnp.ndarray) -> list[jnp.ndarray]:
  """Two's complement 64-bit limbs of int32 tokens (sign-extended)."""
  bits_KBL = jax.lax.bitcast_convert_type(tokens_KBL, jnp.uint32)
  high_fill_KBL = jnp.where(tokens_KBL < 0, jnp.uint32(_LIMB_MASK), jnp.uint32(0))
  return [
      bits_KBL & _LIMB_MASK,
      bits_KBL >> _LIMB_BITS,
      high_fill_KBL,
      high_fill_KBL,
  ]


def _coefficient_limbs(tables: Sequence[tuple[int, int]], window: int) -> np.ndarray:
  """uint32 [limb, M, K]: limbs of the power of prime_f for window slot k.

  Table m = (n, f) hashes the last n of the K-slot window; slot K-n+i (the
  i-th oldest byte of its n-gram) gets prime_f**i mod 2**64, others 0.
  """
  coeffs = np.zeros((_NUM_LIMBS, len(tables), window), dtype=np.uint32)
  for m, (n, prime_index) in enumerate(tables):
    for i in range(n):
      power = pow(PRIMES[prime_index], i, _MOD64)
      coeffs[:, m, window - n + i] = _limbs_of(power)
  return coeffs


def _windows(tokens_BL: jnp.ndarray, window: int) -> jnp.ndarray:
  """int32 [K, B, L]: slot k holds x[j - K + 1 + k], zero (BOE) before the row's or the document's start.

  The reference zero-pads only at the row start; stopping at every document start too (`masks`' document
  rule) keeps a packed document's n-grams equal to its n-grams alone.
  """
  length = tokens_BL.shape[1]
  padded_BL = jnp.pad(tokens_BL, ((0, 0), (window - 1, 0)))
  windows_KBL = jnp.stack([padded_BL[:, k : k + length] for k in range(window)])
  lag_K11 = jnp.arange(window - 1, -1, -1, dtype=jnp.int32)[:, None, None]
  in_document_KBL = lag_K11 <= masks.document_positions(tokens_BL)[None]
  return jnp.where(in_document_KBL, windows_KBL, tokenizer.BOE_ID)


def _hash_limbs(windows_KBL: jnp.ndarray, coeffs: np.ndarray) -> list[jnp.ndarray]:
  """sum_k w_k * c_mk mod 2**64 as four normalized 16-bit limbs [M, B, L].

  Schoolbook product on 16-bit limbs; each 16x16-bit product (< 2**32) is
  split into a low and a high half-limb before accumulating, so a limb sum
  has at most 8 * K <= 128 terms below 2**16 (< 2**23): no uint32 overflow.
  """
  w_limbs = _token_limbs(windows_KBL)
  acc = [None] * _NUM_LIMBS

  def add(k, value_MBL):
    acc[k] = value_MBL if acc[k] is None else acc[k] + value_MBL

  for a in range(_NUM_LIMBS):
    for b in range(_NUM_LIMBS - a):
      c_MK11 = jnp.asarray(coeffs[b][:, :, None, None])
      prod_MKBL = w_limbs[a][None] * c_MK11
      add(a + b, jnp.sum(prod_MKBL & _LIMB_MASK, axis=1, dtype=jnp.uint32))
      if a + b + 1 < _NUM_LIMBS:  # Bits >= 2**64 wrap away.
        add(a + b + 1, jnp.sum(prod_MKBL >> _LIMB_BITS, axis=1, dtype=jnp.uint32))
  limbs = []
  carry = jnp.zeros_like(acc[0])
  for k in range(_NUM_LIMBS):
    total = acc[k] + carry
    limbs.append(total & _LIMB_MASK)
    carry = total >> _LIMB_BITS
  return limbs


def _floor_mod_signed(limbs: Sequence[jnp.ndarray], vocab_size: int) -> jnp.ndarray:
  """Floor modulo of the signed int64 held in `limbs` by `vocab_size`."""
  v = jnp.uint32(vocab_size)
  residue = jnp.zeros_like(limbs[0])
  # Horner over bytes, most significant first: residue * 256 + 255 < 2**32.
  for k in reversed(range(_NUM_LIMBS)):
    for shift in (8, 0):
      byte = (limbs[k] >> shift) & 0xFF
      residue = (residue * jnp.uint32(256) + byte) % v
  # A set top bit means the signed value is u - 2**64; floor mod keeps [0, V).
  negative = (limbs[_NUM_LIMBS - 1] >> (_LIMB_BITS - 1)) == 1
  correction = jnp.uint32(_MOD64 % vocab_size)
  residue = jnp.where(negative, (residue + v - correction) % v, residue)
  return residue.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _hash_tables_jit(
    tokens_BL: jnp.ndarray,
    tables: tuple[tuple[int, int], ...],
    vocab_size: int,
) -> jnp.ndarray:
  tokens_BL = tokens_BL.astype(jnp.int32)
  window = max(n for n, _ in tables)
  coeffs = _coefficient_limbs(tables, window)
  limbs = _hash_limbs(_windows(tokens_BL, window), coeffs)
  return _floor_mod_signed(limbs, vocab_size)


def _hash_tables(
    tokens_BL: jnp.ndarray,
    tables: Sequence[tuple[int, int]],
    vocab_size: int,
) -> jnp.ndarray:
  """int32 [M, B, L] hash ids for tables (n, prime_index), all at once."""
  tables = tuple((int(n), int(f)) for n, f in tables)
  for n, prime_index in tables:
    _check_args(n, prime_index, vocab_size)
  # Jitted once per table set, so eager callers do not pay op-by-op dispatch.
  return _hash_tables_jit(jnp.asarray(tokens_BL), tables, int(vocab_size))


def hash_ngram_ids(tokens_BL: jnp.ndarray, n: int, prime_index: int, vocab_size: int) -> jnp.ndarray:
  """Hash ids of the n-gram ending at every position, int32 [B, L].

  Rows and documents are left-padded with n-1 zeros (BOE); the oldest byte of a window gets
  prime**0. Bit-exact for any int32 tokens. `n`, `prime_index` and
  `vocab_size` must be static under jit.
  """
  return _hash_tables(tokens_BL, [(n, prime_index)], vocab_size)[0]


def all_hash_ids(
    tokens_BL: jnp.ndarray,
    group_sizes: Sequence[int],
    num_functions: int,
    vocab_size: int,
) -> jnp.ndarray:
  """Hash ids for every table, int32 [M, B, L], m = f * len(sizes) + i_n."""
  if num_functions < 1 or not group_sizes:
    raise ValueError(f"need num_functions >= 1 and group sizes, got {num_functions}," f" {group_sizes}")
  tables = [(n, f) for f in range(num_functions) for n in group_sizes]
  return _hash_tables(tokens_BL, tables, vocab_size)


# ----------------------------------------------------------------------------
# Frequency n-grams (spec 4.3): host-side numpy, optional feature.
# ----------------------------------------------------------------------------

NgramTable = Mapping[tuple[int, ...], int]


def parse_ngram_to_size(spec: str) -> dict[int, int]:
  """Parses the reference's `"2:38396,3:50000"` string into {n: size}."""
  sizes = {}
  for item in spec.split(","):
    n, size = item.split(":")
    sizes[int(n)] = int(size)
  return sizes


def load_ngram_tables(directory: str | os.PathLike, sizes: Mapping[int, int]) -> dict[int, dict[tuple[int, ...], int]]:
  """Loads `ngram-{n}.pickle` files, keeping the `size` most frequent n-grams.

  Each pickle holds a dict whose "counts" entry is a frequency-sorted list of
  `(ngram_tuple, ...)`; the rank in that list is the table value. Pickle can
  run code: only load files you trust.
  """
  tables = {}
  for n, size in sorted(sizes.items()):
    path = os.path.join(os.fspath(directory), f"ngram-{n}.pickle")
    with open(path, "rb") as f:
      counts = pickle.load(f)["counts"]
    tables[n] = {tuple(int(t) for t in entry[0]): rank for rank, entry in enumerate(counts[:size])}
  return tables


def ngram_ids(tokens_BL: np.ndarray, tables: Mapping[int, NgramTable]) -> np.ndarray:
  """Frequency n-gram ids [num_ngrams, B, L] (n ascending): rank+4, else 0."""
  tokens_BL = np.asarray(tokens_BL, dtype=np.int64)
  batch, length = tokens_BL.shape
  sizes = sorted(tables)
  if sizes and sizes[0] != 2:
    raise ValueError(f"the smallest n-gram size must be 2 (spec 4.3), got {sizes}")
  out = np.zeros((len(sizes), batch, length), dtype=np.int32)
  for i, n in enumerate(sizes):
    table = tables[n]
    padded_BL = np.pad(tokens_BL, ((0, 0), (n - 1, 0)), constant_values=tokenizer.BOE_ID)
    windows = np.lib.stride_tricks.sliding_window_view(padded_BL, n, axis=1)
    flat = windows.reshape(-1, n).tolist()
    ranks = np.asarray([table.get(tuple(w), -1) for w in flat], dtype=np.int64)
    ids = np.where(ranks >= 0, ranks + tokenizer.OFFSET, 0)
    out[i] = ids.reshape(batch, length)
  return out
