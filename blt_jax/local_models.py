"""Local encoder (bytes -> patch vectors) and local decoder (patch vectors -> next-byte logits), spec 7 and 9."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from blt_jax import attention, layers, masks, sharding
from blt_jax.config import BLTConfig


def pool_patches(h_BND: jnp.ndarray, patch_ids_BN: jnp.ndarray, num_patches: int, mode: str) -> jnp.ndarray:
  """Reduce byte states into `[B, P, D]` per patch; empty patches stay 0 (spec 7 step 2)."""

  def per_row(h, ids):
    if mode == "max":
      out = jax.ops.segment_max(h, ids, num_segments=num_patches, indices_are_sorted=True)
    elif mode == "min":
      out = jax.ops.segment_min(h, ids, num_segments=num_patches, indices_are_sorted=True)
    else:  # avg / mean: summed in float32 (a bf16 running sum rounds at every byte), rounded once
      total = jax.ops.segment_sum(h.astype(jnp.float32), ids, num_segments=num_patches, indices_are_sorted=True)
      count = jax.ops.segment_sum(
          jnp.ones(ids.shape, jnp.float32), ids, num_segments=num_patches, indices_are_sorted=True
      )
      return (total / jnp.maximum(count, 1.0)[:, None]).astype(h.dtype)
    return jnp.where(jnp.isfinite(out), out, 0).astype(h.dtype)

  return jax.vmap(per_row)(h_BND, patch_ids_BN)


def _rope(stack, tokens_BN):
  """RoPE at each byte's position in its document (row positions when the stack does not split documents)."""
  if stack.document_mask:
    return layers.stack_rope_at(stack, masks.document_positions(tokens_BN))
  return layers.stack_rope(stack, tokens_BN.shape[1])


class LocalEncoder(nn.Module):
  """Byte transformer whose states are pooled into `k` query slots per patch, refined by cross-attention.

  Returns the byte states `[B, N, dE]` (no final norm, Q8) and the patch slots `[B, P*k, dE]`.
  """

  config: BLTConfig

  @nn.compact
  def __call__(self, embeds_BND, tokens_BN, patch_ids_BN, num_patches: int):
    c = self.config
    stack = c.encoder_stack()
    B, N, dE = embeds_BND.shape
    k = c.cross_attn_k
    doc_BN = masks.document_ids(tokens_BN)
    cos, sin = _rope(stack, tokens_BN)
    attend = functools.partial(
        attention.encoder_cross_attention,
        patch_ids_BN=patch_ids_BN,
        num_patches=num_patches,
        slots=k,
        window=c.cross_attn_window_encoder,
    )
    h = layers.batch_sharded(embeds_BND.astype(jnp.dtype(c.dtype)))
    proj = layers.Linear(dE * k, ("embed", "heads"), dE**-0.5, c.dtype, name="patch_embedding_projection")
    patch_BQD = None
    for i in range(c.n_layers_local_encoder):
      h = layers.block(stack, i, f"layers_{i}")(h, cos, sin, doc_BN)
      if i == c.n_layers_local_encoder - 1 or c.cross_attn_all_layers_encoder:
        if patch_BQD is None or c.encoder_repool_patches:  # re-pooling at every layer: transformers' port only
          # Queries are pooled from this layer's outputs, not raw embeddings (Q6, issue #88).
          pooled_BPD = pool_patches(h, patch_ids_BN, num_patches, c.downsampling_by_pooling)
          patch_BQD = proj(pooled_BPD).reshape(B, num_patches * k, dE)  # slot p*k+r = features r*dE:(r+1)*dE
        j = i if c.cross_attn_all_layers_encoder else 0
        xattn = layers.CrossAttention(
            dE,
            c.cross_attn_nheads,
            layers.cross_attention_std(dE, c.init_std_factor, j, c.n_layers_local_encoder),
            c.norm_eps,
            c.dtype,
            name=f"cross_attn_layers_{j}",
        )
        patch_BQD = patch_BQD + xattn(patch_BQD, h, attend)  # double residual (Q1)
    return h, patch_BQD


class LocalDecoder(nn.Module):
  """Byte transformer reading the global patch states through cross-attention; returns float32 logits."""

  config: BLTConfig

  @nn.compact
  def __call__(self, h_BND, global_BPG, tokens_BN, decoder_patch_ids_BN):
    c = self.config
    stack = c.decoder_stack()
    B, N, dD = h_BND.shape
    P = global_BPG.shape[1]
    k = c.cross_attn_k
    dG = global_BPG.shape[-1]
    # Output width is the encoder's token dim times k (Q7); the config checks dE == dD.
    proj = layers.Linear(
        c.dim_local_encoder * k, ("embed", "heads"), dG**-0.5, c.dtype, name="patch_embedding_projection"
    )
    patch_BQD = proj(global_BPG).reshape(B, P * k, dD)
    doc_BN = masks.document_ids(tokens_BN)
    cos, sin = _rope(stack, tokens_BN)
    attend = functools.partial(
        attention.decoder_cross_attention,
        decoder_patch_ids_BN=decoder_patch_ids_BN,
        slots=k,
        window=c.cross_attn_window_decoder,
    )
    h = layers.batch_sharded(h_BND.astype(jnp.dtype(c.dtype)))
    for i in range(c.n_layers_local_decoder):
      if i == 0 or c.cross_attn_all_layers_decoder:
        xattn = layers.CrossAttention(
            dD,
            c.decoder_cross_attn_nheads,
            layers.cross_attention_std(dD, c.init_std_factor, i, c.n_layers_local_decoder),
            c.norm_eps,
            c.dtype,
            name=f"cross_attn_layers_{i}",
        )
        h = h + xattn(h, patch_BQD, attend)  # cross-attention before the self-attention block; double residual (Q1)
      h = layers.block(stack, i, f"layers_{i}")(h, cos, sin, doc_BN)
    h = layers.RMSNorm(c.norm_eps, c.dtype, name="norm")(h)
    # The 260-way output is not split over "tensor" (too small): its positions are, so no chip repeats another's.
    h = sharding.positions_over_tensor(h)
    logits = layers.Linear(c.vocab_size, ("embed", "vocab"), dD**-0.5, c.dtype, name="output")(h)
    return logits.astype(jnp.float32)
