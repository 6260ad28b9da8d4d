"""The global (latent) transformer over patches (spec 8)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from blt_jax import layers, tokenizer
from blt_jax.config import BLTConfig


def patch_document_ids(tokens_BN: jnp.ndarray, patch_ids_BN: jnp.ndarray, num_patches: int) -> jnp.ndarray:
  """Global document index per patch: a new document starts after every patch holding an EOS byte (spec 10.4)."""
  is_eos = (tokens_BN == tokenizer.EOS_ID).astype(jnp.int32)
  eos_P = jax.vmap(lambda e, ids: jax.ops.segment_max(e, ids, num_segments=num_patches, indices_are_sorted=True))(
      is_eos, patch_ids_BN)
  eos_P = jnp.maximum(eos_P, 0)  # empty patches: segment_max gives the dtype's minimum
  return jnp.cumsum(eos_P, axis=-1) - eos_P


class GlobalTransformer(nn.Module):
  """`[B, P, k*dE]` patch vectors -> `[B, P, dG]`; block-causal over patches, no final norm (Q8)."""
  config: BLTConfig

  @nn.compact
  def __call__(self, h_BPX: jnp.ndarray, patch_doc_BP: jnp.ndarray) -> jnp.ndarray:
    c = self.config
    stack = c.global_stack()
    P = h_BPX.shape[1]
    h = h_BPX.astype(jnp.dtype(c.dtype))
    if c.global_input_dim != c.dim_global:  # only then does the reference create and apply it (spec 8)
      h = layers.Linear(c.dim_global, ("heads", "embed"), c.global_input_dim ** -0.5, c.dtype,
                        name="token_embedding_projection")(h)
    cos, sin = layers.stack_rope(stack, P)
    for i in range(c.n_layers_global):
      h = layers.block(stack, i, f"layers_{i}")(h, cos, sin, patch_doc_BP)
    return h
