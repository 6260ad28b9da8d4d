"""The entropy model: a small Llama-style byte LM whose next-byte entropy places patch boundaries (spec 2)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from blt_jax import layers, masks
from blt_jax.config import EntropyModelConfig


class EntropyModel(nn.Module):
  """tokens `[B, S]` -> next-byte logits `[B, S, V]` (float32). Position t predicts token t+1."""
  config: EntropyModelConfig

  @nn.compact
  def __call__(self, tokens_BS: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    stack = c.stack()
    S = tokens_BS.shape[1]
    h = layers.Embed(c.vocab_size, c.dim, c.dim ** -0.5, name="tok_embeddings")(tokens_BS).astype(jnp.dtype(c.dtype))
    cos, sin = layers.stack_rope(stack, S)
    doc_BS = masks.document_ids(tokens_BS)
    for i in range(c.n_layers):
      h = layers.block(stack, i, f"layers_{i}")(h, cos, sin, doc_BS)
    h = layers.RMSNorm(c.norm_eps, c.dtype, name="norm")(h)
    logits = layers.Linear(c.vocab_size, ("embed", "vocab"), c.dim ** -0.5, c.dtype, name="output")(h)
    return logits.astype(jnp.float32)


def entropy_from_logits(logits_BSV: jnp.ndarray) -> jnp.ndarray:
  """Shannon entropy in nats of softmax(logits) over the last axis (spec 2.2)."""
  logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_logits(params, tokens_BN: jnp.ndarray, config: EntropyModelConfig, chunk_len: int | None = None):
  """Logits for arbitrarily long rows, restarting the context every `chunk_len` tokens of each row.

  The reference flattens the batch before chunking, so rows bleed into each other (quirk Q3); here every row is
  chunked on its own, keeping only the reference's context reset every `max_seqlen` (8192) tokens (spec 2.3).
  """
  B, N = tokens_BN.shape
  chunk = min(chunk_len or config.max_seqlen, N)
  n_chunks = -(-N // chunk)
  padded = jnp.pad(tokens_BN, ((0, 0), (0, n_chunks * chunk - N)))  # zero (BOE) padding after the real tokens
  logits = EntropyModel(config).apply({"params": params}, padded.reshape(B * n_chunks, chunk))
  return logits.reshape(B, n_chunks * chunk, -1)[:, :N]


def compute_entropies(params, tokens_BN: jnp.ndarray, config: EntropyModelConfig, chunk_len: int | None = None):
  """Per-byte next-byte entropies `[B, N]` in nats (float32)."""
  return entropy_from_logits(chunked_logits(params, tokens_BN, config, chunk_len))


@functools.partial(jax.jit, static_argnames=("config", "chunk_len"))
def compute_entropies_jit(params, tokens_BN, config: EntropyModelConfig, chunk_len: int | None = None):
  return compute_entropies(params, tokens_BN, config, chunk_len)


def init_entropy_model(rng: jax.Array, config: EntropyModelConfig, seq_len: int = 16):
  """Boxed (logically partitioned) params of a fresh entropy model."""
  return EntropyModel(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
