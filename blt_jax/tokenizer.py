"""Byte tokenizer with the reference's special ids (spec section 1).

This module is the single source of truth for the special token ids. Byte `b`
becomes id `b + OFFSET`; ids below OFFSET are special.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BOE_ID = 0  # "Beginning of example"; also the pad id and hash n-gram prefix.
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
NUM_BYTES = 256
VOCAB_SIZE = NUM_BYTES + OFFSET  # 260


def encode(text: str | bytes, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
  """Encodes text (UTF-8) or raw bytes into int32 ids `[BOS] bytes+4 [EOS]`."""
  if isinstance(text, str):
    data = text.encode("utf-8")
  elif isinstance(text, (bytes, bytearray, memoryview)):
    data = bytes(text)
  else:
    raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")
  body = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + OFFSET
  parts = []
  if add_bos:
    parts.append(np.array([BOS_ID], np.int32))
  parts.append(body)
  if add_eos:
    parts.append(np.array([EOS_ID], np.int32))
  return np.concatenate(parts).astype(np.int32)


def _byte_ids(ids: Iterable[int] | np.ndarray, cut_at_eos: bool) -> np.ndarray:
  """Returns the byte values of `ids` (specials dropped), as uint8."""
  ids_L = np.asarray(ids, dtype=np.int64).reshape(-1)
  if cut_at_eos:
    eos_positions = np.flatnonzero(ids_L == EOS_ID)
    if eos_positions.size:
      # The reference keeps the EOS itself; it is dropped below anyway.
      ids_L = ids_L[: eos_positions[0] + 1]
  # Drops BOE/BOS/EOS/BPE and the generation filler -1 (spec 1.3).
  ids_L = ids_L[ids_L >= OFFSET]
  if ids_L.size and ids_L.max() >= VOCAB_SIZE:
    raise ValueError(f"token id {int(ids_L.max())} is outside the byte vocabulary" f" [0, {VOCAB_SIZE})")
  return (ids_L - OFFSET).astype(np.uint8)


def decode_bytes(ids: Iterable[int] | np.ndarray, cut_at_eos: bool = False) -> bytes:
  """Decodes ids to raw bytes (lossless for any byte sequence)."""
  return _byte_ids(ids, cut_at_eos).tobytes()


def decode(ids: Iterable[int] | np.ndarray, cut_at_eos: bool = False) -> str:
  """Decodes like the reference: specials dropped, invalid UTF-8 ignored."""
  return decode_bytes(ids, cut_at_eos).decode("utf-8", errors="ignore")


class ByteTokenizer:
  """Thin object wrapper with the reference's constructor defaults."""

  boe_id = BOE_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  bpe_id = BPE_ID
  pad_id = BOE_ID  # The data pipeline pads with BOE (spec 1.1).
  offset = OFFSET
  vocab_size = VOCAB_SIZE

  def __init__(self, add_bos: bool = True, add_eos: bool = True):
    self.add_bos = add_bos
    self.add_eos = add_eos

  def get_vocab_size(self) -> int:
    return VOCAB_SIZE

  def encode(
      self,
      text: str | bytes,
      add_bos: bool | None = None,
      add_eos: bool | None = None,
  ) -> np.ndarray:
    """Encodes; `None` means the constructor default (spec 1.2)."""
    return encode(
        text,
        add_bos=self.add_bos if add_bos is None else add_bos,
        add_eos=self.add_eos if add_eos is None else add_eos,
    )

  def decode(self, ids, cut_at_eos: bool = False) -> str:
    return decode(ids, cut_at_eos=cut_at_eos)

  def decode_bytes(self, ids, cut_at_eos: bool = False) -> bytes:
    return decode_bytes(ids, cut_at_eos=cut_at_eos)
