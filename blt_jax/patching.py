"""Patching as fixed-shape, jit-able jnp functions (spec section 3).

Conventions: the model input has N tokens. With `include_next_token=True` the
patcher decides patch starts for T = N + 1 positions (position N is the
not-yet-seen next token, which the model requires, spec 3.2); otherwise T = N.
A patching is a boolean start mask `starts_BT`; `starts_to_patches` turns it
into right-padded lengths with a fixed number of patch columns.

Every public function is jitted; all arguments except the arrays are static
(hashable Python values), so each configuration compiles once.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import masks, tokenizer

DEFAULT_THRESHOLD = 1.335442066192627  # Released BLT-1B (spec 3.6, 3.7).
MODES = ("entropy", "space", "static", "byte")


class Patches(NamedTuple):
  """Fixed-shape patching of T positions into at most P patches."""

  patch_lengths_BP: jnp.ndarray  # int32, zero right-padded; rows sum to T.
  patch_ids_BT: jnp.ndarray  # int32, patch of each position (incl. next).
  num_patches_B: jnp.ndarray  # int32, non-empty patches per row (<= P).
  overflow_B: jnp.ndarray  # bool, the row needed more than P patches.


def _num_positions(num_tokens: int, include_next_token: bool) -> int:
  return num_tokens + 1 if include_next_token else num_tokens


def _positions(num_positions: int) -> jnp.ndarray:
  return jnp.arange(num_positions, dtype=jnp.int32)


def _row_positions(batch: int, num_positions: int) -> jnp.ndarray:
  return jnp.broadcast_to(_positions(num_positions)[None, :], (batch, num_positions))


def document_positions(tokens_BN: jnp.ndarray, include_next_token: bool = True) -> jnp.ndarray:
  """int32 [B, T]: each position's index in its document (`masks`' rule).

  The not-yet-seen next-token position N continues the last document (even
  after an EOS, as in the reference; no scored byte reads its patch).
  """
  starts_BN = masks.document_starts(tokens_BN)
  if include_next_token:
    starts_BN = jnp.pad(starts_BN, ((0, 0), (0, 1)))
  return masks.positions_from_starts(starts_BN)


def _force_first_two(starts_BT: jnp.ndarray, doc_pos_BT: jnp.ndarray | None = None) -> jnp.ndarray:
  """Every document's positions 0 and 1 start (the model needs its first patch == [BOS], spec 10.3/13.5)."""
  if doc_pos_BT is None:
    return starts_BT | (_positions(starts_BT.shape[1]) < 2)[None, :]
  return starts_BT | (doc_pos_BT < 2)


def _scalar_in(value, dtype) -> jnp.ndarray:
  """Rounds a threshold once into `dtype`, as torch does for a Python scalar."""
  if isinstance(value, (int, float)):
    # Directly from the Python double: no intermediate float32 rounding.
    return jnp.asarray(np.asarray(value, np.float64).astype(dtype))
  return jnp.asarray(value).astype(dtype)


@functools.partial(
    jax.jit, static_argnames=("threshold", "threshold_add", "monotonicity", "include_next_token", "compare_dtype")
)
def entropy_starts(
    entropies_BN: jnp.ndarray,
    threshold: float,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    include_next_token: bool = True,
    compare_dtype=jnp.float32,
    doc_pos_BT: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """Entropy patch starts, bool [B, T] (spec 3.3).

  Position p >= 2 is decided by e[p-1] (and e[p-2]), so with
  `include_next_token` the last entropy e[N-1] decides position N.
  `compare_dtype=jnp.bfloat16` reproduces realtime patching, where the test is
  bf16(e) > bf16(threshold) (quirk Q4). `monotonicity` wins over
  `threshold_add` when both are set, as in the reference. `doc_pos_BT`
  (`document_positions`) makes every document start as a row does; without
  it the row is one document.
  """
  batch, num_tokens = entropies_BN.shape
  num_positions = _num_positions(num_tokens, include_next_token)
  e_BN = entropies_BN.astype(jnp.float32).astype(compare_dtype)
  # e_prev[p] = e[p-1] and e_prev2[p] = e[p-2]; positions 0/1 are forced below.
  e_prev_BT = jnp.pad(e_BN, ((0, 0), (1, 0)))[:, :num_positions]
  e_prev2_BT = jnp.pad(e_BN, ((0, 0), (2, 0)))[:, :num_positions]
  if doc_pos_BT is None:
    doc_pos_BT = _row_positions(batch, num_positions)
  pos_1T = doc_pos_BT  # the p == 2 / p == 3 quirks count from each document's start
  thr = _scalar_in(threshold, compare_dtype)
  if monotonicity:
    # Spec 3.3 / quirk Q13: p = 2 always starts.
    diff_BT = e_prev_BT - e_prev2_BT
    starts_BT = (diff_BT > thr) | (pos_1T == 2)
  elif threshold_add is not None:
    thr_add = _scalar_in(threshold_add, compare_dtype)
    diff_BT = e_prev_BT - e_prev2_BT
    both_BT = (diff_BT > thr_add) & (e_prev_BT > thr)
    # Quirk Q13 (spec 3.3): p = 2 always starts, p = 3 never does.
    starts_BT = jnp.where(pos_1T == 3, False, both_BT | (pos_1T == 2))
  else:
    starts_BT = e_prev_BT > thr
  starts_BT = jnp.broadcast_to(starts_BT, (batch, num_positions))
  return _force_first_two(starts_BT, doc_pos_BT)


def _space_like(tokens_BN: jnp.ndarray) -> jnp.ndarray:
  """Byte is not [0-9A-Za-z] and not a UTF-8 continuation byte; specials too."""
  b = tokens_BN - tokenizer.OFFSET
  return (
      (b < ord("0"))
      | ((b > ord("9")) & (b < ord("A")))
      | ((b > ord("Z")) & (b < ord("a")))
      | ((b > ord("z")) & (b < 0x80))
      | (b >= 0xC0)
  )


@functools.partial(jax.jit, static_argnames=("include_next_token",))
def space_starts(tokens_BN: jnp.ndarray, include_next_token: bool = True) -> jnp.ndarray:
  """SpaceByte-like starts, bool [B, T] (spec 3.4).

  The first byte of a run of space-like bytes ends its patch (`[BOS] [Hello ]
  [world]`); special ids always do. Tokens t-1 and t decide position t + 1.
  The reference's padding-row bug (Q14) does not arise with fixed shapes.
  """
  num_tokens = tokens_BN.shape[1]
  num_positions = _num_positions(num_tokens, include_next_token)
  space_BN = _space_like(tokens_BN)
  prev_space_BN = jnp.pad(space_BN, ((0, 0), (1, 0)))[:, :num_tokens]
  ends_BN = (space_BN & ~prev_space_BN) | (tokens_BN < tokenizer.OFFSET)
  starts_BT = jnp.pad(ends_BN, ((0, 0), (1, 0)))[:, :num_positions]
  return _force_first_two(starts_BT, document_positions(tokens_BN, include_next_token))


@functools.partial(
    jax.jit, static_argnames=("batch", "num_tokens", "patch_size", "include_next_token", "first_patch_single_byte")
)
def static_starts(
    batch: int,
    num_tokens: int,
    patch_size: int,
    include_next_token: bool = True,
    first_patch_single_byte: bool = True,
    doc_pos_BT: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """Static starts every `patch_size` positions, bool [B, T] (spec 3.4).

  The reference gives lengths patch_size, ..., remainder, whose first patch is
  not 1 byte; the model asserts that it is. `first_patch_single_byte=True`
  splits position 1 off as the training packer does (spec 13.5). With
  `doc_pos_BT` (`document_positions`) the count restarts at every document.
  """
  if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1:
    # The reference's float default 4.5 is broken (quirk Q15).
    raise ValueError(f"static patching needs an int patch_size >= 1, got {patch_size!r}")
  patch_size = int(patch_size)
  if doc_pos_BT is None:  # the row is one document
    doc_pos_BT = _row_positions(batch, _num_positions(num_tokens, include_next_token))
  starts_BT = doc_pos_BT % patch_size == 0  # counted from each document's start
  if first_patch_single_byte:
    starts_BT = starts_BT | (doc_pos_BT == 1)
  return starts_BT


@functools.partial(jax.jit, static_argnames=("batch", "num_tokens", "include_next_token"))
def byte_starts(batch: int, num_tokens: int, include_next_token: bool = True) -> jnp.ndarray:
  """Every position is its own patch, bool [B, T] (spec 3.4)."""
  num_positions = _num_positions(num_tokens, include_next_token)
  return jnp.ones((batch, num_positions), dtype=bool)


def _last_start_index(starts_BT: jnp.ndarray) -> jnp.ndarray:
  """Index of the latest start at or before every position (0 if none)."""
  idx_BT = jnp.where(starts_BT, _positions(starts_BT.shape[1])[None, :], 0)
  return jax.lax.cummax(idx_BT, axis=1)


@functools.partial(jax.jit, static_argnames=("max_patch_length",))
def limit_patch_length(starts_BT: jnp.ndarray, max_patch_length: int | None) -> jnp.ndarray:
  """Splits every patch longer than m into m, m, ..., remainder (spec 3.5)."""
  if max_patch_length is None:
    return starts_BT
  if max_patch_length < 1:
    raise ValueError(f"max_patch_length must be >= 1, got {max_patch_length}")
  pos_T = _positions(starts_BT.shape[1])
  offset_BT = pos_T[None, :] - _last_start_index(starts_BT)
  return starts_BT | (offset_BT % max_patch_length == 0)


def _first_reaching(sorted_BC: jnp.ndarray, targets_K: jnp.ndarray) -> jnp.ndarray:
  """int32 [B, K]: per row of nondecreasing `sorted_BC`, the first index whose value is >= each target (C if none).

  A binary search (log2 C steps of gathers, unrolled: no loop for a cost model to price once), not a scatter,
  so every backend and libtpu's cost model handle it.
  """
  search = lambda row_C: jnp.searchsorted(row_C, targets_K, side="left", method="scan_unrolled")
  return jax.vmap(search)(sorted_BC).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_patches",))
def starts_to_patches(starts_BT: jnp.ndarray, max_patches: int) -> Patches:
  """Start mask -> fixed-shape `Patches` with `max_patches` columns.

  Position 0 is treated as a start. If a row needs more than `max_patches`
  patches, no byte is dropped: every position past the last representable
  patch is merged into patch `max_patches - 1`, so lengths still sum to T and
  ids stay < max_patches; `overflow_B` flags the row so callers can raise or
  count.
  """
  batch, num_positions = starts_BT.shape
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")
  starts_BT = starts_BT.at[:, 0].set(True)
  count_BT = jnp.cumsum(starts_BT.astype(jnp.int32), axis=1)  # starts at or before each position
  needed_B = count_BT[:, -1]
  patch_ids_BT = jnp.minimum(count_BT - 1, max_patches - 1)
  # Patch p begins at the first position whose count reaches p + 1 (T past the row's patches) and ends where
  # patch p + 1 begins; the last slot runs to T, taking in the overflow. (A scatter-add of ones would say the same,
  # but libtpu has no cost model for scalar scatter-adds: `aot`'s time estimate.)
  begin_BP = _first_reaching(count_BT, jnp.arange(1, max_patches + 1, dtype=jnp.int32))
  end_BP = jnp.concatenate([begin_BP[:, 1:], jnp.full((batch, 1), num_positions, jnp.int32)], axis=1)
  lengths_BP = end_BP - begin_BP
  return Patches(
      patch_lengths_BP=lengths_BP,
      patch_ids_BT=patch_ids_BT,
      num_patches_B=jnp.minimum(needed_B, max_patches),
      overflow_B=needed_B > max_patches,
  )


@functools.partial(jax.jit, static_argnames=("num_positions",))
def patch_ids_from_lengths(patch_lengths_BP: jnp.ndarray, num_positions: int) -> jnp.ndarray:
  """Patch id of every position, int32 [B, num_positions] (spec 10.2).

  With c = [0, cumsum(lengths)], id[j] = #{m : c_m <= j} - 1. Zero-length
  patches repeat a c value and are skipped; positions past sum(lengths) get P
  (out of range), as in the reference.
  """
  lengths_BP = jnp.asarray(patch_lengths_BP).astype(jnp.int32)
  batch = lengths_BP.shape[0]
  bounds_BC = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(lengths_BP, axis=1)], axis=1)
  # #{m : c_m <= j} is the first m with c_m > j, i.e. reaching j + 1 (c is nondecreasing: lengths are >= 0).
  return _first_reaching(bounds_BC, _positions(num_positions) + 1) - 1


@functools.partial(jax.jit, static_argnames=("num_tokens",))
def decoder_patch_ids(patch_lengths_BP: jnp.ndarray, num_tokens: int) -> jnp.ndarray:
  """Decoder ids: patch ids of lengths[:, 1:] (spec 10.1 step 10, 10.3)."""
  return patch_ids_from_lengths(patch_lengths_BP[:, 1:], num_tokens)


class ModeOptions(NamedTuple):
  """The keyword arguments `mode_starts` and `patch` share: how the mode decides starts (all static)."""

  mode: str = "entropy"  # one of MODES
  threshold: float = DEFAULT_THRESHOLD  # entropy mode (spec 3.3)
  threshold_add: float | None = None  # entropy mode: e[p-1] - e[p-2] must pass it too
  monotonicity: bool = False  # entropy mode: e[p-1] - e[p-2] > threshold; wins over threshold_add
  patch_size: int | None = None  # static mode only
  first_patch_single_byte: bool = True  # static mode: position 1 starts too (spec 13.5)
  include_next_token: bool = True  # decide T = N + 1 positions (spec 3.2)
  compare_dtype: Any = jnp.float32  # entropy mode: jnp.bfloat16 is realtime patching (Q4)


@functools.partial(jax.jit, static_argnames=ModeOptions._fields)
def mode_starts(
    tokens_BN: jnp.ndarray,
    entropies_BN: jnp.ndarray | None = None,
    **mode_options,
) -> jnp.ndarray:
  """The mode's own starts, bool [B, T], before `max_patch_length` splits.

  `mode_options` are `ModeOptions` fields. Every mode restarts at each
  document start (`masks`), so patches never cross one and a packed document
  is patched as it is alone.
  """
  opts = ModeOptions(**mode_options)
  batch, num_tokens = tokens_BN.shape
  doc_pos_BT = document_positions(tokens_BN, opts.include_next_token)
  if opts.mode == "entropy":
    if entropies_BN is None:
      raise ValueError("mode 'entropy' needs entropies_BN")
    return entropy_starts(
        entropies_BN,
        opts.threshold,
        threshold_add=opts.threshold_add,
        monotonicity=opts.monotonicity,
        include_next_token=opts.include_next_token,
        compare_dtype=opts.compare_dtype,
        doc_pos_BT=doc_pos_BT,
    )
  if opts.mode == "space":
    return space_starts(tokens_BN, include_next_token=opts.include_next_token)
  if opts.mode == "static":
    return static_starts(
        batch,
        num_tokens,
        opts.patch_size,
        include_next_token=opts.include_next_token,
        first_patch_single_byte=opts.first_patch_single_byte,
        doc_pos_BT=doc_pos_BT,
    )
  if opts.mode == "byte":
    return byte_starts(batch, num_tokens, include_next_token=opts.include_next_token)
  raise ValueError(f"unknown patching mode {opts.mode!r}; expected one of {MODES}")


@functools.partial(jax.jit, static_argnames=ModeOptions._fields + ("max_patch_length",))
def starts(
    tokens_BN: jnp.ndarray,
    entropies_BN: jnp.ndarray | None = None,
    *,
    max_patch_length: int | None = None,
    **mode_options,
) -> jnp.ndarray:
  """The patch starts, bool [B, T]: the mode's (`mode_starts`), then `max_patch_length` splits. The one rule the
  step (`patch`), the loader's patch budget (`data.patch_rows`) and calibration use."""
  return limit_patch_length(mode_starts(tokens_BN, entropies_BN, **mode_options), max_patch_length)


@functools.partial(jax.jit, static_argnames=ModeOptions._fields + ("max_patch_length", "max_patches"))
def patch(
    tokens_BN: jnp.ndarray,
    entropies_BN: jnp.ndarray | None = None,
    *,
    max_patch_length: int | None = None,
    max_patches: int | None = None,
    **mode_options,
) -> Patches:
  """Patches a batch: mode starts -> max_patch_length -> fixed-shape Patches.

  `mode_options` are `ModeOptions` fields, passed on to `mode_starts`.
  `max_patches=None` uses T columns, which can never overflow. All arguments
  but the two arrays are static (hashable), so a jnp threshold is not allowed.
  """
  starts_BT = starts(tokens_BN, entropies_BN, max_patch_length=max_patch_length, **mode_options)
  if max_patches is None:
    max_patches = starts_BT.shape[1]
  return starts_to_patches(starts_BT, max_patches)


def next_start(
    tokens_B2: jnp.ndarray,
    entropies_B2: jnp.ndarray,
    next_pos_B: jnp.ndarray,
    mode_start_B: jnp.ndarray,
    *,
    mode: str = "entropy",
    threshold: float = DEFAULT_THRESHOLD,
    threshold_add: float | None = None,
    monotonicity: bool = False,
    patch_size: int | None = None,
    first_patch_single_byte: bool = True,
    max_patch_length: int | None = None,
    compare_dtype=jnp.float32,
) -> jnp.ndarray:
  """Incremental patching (generation): (mode start, start) of position p = next_pos, bool [B] each.

  The same rules as `patch` on a row of one document, evaluated on the two newest tokens / entropies (positions
  p-2 and p-1; ignored where p-2 < 0). `mode_start_B` is the latest position < p that the mode itself started
  (before `max_patch_length` splits, which count from it as `limit_patch_length` does).
  """
  batch = tokens_B2.shape[0]
  doc_pos_B3 = next_pos_B[:, None] + jnp.arange(-2, 1)[None, :]  # positions p-2, p-1, p
  if mode == "entropy":
    e_B2 = jnp.where(doc_pos_B3[:, :2] >= 0, entropies_B2, 0.0)
    starts_B = entropy_starts(
        e_B2,
        threshold,
        threshold_add=threshold_add,
        monotonicity=monotonicity,
        include_next_token=True,
        compare_dtype=compare_dtype,
        doc_pos_BT=doc_pos_B3,
    )[:, 2]
  elif mode == "space":
    # space_starts reads a row; p-2 < 0 stands for "no byte", which is not space-like: a non-special byte id.
    t_B2 = jnp.where(doc_pos_B3[:, :2] >= 0, tokens_B2, ord("a") + tokenizer.OFFSET)
    starts_B = space_starts(t_B2, include_next_token=True)[:, 2]
  elif mode == "static":
    starts_B = static_starts(
        batch,
        1,
        patch_size,
        include_next_token=False,
        first_patch_single_byte=first_patch_single_byte,
        doc_pos_BT=next_pos_B[:, None],
    )[:, 0]
  elif mode == "byte":
    starts_B = jnp.ones((batch,), bool)
  else:
    raise ValueError(f"unknown patching mode {mode!r}; expected one of {MODES}")
  mode_starts_B = starts_B | (next_pos_B < 2)
  if max_patch_length is None:
    return mode_starts_B, mode_starts_B
  return mode_starts_B, mode_starts_B | ((next_pos_B - mode_start_B) % max_patch_length == 0)
