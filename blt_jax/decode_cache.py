"""Transformer stacks that read and write explicit key/value caches, for generation (`blt_jax.generate`).

Every weight is applied through the same Flax modules the model uses (`layers.Linear`, `RMSNorm`, `FeedForward`,
`CrossAttention`), so a cached step computes what `BLT.apply` computes; only the self-attention core differs: it
writes the new keys/values into a fixed-shape cache `[B, S_cap, Hkv, D]` at each row's own positions and attends
from there. A call processes `S` new positions per row (the whole prompt at prefill, one byte per decoding step);
with one position and a window, it reads just the `W` keys the window allows, so a step costs the same however
long the prefix is.

Generation keeps one document per row (the prompt is `[BOS] bytes`; generated ids are bytes or an EOS that ends
the row), so the document rule of `masks` reduces to causality, windows and the entropy model's context resets.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from blt_jax import attention, layers
from blt_jax.config import StackConfig

Cache = Dict[str, jnp.ndarray]  # {"k": [B, S_cap, Hkv, D], "v": [B, S_cap, Hkv, D]}


def empty_caches(stack: StackConfig, batch: int, capacity: int) -> List[Cache]:
  shape = (batch, capacity, stack.kv_heads, stack.hd)
  dtype = jnp.dtype(stack.dtype)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(stack.n_layers)]


def apply_module(module, params, *args):
  return module.apply({"params": params}, *args)


def _linear(params, x, features, dtype):
  return apply_module(layers.Linear(features, ("embed", "heads"), 1.0, dtype), params, x)


def _write(cache_BTKD: jnp.ndarray, pos_BS: jnp.ndarray, new_BSKD: jnp.ndarray) -> jnp.ndarray:
  rows_BS = jnp.broadcast_to(jnp.arange(pos_BS.shape[0])[:, None], pos_BS.shape)
  return cache_BTKD.at[rows_BS, pos_BS].set(new_BSKD.astype(cache_BTKD.dtype), mode="drop")


def _window_slice(cache_BTKD: jnp.ndarray, start_B: jnp.ndarray, width: int) -> jnp.ndarray:
  return jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(c, s, width, axis=0))(cache_BTKD, start_B)


def attend(q_BSHD, cache: Cache, q_pos_BS, window: Optional[int], context_len: Optional[int]):
  """Causal attention of new queries over the cache: `k <= q`, `q - k < window`, same `context_len` segment."""
  capacity = cache["k"].shape[1]
  B, S = q_pos_BS.shape
  if S == 1 and window is not None and window < capacity:
    start_B = jnp.clip(q_pos_BS[:, 0] - window + 1, 0, capacity - window)
    k, v = _window_slice(cache["k"], start_B, window), _window_slice(cache["v"], start_B, window)
    k_pos_BT = start_B[:, None] + jnp.arange(window)[None, :]
  else:
    k, v = cache["k"], cache["v"]
    k_pos_BT = jnp.broadcast_to(jnp.arange(capacity)[None, :], (B, capacity))
  q_pos, k_pos = q_pos_BS[:, :, None], k_pos_BT[:, None, :]
  mask = k_pos <= q_pos
  if window is not None:
    mask &= q_pos - k_pos < window
  if context_len is not None:
    mask &= q_pos // context_len == k_pos // context_len
  return attention.masked_attention(q_BSHD, k, v, mask)


def block(
    stack: StackConfig, params, x_BSD, pos_BS, cache: Cache, context_len: Optional[int] = None, fresh: bool = False
):
  """One pre-norm block (`layers.TransformerBlock`) on new positions; returns (out, updated cache).

  `fresh` (prefill): the positions are 0..S-1 in every row and the cache held nothing before, so the new queries
  attend only the new keys: the model's own self-attention kernel runs on them (`attention.self_attention`, blocked
  for long prompts) instead of a dense masked softmax over the whole cache. The cache is written the same way.
  """
  c = stack
  B, S, _ = x_BSD.shape
  H, K, D = c.n_heads, c.kv_heads, c.hd
  xn = apply_module(layers.RMSNorm(c.norm_eps, c.dtype), params["attention_norm"], x_BSD)
  p = params["attention"]
  q = _linear(p["wq"], xn, H * D, c.dtype).reshape(B, S, H, D)
  k = _linear(p["wk"], xn, K * D, c.dtype).reshape(B, S, K, D)
  v = _linear(p["wv"], xn, K * D, c.dtype).reshape(B, S, K, D)
  rope_pos_BS = pos_BS % context_len if context_len is not None else pos_BS
  cos, sin = layers.stack_rope_at(c, rope_pos_BS)
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  cache = {"k": _write(cache["k"], pos_BS, k), "v": _write(cache["v"], pos_BS, v)}
  if fresh:
    segments_BS = None if context_len is None else pos_BS // context_len
    out = attention.self_attention(q, k, v, segments_BS, c.sliding_window, impl=c.attention_impl)
  else:
    out = attend(q, cache, pos_BS, c.sliding_window, context_len)
  h = x_BSD + _linear(p["wo"], out.reshape(B, S, H * D), c.dim, c.dtype)
  hn = apply_module(layers.RMSNorm(c.norm_eps, c.dtype), params["ffn_norm"], h)
  return h + apply_module(layers.FeedForward(c, 1.0), params["feed_forward"], hn), cache


def stack_forward(
    stack: StackConfig,
    params,
    x_BSD,
    pos_BS,
    caches: List[Cache],
    context_len: Optional[int] = None,
    outputs: bool = False,
    fresh: bool = False,
):
  """All blocks of a stack (`params["layers_i"]`); returns (h, caches[, per-layer outputs]). `fresh`: as `block`'s."""
  new_caches, per_layer = [], []
  h = x_BSD
  for i in range(stack.n_layers):
    h, cache = block(stack, params[f"layers_{i}"], h, pos_BS, caches[i], context_len, fresh)
    new_caches.append(cache)
    per_layer.append(h)
  return (h, new_caches, per_layer) if outputs else (h, new_caches)


def masked_merge(take_B: jnp.ndarray, new: Any, old: Any) -> Any:
  """Per row: the new pytree where `take_B`, else the old one (rows that did not close a patch keep theirs)."""

  def pick(a, b):
    shape = (take_B.shape[0],) + (1,) * (a.ndim - 1)
    return jnp.where(take_B.reshape(shape), a, b)

  return jax.tree_util.tree_map(pick, new, old)
