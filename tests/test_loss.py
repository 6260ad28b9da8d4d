"""Loss and bits-per-byte as the reference computes them (spec 11)."""

import math

import jax.numpy as jnp
import numpy as np

from blt_jax import loss


def test_masked_sum_and_bpb_hand_case():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  targets = jnp.array([[0, 1, 2]])
  mask = jnp.array([[1.0, 1.0, 0.0]])  # the third position is padding
  s, n = loss.cross_entropy_sum(logits, targets, mask)
  expected = -math.log(0.5) - math.log(0.8)
  np.testing.assert_allclose(s, expected, rtol=1e-6)
  assert float(n) == 2.0
  np.testing.assert_allclose(loss.mean_loss(s, n), expected / (2 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(loss.bits_per_byte(s, n), expected / math.log(2) / 2, rtol=1e-6)


def test_uniform_prediction_is_log2_260_bits():
  logits = jnp.zeros((2, 5, 260))
  s, n = loss.cross_entropy_sum(logits, jnp.ones((2, 5), jnp.int32) * 7, jnp.ones((2, 5)))
  np.testing.assert_allclose(loss.bits_per_byte(s, n), math.log2(260), rtol=1e-6)
