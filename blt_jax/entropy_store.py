"""Per-document entropies computed once and stored with tensorstore; a source that serves them with the tokens.

The reference precomputes entropies per document (`preprocess_entropies.py`, spec 13.5): every document is
`[BOS] bytes [EOS]`, scored on its own with a context reset every `max_seqlen` (8192) tokens. We do the same and
store one flat float32 array of all tokens' entropies plus document offsets (zarr via tensorstore), keyed by each
document's stable key so that any split or subset of the same corpus finds its rows.

The layout of a store directory and its reader (`EntropyAnnotatedSource`) live in `blt_jax.data.entropy_source`; a
store may be local or at a URL (`gs://bucket/stores/x`).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from blt_jax import paths
from blt_jax.config import EntropyModelConfig
from blt_jax.data import entropy_source, packing, pipeline
from blt_jax.data.entropy_source import EntropyAnnotatedSource  # noqa: F401 (the reader, re-exported)
from blt_jax.entropy_model import compute_entropies_jit


def _spec(store, name: str, dtype: str, shape: Sequence[int]) -> dict:
  return dict(
      entropy_source.array_spec(store, name),
      metadata={"dtype": dtype, "shape": list(shape), "chunks": [min(max(int(shape[0]), 1), 1 << 20)]},
  )


def _bucket_length(n: int) -> int:
  """Padded row length: the next power of two (at least 64)."""
  return max(64, 1 << (n - 1).bit_length())


def compute_document_entropies(
    docs: Sequence[np.ndarray], params, config: EntropyModelConfig, tokens_per_batch: int = 1 << 16
):
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
      piece = docs[d][start : start + chunk]
      batch[r, : len(piece)] = piece
    ent = np.asarray(compute_entropies_jit(params, jnp.asarray(batch), config))
    for r, (d, start) in enumerate(group):
      n = piece_len((d, start))
      out[d][start : start + n] = ent[r, :n]
  return out


def write_entropy_store(
    path: paths.PathLike, source: Any, params, config: EntropyModelConfig, *, docs_per_flush: int = 256, progress=None
) -> Dict[str, Any]:
  """Scores every document of `source` (a data.DocumentSource) and writes the store at `path` (local or a URL).

  `index.json` is removed first and written last: on a local disk and on an object store alike (where a directory
  cannot be renamed atomically), a store is complete exactly when its index is there.
  """
  store = paths.resolve(path)
  store.mkdir(parents=True, exist_ok=True)
  index_file = store / entropy_source.INDEX_FILE
  if index_file.exists():
    index_file.unlink()
  n_docs = len(source)
  lengths = np.array([source.num_tokens(i) for i in range(n_docs)], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ent_store = ts.open(
      _spec(store, entropy_source.ENTROPIES, "<f4", [int(offsets[-1])]), create=True, delete_existing=True
  ).result()
  ts.open(_spec(store, entropy_source.OFFSETS, "<i8", [n_docs + 1]), create=True, delete_existing=True).result().write(
      offsets
  ).result()
  for start in range(0, n_docs, docs_per_flush):
    ids = [packing.to_token_doc(source[i])[packing.IDS] for i in range(start, min(start + docs_per_flush, n_docs))]
    ents = compute_document_entropies(ids, params, config)
    lo, hi = int(offsets[start]), int(offsets[start + len(ids)])
    ent_store[lo:hi].write(np.concatenate(ents)).result()
    if progress:
      progress(start + len(ids), n_docs)
  index = dict(
      keys=[source.key(i) for i in range(n_docs)],
      entropy_model=config.to_dict(),
      corpus=getattr(source, "name", ""),
      total_tokens=int(offsets[-1]),
  )
  index_file.write_text(json.dumps(index))
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


def write_corpus_store(
    path: paths.PathLike, data_cfg, params, config: EntropyModelConfig, progress=None
) -> Dict[str, Any]:
  """Scores the train and validation documents a data config names (see `data.build_document_sources`)."""
  train, val = pipeline.build_document_sources(data_cfg, for_store=True)
  return write_entropy_store(path, ConcatSource(train, val), params, config, progress=progress)
