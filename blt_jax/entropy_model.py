"""The entropy model: a small Llama-style byte LM whose next-byte entropy places patch boundaries (spec 2)."""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blt_jax import layers, masks
from blt_jax.config import EntropyModelConfig


class EntropyModel(nn.Module):
  """tokens `[B, S]` -> next-byte logits `[B, S, V]` (float32). Position t predicts token t+1.

  Attention is split into the context segments of `masks.context_segments` (documents, cut every `max_seqlen`
  tokens from their start, spec 2.3) with RoPE positions counted from each segment's start; `context_len`
  overrides the cut length.
  """

  config: EntropyModelConfig

  @nn.compact
  def __call__(self, tokens_BS: jnp.ndarray, context_len: Optional[int] = None) -> jnp.ndarray:
    c = self.config
    stack = c.stack()
    segment_BS, positions_BS = masks.context_segments(tokens_BS, context_len or c.max_seqlen)
    h = layers.Embed(c.vocab_size, c.dim, c.dim**-0.5, name="tok_embeddings")(tokens_BS).astype(jnp.dtype(c.dtype))
    cos, sin = layers.stack_rope_at(stack, positions_BS)
    h = layers.run_blocks(self, stack, h, cos, sin, segment_BS)
    h = layers.RMSNorm(c.norm_eps, c.dtype, name="norm")(h)
    logits = layers.Linear(c.vocab_size, ("embed", "vocab"), c.dim**-0.5, c.dtype, name="output")(h)
    return logits.astype(jnp.float32)


def entropy_from_logits(logits_BSV: jnp.ndarray) -> jnp.ndarray:
  """Shannon entropy in nats of softmax(logits) over the last axis (spec 2.2)."""
  logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_logits(params, tokens_BN: jnp.ndarray, config: EntropyModelConfig, chunk_len: int | None = None):
  """Logits for arbitrarily long rows; the context restarts every `chunk_len` (default `max_seqlen`, 8192) tokens.

  The reference chunks the flattened batch, so rows bleed into each other (quirk Q3), and counts its 8192-token
  resets from the row start; here the resets count from each document's start (`masks.context_segments`), so a
  document's entropies do not depend on what else shares its row.
  """
  return EntropyModel(config).apply({"params": params}, tokens_BN, chunk_len)


def compute_entropies(params, tokens_BN: jnp.ndarray, config: EntropyModelConfig, chunk_len: int | None = None):
  """Per-byte next-byte entropies `[B, N]` in nats (float32)."""
  return entropy_from_logits(chunked_logits(params, tokens_BN, config, chunk_len))


@functools.partial(jax.jit, static_argnames=("config", "chunk_len"))
def compute_entropies_jit(params, tokens_BN, config: EntropyModelConfig, chunk_len: int | None = None):
  return compute_entropies(params, tokens_BN, config, chunk_len)


def init_entropy_model(rng: jax.Array, config: EntropyModelConfig, seq_len: int = 16):
  """Boxed (logically partitioned) params of a fresh entropy model."""
  return EntropyModel(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
