"""Per-document entropies computed once and stored with tensorstore; a source that serves them with the tokens.

The reference precomputes entropies per document (`preprocess_entropies.py`, spec 13.5): every document is
`[BOS] bytes [EOS]`, scored on its own with a context reset every `max_seqlen` (8192) tokens. We do the same and
store one flat float32 array of all tokens' entropies plus document offsets (zarr via tensorstore), keyed by each
document's stable key so that any split or subset of the same corpus finds its rows.

Layout of a store directory: `entropies.zarr` (float32 [total_tokens]), `offsets.zarr` (int64 [num_docs + 1]),
`index.json` (document keys in order, the entropy model config, the corpus name).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from blt_jax.config import EntropyModelConfig
from blt_jax.data import packing
from blt_jax.entropy_model import compute_entropies_jit


def _spec(path: str, dtype: str, shape: Sequence[int]) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
          "metadata": {"dtype": dtype, "shape": list(shape), "chunks": [min(max(int(shape[0]), 1), 1 << 20)]}}


def _bucket_length(n: int) -> int:
  """Padded row length: the next power of two (at least 64)."""
  return max(64, 1 << (n - 1).bit_length())


def compute_document_entropies(docs: Sequence[np.ndarray], params, config: EntropyModelConfig,
                               tokens_per_batch: int = 1 << 16):
  """Entropies (float32) of each token list: the context resets every `max_seqlen` tokens (spec 2.3).

  Documents are cut at those resets into independent pieces, pieces of similar length are batched, and every
  batch of a bucket has the same shape: one compile per power-of-two length.
  """
  chunk = config.max_seqlen
  pieces = [(d, start) for d, ids in enumerate(docs) for start in range(0, max(len(ids), 1), chunk)]
  piece_len = lambda p: min(chunk, len(docs[p[0]]) - p[1])
  pieces.sort(key=piece_len)
  out = [np.zeros(len(ids), np.float32) for ids in docs]
  i = 0
  while i < len(pieces):
    length = _bucket_length(piece_len(pieces[i]))
    rows = max(1, tokens_per_batch // length)
    group = []
    while i < len(pieces) and len(group) < rows and _bucket_length(piece_len(pieces[i])) == length:
      group.append(pieces[i])
      i += 1
    batch = np.zeros((rows, length), np.int32)  # zero (BOE) padding after each piece; zero rows fill the batch
    for r, (d, start) in enumerate(group):
      piece = docs[d][start:start + chunk]
      batch[r, :len(piece)] = piece
    ent = np.asarray(compute_entropies_jit(params, jnp.asarray(batch), config))
    for r, (d, start) in enumerate(group):
      n = piece_len((d, start))
      out[d][start:start + n] = ent[r, :n]
  return out


def write_entropy_store(path: str, source: Any, params, config: EntropyModelConfig, *,
                        docs_per_flush: int = 256, progress=None) -> Dict[str, Any]:
  """Scores every document of `source` (a data.DocumentSource) and writes the store at `path`."""
  os.makedirs(path, exist_ok=True)
  n_docs = len(source)
  lengths = np.array([source.num_tokens(i) for i in range(n_docs)], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tmp = path.rstrip("/") + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  ent_store = ts.open(_spec(os.path.join(tmp, "entropies.zarr"), "<f4", [int(offsets[-1])]), create=True,
                      delete_existing=True).result()
  ts.open(_spec(os.path.join(tmp, "offsets.zarr"), "<i8", [n_docs + 1]), create=True,
          delete_existing=True).result().write(offsets).result()
  for start in range(0, n_docs, docs_per_flush):
    ids = [packing.to_token_doc(source[i])[packing.IDS] for i in range(start, min(start + docs_per_flush, n_docs))]
    ents = compute_document_entropies(ids, params, config)
    lo, hi = int(offsets[start]), int(offsets[start + len(ids)])
    ent_store[lo:hi].write(np.concatenate(ents)).result()
    if progress:
      progress(start + len(ids), n_docs)
  index = dict(keys=[source.key(i) for i in range(n_docs)], entropy_model=config.to_dict(),
               corpus=getattr(source, "name", ""), total_tokens=int(offsets[-1]))
  with open(os.path.join(tmp, "index.json"), "w") as f:
    json.dump(index, f)
  if os.path.exists(path):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path)
  os.replace(tmp, path)  # atomic: a store is either complete or absent
  return dict(documents=n_docs, tokens=int(offsets[-1]))


class ConcatSource:
  """Several document sources as one (train + validation: a store covers the whole corpus)."""

  def __init__(self, *sources):
    self.sources = sources
    self.name = "+".join(getattr(s, "name", "?") for s in sources)

  def _locate(self, i: int):
    for source in self.sources:
      if i < len(source):
        return source, i
      i -= len(source)
    raise IndexError(i)

  def __len__(self) -> int:
    return sum(len(s) for s in self.sources)

  def __getitem__(self, i: int):
    source, j = self._locate(i)
    return source[j]

  def key(self, i: int) -> str:
    source, j = self._locate(i)
    return source.key(j)

  def num_tokens(self, i: int) -> int:
    source, j = self._locate(i)
    return source.num_tokens(j)


def write_corpus_store(path: str, data_cfg, params, config: EntropyModelConfig, progress=None) -> Dict[str, Any]:
  """Scores the train and validation documents a data config names (see `data.build_document_sources`)."""
  from blt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  train, val = pipeline.build_document_sources(data_cfg)
  return write_entropy_store(path, ConcatSource(train, val), params, config, progress=progress)


class EntropyAnnotatedSource:
  """A document source whose items carry the stored entropies: `{"ids": int32[n], "entropies": float32[n]}`."""
  extra_fields = ("entropies",)

  def __init__(self, source: Any, store_path: str):
    index_file = os.path.join(store_path, "index.json")
    if not os.path.isfile(index_file):
      raise FileNotFoundError(f"entropy store {store_path!r}: no index.json (write one with "
                              f"scripts/precompute_entropies.py)")
    with open(index_file) as f:
      index = json.load(f)
    position = {k: i for i, k in enumerate(index["keys"])}
    self._rows = np.empty(len(source), np.int64)
    for i in range(len(source)):
      key = source.key(i)
      if key not in position:
        raise ValueError(f"entropy store {store_path!r} has no entropies for document {key!r} of {source!r}; "
                         f"recompute the store for this corpus")
      self._rows[i] = position[key]
    self._source = source
    self._offsets = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                           "path": os.path.join(store_path, "offsets.zarr")}}
                            ).result().read().result()
    self._entropies = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                             "path": os.path.join(store_path, "entropies.zarr")}}
                              ).result()
    self.name = f"{getattr(source, 'name', 'documents')}+entropies"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
    ids = packing.to_token_doc(self._source[i])[packing.IDS]
    row = int(self._rows[i])
    lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
    if hi - lo != len(ids):
      raise ValueError(f"entropy store is stale for document {self._source.key(i)!r}: stored {hi - lo} "
                       f"entropies, the document now has {len(ids)} tokens")
    return {"ids": ids, "entropies": np.asarray(self._entropies[lo:hi].read().result(), np.float32)}

  def key(self, i: int) -> str:
    return self._source.key(i)

  def num_tokens(self, i: int) -> int:
    return self._source.num_tokens(i)

  def __repr__(self) -> str:
    return f"EntropyAnnotatedSource({self.name!r}, {len(self)} documents)"


def maybe_annotate(source: Any, store_path: Optional[str]):
  return EntropyAnnotatedSource(source, store_path) if store_path else source
