"""The global (latent) transformer over patches (spec 8)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from blt_jax import layers, masks
from blt_jax.config import BLTConfig


class GlobalTransformer(nn.Module):
  """`[B, P, k*dE]` patch vectors -> `[B, P, dG]`; block-causal over patches, no final norm (Q8)."""

  config: BLTConfig

  @nn.compact
  def __call__(self, h_BPX: jnp.ndarray, patch_doc_BP: jnp.ndarray) -> jnp.ndarray:
    """`patch_doc_BP`: each patch's document (`masks.patch_document_ids`); RoPE counts patches from its start."""
    c = self.config
    stack = c.global_stack()
    P = h_BPX.shape[1]
    h = layers.batch_sharded(h_BPX.astype(jnp.dtype(c.dtype)))
    if c.global_input_dim != c.dim_global:  # only then does the reference create and apply it (spec 8)
      h = layers.Linear(
          c.dim_global, ("heads", "embed"), c.global_input_dim**-0.5, c.dtype, name="token_embedding_projection"
      )(h)
    if stack.document_mask:
      cos, sin = layers.stack_rope_at(stack, masks.patch_positions(patch_doc_BP))
    else:
      cos, sin = layers.stack_rope(stack, P)
    return layers.run_blocks(self, stack, h, cos, sin, patch_doc_BP)
