"""Held-out NLL of every study model: BLTs through `blt_jax.score.Scorer`, plain causal LMs under its rules.

`HeldOutBLT` scores a training run's current params with the package's Scorer (its packing, windows and the
model's own patcher). The two baselines are `EntropyModel` stacks, which the Scorer does not load, so
`total_nll_nats` scores them with the same document rule: a document is `[BOS] ids`, every id after BOS is scored once, and a document longer
than a row is cut into `score.split_document` windows (each with at least `min_context` ids of left context). For
bytes the result is the scorer's bits per byte; for BPE ids the caller divides the total bits by the documents'
bytes (the same held-out documents), which is the only bits-per-byte a token model has.

Noised text (`blt_jax.study.noise`) is scored the same way: every model reads the noised text (bytes, or its own
BPE tokens of it) and the denominator is the noised text's bytes. A finished run is scored from its `export/`
(`HeldOutBLT.from_export`, `load_lm_export`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import loading, score, tokenizer, train
from blt_jax.config import EntropyModelConfig
from blt_jax.entropy_model import EntropyModel
from blt_jax.score import split_document


class HeldOutBLT:
  """Scores held-out texts with `score.Scorer` at several points of one run, compiling its programs once."""

  def __init__(self, texts: Sequence[str], row_bytes: int, rows_per_batch: int):
    self.texts = list(texts)
    self.row_bytes, self.rows_per_batch = row_bytes, rows_per_batch
    self.scorer = None

  def __call__(self, step_config, params, entropy_params, texts: Optional[Sequence[str]] = None) -> dict:
    """bpb, NLL, bytes and patches of the texts (default: the held-out texts) under a BLT (`steps.StepConfig`)."""
    if self.scorer is None:
      self._start(
          loading.LoadedModel(
              step_config.model,
              params,
              step_config.patching,
              step_config.entropy_model,
              entropy_params,
              path="<training run>",
          )
      )
    else:  # same shapes: the Scorer's compiled programs are reused
      self.scorer.set_params(params)
    return self.score(texts)

  @classmethod
  def from_export(cls, path: str, texts: Sequence[str], row_bytes: int, rows_per_batch: int) -> "HeldOutBLT":
    """A finished run's BLT (its workdir's `export/`, patcher included), ready to `score`."""
    scorer = cls(texts, row_bytes, rows_per_batch)
    scorer._start(loading.load(path))
    return scorer

  def _start(self, model: loading.LoadedModel) -> None:
    self.scorer = score.Scorer(
        model,
        row_bytes=self.row_bytes,
        min_context=self.row_bytes // 2,
        batch_bytes=self.row_bytes * self.rows_per_batch,
    )

  def score(self, texts: Optional[Sequence[str]] = None) -> dict:
    """Scores of `texts` (default: the held-out texts): bits per byte of those texts' own UTF-8 bytes."""
    docs = self.scorer.score_texts(self.texts if texts is None else list(texts))
    nll = sum(d.nll_nats for d in docs)
    n_bytes = sum(d.n_bytes for d in docs)
    n_patches = sum(d.n_patches for d in docs)
    return dict(
        bpb=bits_per_byte(nll, n_bytes),
        nll_nats=nll,
        n_bytes=n_bytes,
        n_patches=n_patches,
        mean_patch_length=n_bytes / max(n_patches, 1),
    )


def load_lm_export(path: str) -> Tuple[EntropyModelConfig, object]:
  """(config, params) of a finished causal-LM run (byte or BPE transformer) from its `export/`."""
  config, params = train.load_entropy_model(path)
  return dataclasses.replace(config, scan_layers=False), params  # exports are per-layer


def lm_scores(
    params, config: EntropyModelConfig, docs: Sequence[np.ndarray], n_bytes: int, row_len: int, rows_per_batch: int
) -> dict:
  """bpb of `docs` (`[BOS] ids`) under a causal LM: total NLL in bits / `n_bytes`, the bytes the docs encode."""
  nll, count = total_nll_nats(params, config, docs, row_len, rows_per_batch)
  return dict(bpb=bits_per_byte(nll, n_bytes), nll_nats=nll, n_bytes=n_bytes, n_scored=count)


def byte_docs(texts: Sequence[str]) -> List[np.ndarray]:
  """`[BOS] bytes` of each text, as the byte transformer reads them."""
  return [tokenizer.encode(t, add_bos=True, add_eos=False) for t in texts]


def utf8_bytes(texts: Sequence[str]) -> int:
  return sum(len(t.encode("utf-8")) for t in texts)


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_BN(params, tokens_BN, config: EntropyModelConfig):
  """-ln p(tokens[t + 1]) at position t (the last position is 0)."""
  logits_BNV = EntropyModel(config).apply({"params": params}, tokens_BN)
  logp_BNV = jax.nn.log_softmax(logits_BNV[:, :-1].astype(jnp.float32), axis=-1)
  nll_BN = -jnp.take_along_axis(logp_BNV, tokens_BN[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll_BN, ((0, 0), (0, 1)))


def windows(docs: Sequence[np.ndarray], row_len: int, min_context: int) -> List[Tuple[np.ndarray, int]]:
  """(row input, first scored position) of every window of every `[BOS] ...` document."""
  out = []
  for ids in docs:
    if len(ids) < 2 or ids[0] != tokenizer.BOS_ID:
      raise ValueError("documents must be `[BOS] ids` with at least one id")
    out.extend((w, s) for w, s, _ in split_document(np.asarray(ids, np.int32), row_len, min_context))
  return out


def total_nll_nats(
    params, config: EntropyModelConfig, docs: Sequence[np.ndarray], row_len: int, rows_per_batch: int
) -> Tuple[float, int]:
  """(summed NLL in nats, number of scored ids) of `docs` under the model; rows padded with BOE, one shape."""
  if row_len > config.max_seqlen:
    raise ValueError(f"row_len={row_len} exceeds the model's max_seqlen={config.max_seqlen}")
  pieces = windows(docs, row_len, row_len // 2)
  total, count = 0.0, 0
  for start in range(0, len(pieces), rows_per_batch):
    batch = pieces[start : start + rows_per_batch]
    tokens = np.full((rows_per_batch, row_len), tokenizer.BOE_ID, np.int32)
    mask = np.zeros((rows_per_batch, row_len), bool)
    for r, (ids, score_from) in enumerate(batch):
      tokens[r, : len(ids)] = ids
      mask[r, score_from - 1 : len(ids) - 1] = True  # targets score_from..L-1 are predicted at positions -1
    nll = np.asarray(_nll_BN(params, jnp.asarray(tokens), config), np.float64)
    total += float(nll[mask].sum())
    count += int(mask.sum())
  return total, count


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
  return nll_nats / math.log(2) / n_bytes
