"""Self-attention through JAX's Pallas splash kernel (TPU): causal or local-window masks, documents as segment ids.

The kernel works on one sequence `[H, S, D]` with a static block-sparse mask; batches are vmapped and, under a mesh,
wrapped in `shard_map` over the batch axes (a Pallas call is opaque to the SPMD partitioner, which would otherwise
gather the whole batch onto every chip). Off TPU the kernel runs in Pallas interpret mode (slow: for tests).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

MIN_BLOCK = 128  # sequence lengths must be multiples of the kernel's (lane-sized) blocks
BATCH_AXES = ("data", "fsdp")  # the mesh axes rows are sharded over (sharding.BATCH_AXES)
HEAD_AXIS = "tensor"  # the mesh axis the attention heads are sharded over (the "heads" logical rule)


def _block(seq_len: int, largest: int = 512) -> int:
  b = largest
  while seq_len % b:
    b //= 2
  return b


@functools.lru_cache(maxsize=None)
def _kernel(seq_len: int, n_heads: int, window: Optional[int], interpret: bool):
  """The splash kernel for one (S, H, window): causal (`j <= i`) or local (`i - W < j <= i`)."""
  shape = (seq_len, seq_len)
  if window is None or window >= seq_len:
    one_head = mask_lib.CausalMask(shape)
  else:
    one_head = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  b = _block(seq_len)
  sizes = kernel_lib.BlockSizes(
      block_q=b,
      block_kv=b,
      block_kv_compute=b,
      block_q_dkv=b,
      block_kv_dkv=b,
      block_kv_dkv_compute=b,
      block_q_dq=b,
      block_kv_dq=b,
  )
  with jax.ensure_compile_time_eval():  # its block tables are constants, not tracers of the first caller's trace
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([one_head] * n_heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        interpret=interpret,
    )


def _shard_axes(batch: int, heads: int):
  """(mesh, batch axes, head axis) of the abstract mesh set while tracing: the axes that shard the rows, and "tensor"
  when it splits the heads evenly (the attention projections' layout); empty / None without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return mesh, (), None
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  tensor = mesh.shape[HEAD_AXIS] if HEAD_AXIS in mesh.axis_names else 1
  head_axis = HEAD_AXIS if tensor > 1 and heads % tensor == 0 else None
  return mesh, (axes if axes and batch % size == 0 else ()), head_axis


def self_attention(
    q_BSHD: jnp.ndarray,
    k_BSKD: jnp.ndarray,
    v_BSKD: jnp.ndarray,
    doc_BS: Optional[jnp.ndarray],
    window: Optional[int],
    interpret: bool = False,
) -> jnp.ndarray:
  """`attention.self_attention`'s mask and numbers through the splash kernel; S must be a multiple of 128.
  `interpret`: run the kernel in Pallas interpret mode (anywhere but a TPU)."""
  B, S, H, D = q_BSHD.shape
  if S % MIN_BLOCK:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of {MIN_BLOCK}, got {S}")
  rep = H // k_BSKD.shape[2]
  k = k_BSKD if rep == 1 else jnp.repeat(k_BSKD, rep, axis=2)
  v = v_BSKD if rep == 1 else jnp.repeat(v_BSKD, rep, axis=2)
  scale = jnp.asarray(D**-0.5, q_BSHD.dtype)
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, H, D] <-> [B, H, S, D]
  docs = jnp.zeros((B, S), jnp.int32) if doc_BS is None else doc_BS.astype(jnp.int32)
  # Under a mesh the kernel runs per shard: rows over the batch axes and heads over "tensor", where the projections
  # put them. Heads left whole would make every chip of a tensor group attend (and, as XLA then lays the program
  # out, project q, k and v) for all heads: 1.7x the 7B's global-stack matmuls on v5p:4x4x8 (issue 25).
  mesh, axes, head_axis = _shard_axes(B, H)
  kernel = _kernel(S, H // mesh.shape[head_axis] if head_axis else H, window, interpret)

  def run(q, k, v, docs):
    one = lambda q1, k1, v1, d1: kernel(q1, k1, v1, segment_ids=kernel_lib.SegmentIds(q=d1, kv=d1))
    return jax.vmap(one)(q, k, v, docs)

  args = (to_heads(q_BSHD * scale), to_heads(k), to_heads(v), docs)
  if axes or head_axis:
    rows = axes or None
    per_head = PartitionSpec(rows, head_axis)
    run = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(per_head, per_head, per_head, PartitionSpec(rows)),
        out_specs=per_head,
        check_vma=False,
    )
  return to_heads(run(*args)).astype(v_BSKD.dtype)
