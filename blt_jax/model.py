"""The BLT: wires embeddings -> local encoder -> global transformer -> local decoder (spec 10).

`BLT(config).apply({"params": p}, tokens_BN, patch_lengths_BP)` returns next-byte logits `[B, N, V]` (float32).
`patch_lengths_BP` is the reference's representation (rows sum to N+1, first patch is the single first byte,
right-padded with zero-length patches to any fixed P); patch ids and every mask are derived from it inside the
jitted function, so a batch of the same shape never recompiles.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from blt_jax import hashing, layers, patching
from blt_jax.config import BLTConfig
from blt_jax.latent import GlobalTransformer, patch_document_ids
from blt_jax.local_models import LocalDecoder, LocalEncoder


class HashEmbeddings(nn.Module):
  """All hash n-gram tables fused into one `[M, V_hash, dE]` array (one sharded param, one gather; spec 4.2)."""
  config: BLTConfig

  @nn.compact
  def __call__(self, tokens_BN: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    dE = c.dim_local_encoder
    table = self.param("embedding", nn.with_logical_partitioning(layers.trunc_normal(dE ** -0.5),
                                                                 ("hash_tables", "hash_vocab", "embed")),
                       (c.num_hash_tables, c.encoder_hash_byte_group_vocab, dE), jnp.float32)
    ids_MBN = hashing.all_hash_ids(tokens_BN, c.encoder_hash_byte_group_size, c.encoder_hash_byte_group_nb_functions,
                                   c.encoder_hash_byte_group_vocab)
    total = jnp.zeros(tokens_BN.shape + (dE,), jnp.float32)
    for m in range(c.num_hash_tables):  # plain sum, no scaling (spec 4.2)
      total = total + jnp.take(table[m], ids_MBN[m], axis=0)
    return total


class BLT(nn.Module):
  """Byte Latent Transformer; `intermediates` are sown for parity tests."""
  config: BLTConfig

  @nn.compact
  def __call__(self, tokens_BN: jnp.ndarray, patch_lengths_BP: jnp.ndarray,
               ngram_ids_MBN: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    c = self.config
    B, N = tokens_BN.shape
    P = patch_lengths_BP.shape[1]
    dE = c.dim_local_encoder
    patch_ids_BN = patching.patch_ids_from_lengths(patch_lengths_BP, N)
    decoder_patch_ids_BN = patching.decoder_patch_ids(patch_lengths_BP, N)

    embeds = layers.Embed(c.vocab_size, dE, dE ** -0.5, name="tok_embeddings")(tokens_BN)
    if c.num_hash_tables:
      embeds = embeds + HashEmbeddings(c, name="hash_embeddings")(tokens_BN)
    if c.ngram_vocab_sizes:
      if ngram_ids_MBN is None:
        raise ValueError("config.ngram_vocab_sizes is set: pass ngram_ids_MBN (see hashing.ngram_ids)")
      for i, size in enumerate(c.ngram_vocab_sizes):
        embeds = embeds + layers.Embed(size + 4, dE, dE ** -0.5, name=f"ngram_embeddings_{i}")(ngram_ids_MBN[i])

    h_BND, patch_BQD = LocalEncoder(c, name="local_encoder")(embeds, tokens_BN, patch_ids_BN, P)
    self.sow("intermediates", "local_encoder_h", h_BND)
    self.sow("intermediates", "local_encoder_patch_h", patch_BQD)

    global_in_BPX = patch_BQD.reshape(B, P, c.cross_attn_k * dE)
    global_BPG = GlobalTransformer(c, name="global_transformer")(
        global_in_BPX, patch_document_ids(tokens_BN, patch_ids_BN, P))
    self.sow("intermediates", "global_h", global_BPG)

    return LocalDecoder(c, name="local_decoder")(h_BND, global_BPG, tokens_BN, decoder_patch_ids_BN)


def init_blt(rng, config: BLTConfig, seq_len: int = 16, num_patches: int = 8):
  """Boxed (logically partitioned) params of a fresh BLT."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  lengths = jnp.zeros((1, num_patches), jnp.int32).at[0, 0].set(1).at[0, 1].set(seq_len)
  ngrams = None
  if config.ngram_vocab_sizes:
    ngrams = jnp.zeros((len(config.ngram_vocab_sizes), 1, seq_len), jnp.int32)
  return BLT(config).init(rng, tokens, lengths, ngrams)["params"]
