"""Building blocks with weights (spec 5): RMSNorm, interleaved RoPE, SwiGLU, self- and cross-attention.

Params are float32 and annotated with logical axis names (mapped onto the mesh by `sharding.py`); compute runs in
the stack's `dtype`. Parameter names mirror the reference state dict (`attention.wq`, `feed_forward.w1`, ...).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from blt_jax import attention, layer_stacking
from blt_jax.config import REMAT_POLICIES, StackConfig, init_std_factor


def trunc_normal(std: float):
  """Truncated normal at +-3 std, as the reference's `init_weights` (spec 13.2)."""
  return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


@jax.custom_vjp
def low_precision_dot(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`x @ kernel` in x's (low-precision) dtype, with a float32 kernel gradient.

  The float32 kernel is rounded to x's dtype first, so FSDP all-gathers the rounded copy. The forward and the input
  gradient are dots in that dtype (XLA accumulates them in float32 and rounds the result). The kernel gradient is
  produced in float32: its partial sums over batch shards are then reduced in float32, as the reference's FSDP
  `reduce_dtype=fp32` does (spec 13.3), instead of being rounded before the cross-device sum.
  """
  return jnp.dot(x, kernel.astype(x.dtype))


def _low_precision_dot_fwd(x, kernel):
  kernel_lp = kernel.astype(x.dtype)
  return jnp.dot(x, kernel_lp), (x, kernel_lp)


def _low_precision_dot_bwd(res, g):
  x, kernel_lp = res
  dx = jnp.einsum("...o,io->...i", g, kernel_lp)
  dkernel = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
  return dx, dkernel


low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


class Linear(nn.Module):
  """Bias-free projection; kernel `[in, out]` (the transpose of torch's Linear weight)."""

  features: int
  axes: Tuple[str, str]
  std: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(trunc_normal(self.std), self.axes),
        (x.shape[-1], self.features),
        jnp.float32,
    )
    dtype = jnp.dtype(self.dtype)
    if dtype == jnp.float32:
      return jnp.dot(x.astype(dtype), kernel)
    return low_precision_dot(x.astype(dtype), kernel)


class Embed(nn.Module):
  """Token embedding table `[num, dim]`."""

  num_embeddings: int
  features: int
  std: float
  axes: Tuple[str, str] = ("vocab", "embed")

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(trunc_normal(self.std), self.axes),
        (self.num_embeddings, self.features),
        jnp.float32,
    )
    return jnp.take(table, ids, axis=0)


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x^2) + eps) * w`, normalised and scaled in float32 then rounded once (spec 5.1)."""

  eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * scale
    return y.astype(jnp.dtype(self.dtype))


def batch_sharded(x_BSD: jnp.ndarray) -> jnp.ndarray:
  """Pins an activation `[B, S, D]` to the batch axes of the mesh (a no-op when no mesh is set while tracing).

  Without it, sharding propagation may take the embed-dim sharding of an fsdp-sharded table for the activations and
  replicate the batch: every matmul then all-reduces activations instead of all-gathering (bf16) weights.
  """
  return nn.with_logical_constraint(x_BSD, ("activation_batch", "activation_length", "activation_embed"))


def rope_tables(seq_len: int, head_dim: int, theta: float) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin `[S, head_dim/2]` in float32 for positions 0..S-1 (spec 5.4)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32)[: head_dim // 2] / head_dim
  inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def rope_at(positions_BS: jnp.ndarray, head_dim: int, theta: float) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin `[B, S, head_dim/2]` at explicit positions; the same float32 arithmetic as `rope_tables`."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32)[: head_dim // 2] / head_dim
  inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
  angles = positions_BS.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BSHD: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotate interleaved pairs (2i, 2i+1) in float32, round once to x's dtype (Meta/GPT-J layout, spec 5.4).

  `cos`/`sin` are `[S, D/2]` (positions 0..S-1 of every row) or `[B, S, D/2]` (per-row positions, `rope_at`).
  """
  B, S, H, D = x_BSHD.shape
  x = x_BSHD.astype(jnp.float32).reshape(B, S, H, D // 2, 2)
  x0, x1 = x[..., 0], x[..., 1]
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
  return out.reshape(B, S, H, D).astype(x_BSHD.dtype)


class SelfAttention(nn.Module):
  """Multi-head (optionally grouped-query) self-attention with RoPE and the stack's mask (spec 5.2, 6)."""

  stack: StackConfig
  std: float

  @nn.compact
  def __call__(self, x_BSD, cos, sin, doc_BS):
    c = self.stack
    B, S, _ = x_BSD.shape
    H, K, D = c.n_heads, c.kv_heads, c.hd
    q = checkpoint_name(Linear(H * D, ("embed", "heads"), self.std, c.dtype, name="wq")(x_BSD), "query_proj")
    k = checkpoint_name(Linear(K * D, ("embed", "heads"), self.std, c.dtype, name="wk")(x_BSD), "key_proj")
    v = checkpoint_name(Linear(K * D, ("embed", "heads"), self.std, c.dtype, name="wv")(x_BSD), "value_proj")
    q, k, v = q.reshape(B, S, H, D), k.reshape(B, S, K, D), v.reshape(B, S, K, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention.self_attention(
        q, k, v, doc_BS if c.document_mask else None, c.sliding_window, impl=c.attention_impl
    )
    out = Linear(c.dim, ("heads", "embed"), self.std, c.dtype, name="wo")(out.reshape(B, S, H * D))
    return checkpoint_name(out, "out_proj")


class FeedForward(nn.Module):
  """SwiGLU: `w2(silu(w1 x) * w3 x)` (spec 5.3)."""

  stack: StackConfig
  factor: float

  @nn.compact
  def __call__(self, x):
    c = self.stack
    std_in, std_out = c.dim**-0.5 / self.factor, c.ffn_dim**-0.5 / self.factor
    a = Linear(c.ffn_dim, ("embed", "mlp"), std_in, c.dtype, name="w1")(x)
    b = Linear(c.ffn_dim, ("embed", "mlp"), std_in, c.dtype, name="w3")(x)
    return Linear(c.dim, ("mlp", "embed"), std_out, c.dtype, name="w2")(jax.nn.silu(a) * b)


class TransformerBlock(nn.Module):
  """Pre-norm block `h = x + attn(norm(x)); out = h + ffn(norm(h))` (spec 5.5)."""

  stack: StackConfig
  depth: int

  @nn.compact
  def __call__(self, x_BSD, cos, sin, doc_BS):
    c = self.stack
    factor = init_std_factor(c.init_std_factor, self.depth, c.n_layers, c.dim)
    h = x_BSD + SelfAttention(c, c.dim**-0.5 / factor, name="attention")(
        RMSNorm(c.norm_eps, c.dtype, name="attention_norm")(x_BSD), cos, sin, doc_BS
    )
    return h + FeedForward(c, factor, name="feed_forward")(RMSNorm(c.norm_eps, c.dtype, name="ffn_norm")(h))


def remat_policy(stack: StackConfig):
  """The `jax.checkpoint` policy of the stack's `remat_policy` (config.REMAT_POLICIES). The named ones keep the
  projections `SelfAttention` tags (`query_proj`, `key_proj`, `value_proj`, `out_proj`)."""
  policies = jax.checkpoint_policies
  name = stack.remat_policy
  if name == "full":
    return None
  if name == "dots":
    return policies.dots_saveable
  if name == "dots_no_batch":
    return policies.dots_with_no_batch_dims_saveable
  if name == "save_qkv_proj":
    return policies.save_only_these_names("query_proj", "key_proj", "value_proj")
  if name == "save_attention_proj":
    return policies.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj")
  if name == "offload_dots_no_batch":
    return policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"remat_policy={name!r}: expected one of {REMAT_POLICIES}")


def block(stack: StackConfig, depth: int, name: str) -> TransformerBlock:
  """A block, rematerialised in the backward pass when the stack asks for it."""
  cls = nn.remat(TransformerBlock, policy=remat_policy(stack)) if stack.remat else TransformerBlock
  return cls(stack, depth, name=name)


def run_blocks(parent: nn.Module, stack: StackConfig, x_BSD, cos, sin, doc_BS, prefix: str = "layers_"):
  """`x` through the parent's blocks, in order; the params may be in either layout (`blt_jax.layer_stacking`).

  * stacked (one `layers` subtree of `[n, ...]` leaves, what a `scan_layers` run keeps in its train state): one
    `lax.scan` whose body is a single block, so compile time does not grow with depth;
  * per-layer (`{prefix}0 .. {prefix}{n-1}`, the reference's names, what checkpoints on disk hold): with
    `stack.scan_layers` (outside init) they are stacked here, in the step, and scanned the same way (one copy of
    the stack's params per call); without it the blocks run as a Python loop, one compiled block per layer.
  """
  n = stack.n_layers
  if parent.is_initializing():
    params = {}
  else:
    params = nn.meta.unbox(parent.variables.get("params", {}))
  name = layer_stacking.stacked_name(prefix)
  if name in params:
    stacked = params[name]
    found = layer_stacking.num_layers(stacked)
    if found != n:
      raise ValueError(f"stacked params {name!r} hold {found} layers; the stack has {n}")
  elif stack.scan_layers and n > 1 and not parent.is_initializing():
    missing = [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" not in params]
    if missing:
      raise ValueError(f"scan_layers: params have no {missing[0]!r} ({n} layers expected) and no stacked {name!r}")
    stacked = layer_stacking.stack_layers({f"{prefix}{i}": params[f"{prefix}{i}"] for i in range(n)}, prefix)[name]
  else:
    for i in range(n):
      x_BSD = block(stack, i, f"{prefix}{i}")(x_BSD, cos, sin, doc_BS)
    return x_BSD
  one_block = TransformerBlock(
      stack, 0, parent=None
  )  # unbound; the depth only sets init stds: every layer's apply is the same function

  def body(h, layer_params):
    return one_block.apply({"params": layer_params}, h, cos, sin, doc_BS), None

  if stack.remat:
    body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(stack))
  x_BSD, _ = jax.lax.scan(body, x_BSD, stacked)
  return x_BSD


# attend(q_BQHD, k_BTHD, v_BTHD) -> out_BQHD, closing over the ids that define who sees whom.
AttendFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


class CrossAttention(nn.Module):
  """Norms on both sides, no RoPE; returns `x + wo(attn)` (the residual is inside, spec 5.6).

  Callers add `x` again, so the net update is `2x + wo(attn)`: the double residual the released weights were
  trained with (quirk Q1).
  """

  dim: int
  n_heads: int
  std: float
  norm_eps: float = 1e-5
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BQD, kv_BTD, attend: AttendFn):
    B, Q, _ = x_BQD.shape
    T = kv_BTD.shape[1]
    H, D = self.n_heads, self.dim // self.n_heads
    xq = RMSNorm(self.norm_eps, self.dtype, name="cross_attn_norm_q")(x_BQD)
    xkv = RMSNorm(self.norm_eps, self.dtype, name="cross_attn_norm_kv")(kv_BTD)
    q = Linear(self.dim, ("embed", "heads"), self.std, self.dtype, name="wq")(xq).reshape(B, Q, H, D)
    k = Linear(self.dim, ("embed", "heads"), self.std, self.dtype, name="wk")(xkv).reshape(B, T, H, D)
    v = Linear(self.dim, ("embed", "heads"), self.std, self.dtype, name="wv")(xkv).reshape(B, T, H, D)
    out = attend(q, k, v).reshape(B, Q, H * D)
    return x_BQD + Linear(self.dim, ("heads", "embed"), self.std, self.dtype, name="wo")(out)


def cross_attention_std(dim: int, mode: str, index: int, n_self_layers: int) -> float:
  """Init std of cross-attention projections: factor by cross-layer index (spec 13.2)."""
  return dim**-0.5 / init_std_factor(mode, index, n_self_layers, dim)


def stack_rope(stack: StackConfig, seq_len: int):
  return rope_tables(seq_len, stack.hd, stack.rope_theta)


def stack_rope_at(stack: StackConfig, positions_BS: jnp.ndarray):
  return rope_at(positions_BS, stack.hd, stack.rope_theta)
