"""Next-byte cross-entropy and bits-per-byte (spec 11)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def cross_entropy_sum(logits_BNV: jnp.ndarray, targets_BN: jnp.ndarray, mask_BN: jnp.ndarray):
  """(sum of masked per-byte losses in nats, number of counted bytes), both float32 scalars.

  Summing (rather than averaging per batch) makes gradient accumulation and multi-batch evaluation exact:
  divide the totals at the end. Targets include BOS/EOS, which count as bytes, as in the reference.
  """
  logp = jax.nn.log_softmax(logits_BNV.astype(jnp.float32), axis=-1)
  nll_BN = -jnp.take_along_axis(logp, targets_BN[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask_BN.astype(jnp.float32)
  return jnp.sum(nll_BN * mask), jnp.sum(mask)


def mean_loss(loss_sum, count):
  """The reference's `sum(loss * mask) / (sum(mask) + 1e-6)` (spec 11)."""
  return loss_sum / (count + 1e-6)


def bits_per_byte(loss_sum, count):
  """`sum(nats) / ln 2 / n_bytes` (spec 11)."""
  return loss_sum / LN2 / jnp.maximum(count, 1.0)
