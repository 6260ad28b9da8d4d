"""Local encoder / decoder helpers in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import local_models


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_patches_bf16_long_patch(mode):
  """Average pooling sums a patch's bytes in float32 and rounds once: a bf16 sum (and a bf16 byte count, which stops
  at 256) gave a 1000-byte patch's mean far off. Max pooling is exact in any dtype."""
  h = (1.0 + 0.25 * jax.random.normal(jax.random.PRNGKey(0), (1, 1001, 8))).astype(jnp.bfloat16)
  ids = jnp.ones((1, 1001), jnp.int32).at[:, 0].set(0)  # a 1-byte patch, a 1000-byte patch, an empty one
  pooled = jax.jit(local_models.pool_patches, static_argnums=(2, 3))(h, ids, 3, mode)
  assert pooled.dtype == jnp.bfloat16
  h32 = np.asarray(h.astype(jnp.float32))[0]
  reduce = np.mean if mode == "avg" else np.max
  ref = np.stack([h32[0], reduce(h32[1:], axis=0), np.zeros(8)])
  np.testing.assert_allclose(np.asarray(pooled.astype(jnp.float32))[0], ref, rtol=2.0**-8)
