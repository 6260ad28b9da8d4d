"""The document rule, and attention masks as functions of token / patch ids (spec 6.1).

Self-attention masks are never stored for a whole sequence by the fast paths in `attention.py`; the dense builders
here are what those paths are tested against, and what short sequences use directly.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from blt_jax import tokenizer

# ---------------------------------------------------------------------------------------------------------------
# The document rule. One definition, used by every stage (entropy model, hash n-grams, patching, the three
# transformers) in training, scoring and generation: a document starts at position 0 of a row, at every BOS, and
# right after every EOS (a document ends at and including its EOS, spec 6.1 block_causal). Nothing looks back
# across a document start: attention is split there, hash n-gram windows are zero (BOE) padded there as at a row
# start, patches start at the BOS and right after it, RoPE positions and the entropy model's context resets count
# from there. So a document packed into a row behind others is computed exactly as it is alone. For rows of
# `[BOS] bytes [EOS]` documents (training data, the golden inputs) BOS and after-EOS starts coincide, which is the
# reference's EOS rule; a BOS with no EOS before it (scoring packs `[BOS] bytes` documents) also starts one.


def document_starts(tokens_BS: jnp.ndarray) -> jnp.ndarray:
  """bool `[B, S]`: the position begins a document (row start, BOS, or the position after an EOS)."""
  after_eos = jnp.pad(tokens_BS[:, :-1] == tokenizer.EOS_ID, ((0, 0), (1, 0)), constant_values=True)
  return after_eos | (tokens_BS == tokenizer.BOS_ID)


def document_ids(tokens_BS: jnp.ndarray) -> jnp.ndarray:
  """int32 `[B, S]` document index of every position, 0 for the row's first document."""
  return jnp.cumsum(document_starts(tokens_BS).astype(jnp.int32), axis=-1) - 1


def positions_from_starts(starts_BS: jnp.ndarray) -> jnp.ndarray:
  """int32 `[B, S]` distance of every position from the latest start at or before it (position 0 counts)."""
  pos_S = jnp.arange(starts_BS.shape[-1], dtype=jnp.int32)
  last_BS = jax.lax.cummax(jnp.where(starts_BS.at[:, 0].set(True), pos_S[None, :], 0), axis=1)
  return pos_S[None, :] - last_BS


def document_positions(tokens_BS: jnp.ndarray) -> jnp.ndarray:
  """int32 `[B, S]` position of every token within its document (RoPE positions, n-gram look-back bound)."""
  return positions_from_starts(document_starts(tokens_BS))


def context_segments(tokens_BS: jnp.ndarray, context_len: int) -> tuple:
  """(segment ids, positions) `[B, S]`: documents cut every `context_len` tokens counted from their start.

  The entropy model's context resets every 8192 tokens (spec 2.3); counting from the document start keeps a
  document's entropies independent of where it sits in a row.
  """
  doc_pos_BS = document_positions(tokens_BS)
  starts_BS = document_starts(tokens_BS) | (doc_pos_BS % context_len == 0)
  return jnp.cumsum(starts_BS.astype(jnp.int32), axis=-1) - 1, doc_pos_BS % context_len


def patch_document_ids(doc_BN: jnp.ndarray, patch_lengths_BP: jnp.ndarray) -> jnp.ndarray:
  """int32 `[B, P]` document of every patch: that of its first byte (spec 10.4).

  When patches respect documents, patch p+1 starts a new document exactly when patch p holds an EOS, which is the
  reference's rule; zero-length slots after the last byte take the last byte's document (their states are unused).
  """
  N = doc_BN.shape[1]
  starts_BP = jnp.cumsum(patch_lengths_BP, axis=1) - patch_lengths_BP
  return jnp.take_along_axis(doc_BN, jnp.clip(starts_BP, 0, N - 1), axis=1)


def patch_positions(patch_doc_BP: jnp.ndarray) -> jnp.ndarray:
  """int32 `[B, P]` index of every patch within its document (the global transformer's RoPE positions)."""
  changes_BP = jnp.pad(patch_doc_BP[:, 1:] != patch_doc_BP[:, :-1], ((0, 0), (1, 0)), constant_values=True)
  return positions_from_starts(changes_BP)


def self_attention_mask(
    q_pos: jnp.ndarray,
    k_pos: jnp.ndarray,
    q_doc: Optional[jnp.ndarray],
    k_doc: Optional[jnp.ndarray],
    window: Optional[int],
) -> jnp.ndarray:
  """Causal mask, optionally windowed (`i - W < j <= i`) and split into documents. Broadcasts its inputs."""
  mask = k_pos <= q_pos
  if window is not None:
    mask &= q_pos - k_pos < window
  if q_doc is not None:
    mask &= q_doc == k_doc
  return mask


def dense_self_attention_mask(doc_BS: Optional[jnp.ndarray], seq_len: int, window: Optional[int]) -> jnp.ndarray:
  """[B or 1, S, S] boolean mask (query, key)."""
  pos = jnp.arange(seq_len)
  if doc_BS is None:
    return self_attention_mask(pos[:, None], pos[None, :], None, None, window)[None]
  return self_attention_mask(pos[None, :, None], pos[None, None, :], doc_BS[:, :, None], doc_BS[:, None, :], window)


def dense_encoder_cross_mask(
    patch_ids_BN: jnp.ndarray, num_patches: int, k: int, window: Optional[int] = None
) -> jnp.ndarray:
  """[B, P*k, N]: slot `p*k + r` sees byte j iff pid(j) == p, or pid(j) <= p < pid(j) + w with a window."""
  p = jnp.repeat(jnp.arange(num_patches), k)[None, :, None]
  pid = patch_ids_BN[:, None, :]
  if window is None:
    return pid == p
  return (pid <= p) & (p < pid + window)


def dense_decoder_cross_mask(
    decoder_patch_ids_BN: jnp.ndarray, num_patches: int, k: int, window: Optional[int] = None
) -> jnp.ndarray:
  """[B, N, P*k]: byte i sees slot `p*k + r` iff dpid(i) == p, or p <= dpid(i) < p + w with a window."""
  p = jnp.repeat(jnp.arange(num_patches), k)[None, None, :]
  dpid = decoder_patch_ids_BN[:, :, None]
  if window is None:
    return dpid == p
  return (p <= dpid) & (dpid < p + window)
