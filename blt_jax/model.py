"""The BLT: wires embeddings -> local encoder -> global transformer -> local decoder (spec 10).

`BLT(config).apply({"params": p}, tokens_BN, patch_lengths_BP)` returns next-byte logits `[B, N, V]` (float32).
`patch_lengths_BP` is the reference's representation (rows sum to N+1, first patch is the single first byte,
right-padded with zero-length patches to any fixed P); patch ids and every mask are derived from it inside the
jitted function, so a batch of the same shape never recompiles.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import hashing, layers, masks, patching
from blt_jax.config import BLTConfig
from blt_jax.latent import GlobalTransformer
from blt_jax.local_models import LocalDecoder, LocalEncoder


def check_inputs(config: BLTConfig, tokens_BN, patch_lengths_BP) -> None:
  """Clear errors for inputs the model cannot read correctly (instead of silently wrong logits).

  Shapes are checked at trace time; values (first patch is the single BOS byte, lengths cover the N bytes plus
  the next-token position, spec 10.3) only where the arrays are concrete, i.e. outside `jax.jit`: jitted callers
  (the trainer, `blt_jax.score`) build lengths with `blt_jax.patching` or check them on the host first.
  """
  if tokens_BN.ndim != 2 or patch_lengths_BP.ndim != 2 or tokens_BN.shape[0] != patch_lengths_BP.shape[0]:
    raise ValueError(
        f"BLT input: expected tokens [B, N] and patch_lengths [B, P] with the same B, got "
        f"{tuple(tokens_BN.shape)} and {tuple(patch_lengths_BP.shape)}"
    )
  N, P = tokens_BN.shape[1], patch_lengths_BP.shape[1]
  if N > config.max_encoder_seq_length:
    raise ValueError(
        f"BLT input: {N} bytes per row exceed the model's byte context max_encoder_seq_length="
        f"{config.max_encoder_seq_length}; split the rows (blt_jax.score does it for long documents)"
    )
  if P > config.max_seqlen:
    raise ValueError(
        f"BLT input: {P} patch slots exceed the global model's patch context max_seqlen=" f"{config.max_seqlen}"
    )
  try:
    lengths = np.asarray(patch_lengths_BP)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced: values unknown until run time
  bad = np.nonzero(lengths[:, 0] != 1)[0]
  if bad.size:
    raise ValueError(
        f"BLT input: the first patch must be the single BOS byte (length 1, spec 10.3); row {bad[0]} "
        f"has length {lengths[bad[0], 0]}"
    )
  if (lengths < 0).any():
    raise ValueError("BLT input: negative patch lengths")
  sums = lengths.sum(axis=1)
  bad = np.nonzero(sums != N + 1)[0]
  if bad.size:
    raise ValueError(
        f"BLT input: patch lengths must sum to N + 1 = {N + 1} (the bytes plus the next-token "
        f"position, spec 10.3); row {bad[0]} sums to {sums[bad[0]]}"
    )


class HashEmbeddings(nn.Module):
  """All hash n-gram tables fused into one `[M, V_hash, dE]` array (one sharded param, one gather; spec 4.2)."""

  config: BLTConfig

  @nn.compact
  def __call__(self, tokens_BN: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    dE = c.dim_local_encoder
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(layers.trunc_normal(dE**-0.5), ("hash_tables", "hash_vocab", "embed")),
        (c.num_hash_tables, c.encoder_hash_byte_group_vocab, dE),
        jnp.float32,
    )
    ids_MBN = hashing.all_hash_ids(
        tokens_BN,
        c.encoder_hash_byte_group_size,
        c.encoder_hash_byte_group_nb_functions,
        c.encoder_hash_byte_group_vocab,
    )
    total = jnp.zeros(tokens_BN.shape + (dE,), jnp.float32)
    for m in range(c.num_hash_tables):  # plain sum, no scaling (spec 4.2)
      total = total + jnp.take(table[m], ids_MBN[m], axis=0)
    return total


class BLT(nn.Module):
  """Byte Latent Transformer; `intermediates` are sown for parity tests."""

  config: BLTConfig

  @nn.compact
  def __call__(
      self, tokens_BN: jnp.ndarray, patch_lengths_BP: jnp.ndarray, ngram_ids_MBN: Optional[jnp.ndarray] = None
  ) -> jnp.ndarray:
    c = self.config
    check_inputs(c, tokens_BN, patch_lengths_BP)
    B, N = tokens_BN.shape
    P = patch_lengths_BP.shape[1]
    dE = c.dim_local_encoder
    patch_ids_BN = patching.patch_ids_from_lengths(patch_lengths_BP, N)
    decoder_patch_ids_BN = patching.decoder_patch_ids(patch_lengths_BP, N)

    embeds = layers.Embed(c.vocab_size, dE, dE**-0.5, name="tok_embeddings")(tokens_BN)
    if c.num_hash_tables:
      embeds = embeds + HashEmbeddings(c, name="hash_embeddings")(tokens_BN)
    if c.ngram_vocab_sizes:
      if ngram_ids_MBN is None:
        raise ValueError("config.ngram_vocab_sizes is set: pass ngram_ids_MBN (see hashing.ngram_ids)")
      for i, size in enumerate(c.ngram_vocab_sizes):
        embeds = embeds + layers.Embed(size + 4, dE, dE**-0.5, name=f"ngram_embeddings_{i}")(ngram_ids_MBN[i])

    h_BND, patch_BQD = LocalEncoder(c, name="local_encoder")(embeds, tokens_BN, patch_ids_BN, P)
    self.sow("intermediates", "local_encoder_h", h_BND)
    self.sow("intermediates", "local_encoder_patch_h", patch_BQD)

    global_in_BPX = patch_BQD.reshape(B, P, c.cross_attn_k * dE)
    patch_doc_BP = masks.patch_document_ids(masks.document_ids(tokens_BN), patch_lengths_BP)
    global_BPG = GlobalTransformer(c, name="global_transformer")(global_in_BPX, patch_doc_BP)
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
