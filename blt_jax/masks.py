"""Attention masks as functions of token / patch ids (spec 6.1).

Self-attention masks are never stored for a whole sequence by the fast paths in `attention.py`; the dense builders
here are what those paths are tested against, and what short sequences use directly.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from blt_jax import tokenizer


def document_ids(tokens_BS: jnp.ndarray, eos_id: int = tokenizer.EOS_ID) -> jnp.ndarray:
  """Document index of every position: a document ends at and including each EOS (spec 6.1 block_causal)."""
  is_eos = (tokens_BS == eos_id).astype(jnp.int32)
  return jnp.cumsum(is_eos, axis=-1) - is_eos


def self_attention_mask(q_pos: jnp.ndarray, k_pos: jnp.ndarray, q_doc: Optional[jnp.ndarray],
                        k_doc: Optional[jnp.ndarray], window: Optional[int]) -> jnp.ndarray:
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


def dense_encoder_cross_mask(patch_ids_BN: jnp.ndarray, num_patches: int, k: int,
                             window: Optional[int] = None) -> jnp.ndarray:
  """[B, P*k, N]: slot `p*k + r` sees byte j iff pid(j) == p, or pid(j) <= p < pid(j) + w with a window."""
  p = jnp.repeat(jnp.arange(num_patches), k)[None, :, None]
  pid = patch_ids_BN[:, None, :]
  if window is None:
    return pid == p
  return (pid <= p) & (p < pid + window)


def dense_decoder_cross_mask(decoder_patch_ids_BN: jnp.ndarray, num_patches: int, k: int,
                             window: Optional[int] = None) -> jnp.ndarray:
  """[B, N, P*k]: byte i sees slot `p*k + r` iff dpid(i) == p, or p <= dpid(i) < p + w with a window."""
  p = jnp.repeat(jnp.arange(num_patches), k)[None, None, :]
  dpid = decoder_patch_ids_BN[:, :, None]
  if window is None:
    return dpid == p
  return (p <= dpid) & (dpid < p + window)
