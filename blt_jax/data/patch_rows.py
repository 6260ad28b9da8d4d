"""Rows cut to a patch budget: at most `max_patches` patches and `seq_len` bytes each (`patching.rows="patches"`).

A row of `seq_len` bytes patched inside the step needs a varying number of patches, so the global stack runs over
`max_patches` slots sized for the densest rows, and most rows leave many of them empty (the padding term of
BENCHMARKS.md's pod tables). Here the loader patches instead: for each row it runs the model's own rule
(`patching.mode_starts` and `limit_patch_length`, on the host CPU) over the next `seq_len + 1` tokens of the stream,
(`patching.starts`), exactly as the step would over a row starting there, and ends the row at `seq_len` bytes or before, so that its
positions, the next-token one included (spec 3.2: a row of k bytes is patched over k + 1 positions), hold at most
`max_patches` patches. The row carries its starts (`patch_starts`), so the step builds its patches from them and
never overflows; the next row starts at the next-token position of this one (every token is an input once).

The rule is causal (a position's start depends only on the tokens and entropies before it) and every row restarts
it, as the step does for each row: positions 0 and 1 of every row start (the model's first patch is one byte, spec
10.3). The row's padding joins its last patch: no scored byte reads it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import patching, tokenizer

# The batch field, float32 [L]: 1.0 at i where position i + 1 starts a patch (position 0 always does; i = k - 1 holds
# the next-token position of a row of k bytes), 0 over the padding.
STARTS = "patch_starts"
ROW_MODES = ("bytes", "patches")


class RowPatcher:
  """The step's patching rule, run on the host for one row's window, and where that row ends.

  `patch_kwargs` are `PatchingConfig.patch_kwargs()`; `max_patches` is the row's patch budget (>= 2).
  """

  def __init__(self, patch_kwargs: Mapping[str, Any], max_patches: int, seq_len: int):
    if max_patches < 2:
      raise ValueError(f"rows cut to a patch budget need max_patches >= 2 (a row's first two bytes), got {max_patches}")
    self.kwargs = dict(patch_kwargs)
    self.max_patches = int(max_patches)
    self.seq_len = int(seq_len)
    self.needs_entropies = self.kwargs.get("mode") == "entropy"
    self._cpu = jax.devices("cpu")[0]

  def starts(self, ids_T: np.ndarray, entropies_T: np.ndarray | None) -> np.ndarray:
    """bool [n]: the patch starts of a row whose tokens are `ids_T` (n <= seq_len + 1), the step's rule."""
    n = len(ids_T)
    width = self.seq_len + 1  # one shape: one compile
    if n > width:
      raise ValueError(f"a row window holds at most seq_len + 1 = {width} tokens, got {n}")
    if self.needs_entropies and entropies_T is None:
      raise ValueError("entropy patching of rows needs per-token entropies (data.entropy_store)")
    ids = np.full((1, width), tokenizer.BOE_ID, np.int32)
    ids[0, :n] = ids_T
    ent = np.zeros((1, width), np.float32)
    if entropies_T is not None:
      ent[0, :n] = entropies_T
    with jax.default_device(self._cpu):
      entropies = jnp.asarray(ent) if self.needs_entropies else None
      starts = patching.starts(jnp.asarray(ids), entropies, include_next_token=False, **self.kwargs)
    return np.asarray(starts)[0, :n]

  def row_length(self, starts_T: np.ndarray, available: int) -> int:
    """Bytes of the row that starts with `starts_T` (`row_lengths`), at most `available` (<= seq_len)."""
    return int(row_lengths(starts_T[None, : available + 1], self.max_patches)[0])


def row_lengths(starts_RT: np.ndarray, max_patches: int) -> np.ndarray:
  """int [R]: the bytes k < T of rows cut to `max_patches` patches, whose starts are `starts_RT` [R, T]: the
  largest k whose positions 0..k, the next-token one included, hold at most `max_patches` starts.

  A row ends before the position where patch max_patches + 1 would begin (that position is its next token), or
  at T - 1 bytes.
  """
  count_RT = np.cumsum(np.asarray(starts_RT, bool), axis=1)
  first_over_R = np.argmax(count_RT > max_patches, axis=1)  # 0 when never over (position 0 holds one start)
  return np.where(count_RT[:, -1] > max_patches, first_over_R - 1, starts_RT.shape[1] - 1)


def starts_field(starts_T: np.ndarray, length: int, seq_len: int) -> np.ndarray:
  """The `STARTS` field of a row of `length` bytes: positions 1..length of `starts_T`, the padding 0."""
  out = np.zeros(seq_len, np.float32)
  out[:length] = starts_T[1 : length + 1]
  return out


def step_starts(patch_starts_BN: jnp.ndarray) -> jnp.ndarray:
  """bool [B, N + 1]: the step's start mask from a batch's `STARTS` field (position 0 starts)."""
  first_B1 = jnp.ones((patch_starts_BN.shape[0], 1), bool)
  return jnp.concatenate([first_B1, patch_starts_BN > 0.5], axis=1)
