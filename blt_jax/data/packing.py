"""Packs a stream of encoded documents into fixed-length training windows.

Documents (`{"ids": int32[n], <extra>: float32[n], ...}`) are concatenated
into one token stream (each already `[BOS] bytes [EOS]`, so EOS separates
documents for the model's document-aware attention masks). Window `k` is
`stream[k*L : k*L + L + 1]`, with `tokens = w[:-1]` and `targets = w[1:]`:
consecutive windows overlap by one token, so every stream token is an input
exactly once and every token after the first is a target exactly once.

Extra per-token float arrays (e.g. precomputed entropies) are carried through
packing aligned with `tokens`.

With a `RowPatcher` (`patching.rows="patches"`, `data/patch_rows.py`) a window
ends after at most `max_patches` patches instead: it holds k <= L tokens, the
rest is padding (loss_mask 0), it carries its patch starts, and the next
window starts at token k (the invariant above holds with k for L).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from blt_jax import tokenizer
from blt_jax.data import patch_rows

_STATE_VERSION = 1
IDS = "ids"


def to_token_doc(doc: Any) -> dict[str, np.ndarray]:
  """Turns a source element into `{"ids": int32[n], <extra>: float32[n]}`.

  Accepts raw `bytes`/`str` (encoded as `[BOS] bytes [EOS]`), or a mapping
  with either `"ids"` (already encoded) or `"text"` (encoded here) plus extra
  per-token arrays that are aligned with the encoded ids.
  """
  if isinstance(doc, (bytes, bytearray, memoryview, str)):
    return {IDS: tokenizer.encode(doc)}
  if not isinstance(doc, Mapping):
    raise TypeError(f"documents must be bytes, str or a mapping, got {type(doc).__name__}")
  if IDS in doc:
    ids = np.asarray(doc[IDS], np.int32)
  elif "text" in doc:
    ids = tokenizer.encode(doc["text"])
  else:
    raise ValueError(f"document mapping needs 'ids' or 'text', got {list(doc)}")
  out = {IDS: ids.reshape(-1)}
  for name, value in doc.items():
    if name in (IDS, "text"):
      continue
    value = np.asarray(value, np.float32).reshape(-1)
    if value.shape != out[IDS].shape:
      raise ValueError(f"extra field {name!r} has {value.size} values for" f" {out[IDS].size} tokens")
    out[name] = value
  return out


def _empty_like(keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  return {k: np.zeros((0,), np.int32 if k == IDS else np.float32) for k in keys}


class PackedWindowsIterDataset(grain.IterDataset):
  """Concatenates encoded documents and cuts `seq_len + 1` token windows.

  Each element is `{"tokens": int32[L], "targets": int32[L], "loss_mask":
  float32[L], <extra>: float32[L]}`. With `pad_final`, the stream's last
  partial window is emitted padded with BOE (loss_mask 0); otherwise the
  leftover tokens at the end of a finite stream are dropped.
  """

  def __init__(
      self,
      parent: grain.IterDataset,
      seq_len: int,
      *,
      pad_final: bool = False,
      metadata: dict[str, Any] | None = None,
      row_patcher: patch_rows.RowPatcher | None = None,
  ):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if row_patcher is not None and row_patcher.seq_len != seq_len:
      raise ValueError(f"row_patcher is for seq_len={row_patcher.seq_len}, the packer's is {seq_len}")
    self._seq_len = seq_len
    self._pad_final = pad_final
    self._metadata = dict(metadata or {})
    self._row_patcher = row_patcher

  def __iter__(self) -> PackedWindowsIterator:
    return PackedWindowsIterator(
        self._parent.__iter__(),
        self._seq_len,
        pad_final=self._pad_final,
        metadata=self._metadata,
        row_patcher=self._row_patcher,
    )

  def __str__(self) -> str:
    budget = "" if self._row_patcher is None else f", max_patches={self._row_patcher.max_patches}"
    return f"PackedWindowsIterDataset(seq_len={self._seq_len}, pad_final={self._pad_final}{budget})"


class PackedWindowsIterator(grain.DatasetIterator):
  """Iterator of PackedWindowsIterDataset; its state is JSON-native.

  The pending tokens are `carry` (remainders of earlier documents, at most
  `seq_len` tokens) followed by `head[head_offset:]` (the current document).
  The checkpoint stores `carry` verbatim but the head only as the parent's
  state from just before it was read plus an offset, so a huge document never
  bloats the state: restoring re-reads it.
  """

  def __init__(
      self,
      parent: grain.DatasetIterator,
      seq_len: int,
      *,
      pad_final: bool,
      metadata: dict[str, Any],
      row_patcher: patch_rows.RowPatcher | None = None,
  ):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_final = pad_final
    self._metadata = metadata
    self._row_patcher = row_patcher
    self._max_patches = 0 if row_patcher is None else row_patcher.max_patches
    self._keys: tuple[str, ...] | None = None  # Set by the first document.
    self._carry: dict[str, np.ndarray] | None = None
    self._head: dict[str, np.ndarray] | None = None
    self._head_offset = 0
    self._head_parent_state = copy.deepcopy(parent.get_state())
    self._done = False
    self._num_windows = 0

  def _check_doc(self, doc: Any) -> dict[str, np.ndarray]:
    if not isinstance(doc, Mapping) or IDS not in doc:
      doc = to_token_doc(doc)
    keys = (IDS,) + tuple(sorted(k for k in doc if k != IDS))
    if self._keys is None:
      self._keys = keys
      if self._carry is None:
        self._carry = _empty_like(keys)
    elif keys != self._keys:
      raise ValueError(f"documents must all have the same fields; got {keys}, expected" f" {self._keys}")
    return {k: np.asarray(doc[k]) for k in keys}

  def _pending(self) -> int:
    n = 0 if self._carry is None else len(self._carry[IDS])
    if self._head is not None:
      n += len(self._head[IDS]) - self._head_offset
    return n

  def _pull(self) -> bool:
    """Reads the next document as the new head; False when exhausted."""
    if self._head is not None:
      # Fewer than seq_len + 1 tokens are pending here, so carry stays short.
      self._carry = {k: np.concatenate([self._carry[k], self._head[k][self._head_offset :]]) for k in self._keys}
      self._head = None
      self._head_offset = 0
    self._head_parent_state = copy.deepcopy(self._parent.get_state())
    try:
      doc = next(self._parent)
    except StopIteration:
      return False
    self._head = self._check_doc(doc)
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    L = self._seq_len  # pylint: disable=invalid-name
    while not self._done and self._pending() < L + 1:
      if not self._pull():
        self._done = True  # the parent is exhausted; what is pending is the stream's tail
    if self._pending() >= L + 1:
      return self._emit()
    # A final (padded) window needs >= 2 tokens to hold at least one target.
    if self._done and self._pad_final and self._pending() >= 2:
      return self._emit()
    raise StopIteration

  def _emit(self) -> dict[str, np.ndarray]:
    L = self._seq_len  # pylint: disable=invalid-name
    n_carry = len(self._carry[IDS])
    n = min(L + 1, self._pending())
    if self._head is not None:
      start = self._head_offset
      stop = start + n - n_carry
      window = {k: np.concatenate([self._carry[k], self._head[k][start:stop]]) for k in self._keys}
    else:
      window = {k: self._carry[k][:n] for k in self._keys}
    # The first `length` tokens are inputs with a target (L, or fewer in the stream's final window or where a patch
    # budget ends the row); past them is BOE padding.
    length = min(L, n - 1)
    starts = None
    if self._row_patcher is not None:
      starts = self._row_patcher.starts(window[IDS], window.get("entropies"))
      length = self._row_patcher.row_length(starts, length)
    # Consume `length` tokens; the window's token `length` stays as the next input.
    from_carry = min(length, n_carry)
    self._carry = {k: v[from_carry:] for k, v in self._carry.items()}
    if self._head is not None:
      self._head_offset += length - from_carry
    self._num_windows += 1

    pad = L - length
    ids = window[IDS]
    example = {
        "tokens": np.pad(ids[:length], (0, pad), constant_values=tokenizer.BOE_ID),
        "targets": np.pad(ids[1 : length + 1], (0, pad), constant_values=tokenizer.BOE_ID),
        "loss_mask": (np.arange(L) < length).astype(np.float32),
    }
    for name in self._keys[1:]:
      example[name] = np.pad(window[name][:length], (0, pad)).astype(np.float32)
    if starts is not None:
      example[patch_rows.STARTS] = patch_rows.starts_field(starts, length, L)
    return example

  def get_state(self) -> dict[str, Any]:
    carry = None if self._carry is None else {k: v.tolist() for k, v in self._carry.items()}
    return {
        "version": _STATE_VERSION,
        "seq_len": self._seq_len,
        "max_patches": self._max_patches,
        "metadata": copy.deepcopy(self._metadata),
        "parent": copy.deepcopy(self._head_parent_state),
        "has_head": self._head is not None,
        "head_offset": self._head_offset,
        "head_length": 0 if self._head is None else len(self._head[IDS]),
        "carry": carry,
        "done": self._done,
        "num_windows": self._num_windows,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(
          f"unsupported data iterator state version {state.get('version')!r}" f" (expected {_STATE_VERSION})"
      )
    if state["seq_len"] != self._seq_len:
      raise ValueError(
          f"data iterator state is for seq_len={state['seq_len']}, this" f" iterator has seq_len={self._seq_len}"
      )
    if state.get("max_patches", 0) != self._max_patches:
      budget = lambda p: f"rows of at most max_patches={p} patches" if p else "rows of seq_len bytes"
      raise ValueError(
          f"data iterator state was saved for {budget(state.get('max_patches', 0))}, this iterator cuts"
          f" {budget(self._max_patches)} (patching.rows / patching.max_patches changed since the checkpoint)"
      )
    if state["metadata"] != self._metadata:
      hint = ""
      if state["metadata"].get("num_documents") != self._metadata.get("num_documents"):
        hint = (
            " (the training documents differ: resume with the data settings the run started with; a stdlib-corpus"
            " run started before data.stdlib_skip_generated became the default needs"
            " --config.data.stdlib_skip_generated=False)"
        )
      raise ValueError(
          "data iterator state was saved for a different data setup:"
          f" saved {state['metadata']}, current {self._metadata}{hint}"
      )
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._head_parent_state = copy.deepcopy(state["parent"])
    carry = state["carry"]
    if carry is None:
      self._keys, self._carry = None, None
    else:
      self._keys = (IDS,) + tuple(sorted(k for k in carry if k != IDS))
      self._carry = {k: np.asarray(carry[k], np.int32 if k == IDS else np.float32) for k in self._keys}
    self._head = None
    self._head_offset = 0
    if state["has_head"]:
      try:
        head = next(self._parent)
      except StopIteration:
        raise ValueError(
            "data iterator state points past the end of the data; has the" " corpus changed since the checkpoint?"
        ) from None
      self._head = self._check_doc(head)
      if len(self._head[IDS]) != state["head_length"]:
        raise ValueError(
            "the document at the checkpointed data position has"
            f" {len(self._head[IDS])} tokens, the checkpoint says"
            f" {state['head_length']}; has the corpus changed?"
        )
      self._head_offset = int(state["head_offset"])
    self._done = bool(state["done"])
    self._num_windows = int(state["num_windows"])

  def __str__(self) -> str:
    return f"PackedWindowsIterator(seq_len={self._seq_len})"
