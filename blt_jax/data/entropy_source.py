"""Reads an entropy store: a source whose documents carry their entropies.

A store directory (local, or a URL both epath and tensorstore reach: `gs://`,
`s3://`) holds `entropies.zarr` (float32 [total_tokens]), `offsets.zarr`
(int64 [num_docs + 1]) and `index.json` (document keys in order, the entropy
model config, the corpus name). `index.json` is written last, so a store
without it is incomplete. `blt_jax.entropy_store` writes stores.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

from blt_jax import paths
from blt_jax.data import packing

INDEX_FILE = "index.json"
ENTROPIES = "entropies.zarr"
OFFSETS = "offsets.zarr"


def array_spec(store: paths.PathLike, name: str) -> dict[str, Any]:
  """The tensorstore spec of the zarr array `name` in the store directory."""
  kvstore = paths.kvstore_spec(paths.resolve(store) / name)
  return {"driver": "zarr", "kvstore": kvstore}


class EntropyAnnotatedSource:
  """A document source whose items carry the stored entropies.

  Items are `{"ids": int32[n], "entropies": float32[n]}`.
  """

  extra_fields = ("entropies",)

  def __init__(self, source: Any, store_path: paths.PathLike):
    store = paths.resolve(store_path)
    index_file = store / INDEX_FILE
    if not index_file.exists():
      raise FileNotFoundError(
          f"entropy store {str(store)!r}: no {INDEX_FILE} (write one with" " scripts/precompute_entropies.py)"
      )
    index = json.loads(index_file.read_text())
    position = {k: i for i, k in enumerate(index["keys"])}
    self._rows = np.empty(len(source), np.int64)
    for i in range(len(source)):
      key = source.key(i)
      if key not in position:
        raise ValueError(
            f"entropy store {str(store)!r} has no entropies for document"
            f" {key!r} of {source!r}; recompute the store for this corpus"
        )
      self._rows[i] = position[key]
    self._source = source
    self._offsets = ts.open(array_spec(store_path, OFFSETS)).result().read().result()
    self._entropies = ts.open(array_spec(store_path, ENTROPIES)).result()
    self.name = f"{getattr(source, 'name', 'documents')}+entropies"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    ids = packing.to_token_doc(self._source[i])[packing.IDS]
    row = int(self._rows[i])
    lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
    if hi - lo != len(ids):
      raise ValueError(
          f"entropy store is stale for document {self._source.key(i)!r}:"
          f" stored {hi - lo} entropies, the document now has {len(ids)}"
          " tokens"
      )
    entropies = self._entropies[lo:hi].read().result()
    return {"ids": ids, "entropies": np.asarray(entropies, np.float32)}

  def key(self, i: int) -> str:
    return self._source.key(i)

  def num_tokens(self, i: int) -> int:
    return self._source.num_tokens(i)

  def __repr__(self) -> str:
    return f"EntropyAnnotatedSource({self.name!r}, {len(self)} documents)"
