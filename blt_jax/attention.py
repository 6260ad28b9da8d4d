"""Attention kernels as plain functions of q, k, v and ids (no parameters).

Shapes: q `[B, S, H, D]`, k/v `[B, T, Hkv, D]`. Scores, softmax statistics and the sums over keys run in float32
whatever the q/k/v dtype (probs x values are dots, which XLA accumulates in float32; the encoder's segment sums are
done in float32 explicitly), and the output is rounded once to v's dtype. Rows with no allowed key give 0 (spec 5.6,
20). Three access patterns, each costing what its mask allows rather than a dense S x T matrix:

* `self_attention`: causal with an optional window and document split. From two blocks of 128 on, an online
  softmax over key blocks that skips the blocks the causal/window mask rules out (cost ~S * min(S, W), memory
  linear in S); on TPU the Pallas splash kernel, on GPU cuDNN where its masks suffice; below that one dense mask.
* `encoder_cross_attention`: patch slots attend the bytes of their own patch. Computed per byte as a segment
  softmax over patch ids (cost N * k * w), never as a [P*k, N] matrix.
* `decoder_cross_attention`: each byte attends the k slots of one patch (w patches with a window): a gather.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from blt_jax import masks, splash
from blt_jax.config import ATTENTION_IMPLS


def _repeat_kv(x_BTKD: jnp.ndarray, n_heads: int) -> jnp.ndarray:
  """GQA: each kv head serves `H / Hkv` consecutive query heads (spec 5.2)."""
  rep = n_heads // x_BTKD.shape[2]
  return x_BTKD if rep == 1 else jnp.repeat(x_BTKD, rep, axis=2)


def _softmax_rows(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Softmax over the last axis in float32; rows with no allowed key become all-zero instead of NaN."""
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def masked_attention(
    q_BSHD: jnp.ndarray, k_BTKD: jnp.ndarray, v_BTKD: jnp.ndarray, mask_BST: jnp.ndarray
) -> jnp.ndarray:
  """Plain attention with a boolean [B or 1, S, T] mask shared by all heads."""
  H, D = q_BSHD.shape[2], q_BSHD.shape[3]
  k, v = _repeat_kv(k_BTKD, H), _repeat_kv(v_BTKD, H)
  scores = jnp.einsum("bshd,bthd->bhst", q_BSHD, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
  probs = _softmax_rows(scores, mask_BST[:, None])
  return jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v)


BLOCK = 128  # query/key block of the blocked path; sequences shorter than 2 blocks use the dense mask
# Self-attention implementations (a stack's `attention_impl`). "auto": the Pallas splash kernel on TPU, cuDNN on GPU
# when no document split is asked for (its masks have no segment ids), else dense below 2 blocks and blocked above.
IMPLS = ATTENTION_IMPLS


def target_platform() -> str:
  """The platform being compiled for: the mesh set while tracing (an ahead-of-time compile for a TPU topology on a
  CPU host says "tpu"), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def choose_impl(impl: str, seq_len: int, has_documents: bool, block: int = BLOCK) -> str:
  """The implementation `self_attention` runs for `impl` on the default backend."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = target_platform()
  if backend == "tpu" and seq_len % splash.MIN_BLOCK == 0:
    return "splash"
  if backend == "gpu" and not has_documents:
    return "cudnn"
  return "dense" if seq_len < 2 * block else "blocked"


def self_attention(
    q_BSHD: jnp.ndarray,
    k_BSKD: jnp.ndarray,
    v_BSKD: jnp.ndarray,
    doc_BS: Optional[jnp.ndarray],
    window: Optional[int],
    block: int = BLOCK,
    impl: str = "auto",
) -> jnp.ndarray:
  """Causal self-attention, windowed (`i - W < j <= i`) and split at documents when given.

  Every implementation computes the mask of `masks.self_attention_mask`: dense (one masked softmax), blocked
  (`blocked_self_attention`: online softmax over key blocks, skipping blocks the causal/window mask rules out; memory
  linear in S, no [S, S] matrix), splash (`splash.self_attention`: the Pallas TPU kernel with segment ids for
  documents), cudnn (`jax.nn.dot_product_attention`, only without documents).
  """
  S = q_BSHD.shape[1]
  chosen = choose_impl(impl, S, doc_BS is not None, block)
  if chosen == "dense":
    return masked_attention(q_BSHD, k_BSKD, v_BSKD, masks.dense_self_attention_mask(doc_BS, S, window))
  if chosen == "splash":
    return splash.self_attention(q_BSHD, k_BSKD, v_BSKD, doc_BS, window, interpret=target_platform() != "tpu")
  if chosen == "cudnn":
    if doc_BS is not None:
      raise ValueError(
          "attention_impl='cudnn' cannot split attention at documents (no segment ids in cuDNN's "
          "masks); use 'auto', 'blocked' or set document_mask=False"
      )
    return cudnn_self_attention(q_BSHD, k_BSKD, v_BSKD, window)
  return blocked_self_attention(q_BSHD, k_BSKD, v_BSKD, doc_BS, window, block)


def cudnn_self_attention(q_BSHD, k_BSKD, v_BSKD, window, implementation: Optional[str] = "cudnn"):
  """Causal (optionally windowed) attention through `jax.nn.dot_product_attention`; `implementation="xla"` runs
  the same call anywhere (the tests' CPU check of the arguments)."""
  H = q_BSHD.shape[2]
  k, v = _repeat_kv(k_BSKD, H), _repeat_kv(v_BSKD, H)
  local = None if window is None else (window - 1, 0)  # keys i-W < j <= i
  return jax.nn.dot_product_attention(
      q_BSHD, k, v, is_causal=True, local_window_size=local, implementation=implementation
  )


def blocked_self_attention(q_BSHD, k_BSKD, v_BSKD, doc_BS, window, block: int = BLOCK):
  """Flash-style attention in plain jnp: for each query block, an online softmax over the key blocks its mask can
  reach (`lax.cond` skips the others: those above the diagonal and, with a window, those too far back).

  q, k and v are laid out once as `[blocks, B, H, block, D]`, so each block's two matmuls are plain batched dots
  over (B, H) with no per-block transposes (on CPU those copies cost a third of the time). The inner step is
  rematerialised in the backward pass, so gradients keep only running statistics per block. Every mask comes from
  `masks.self_attention_mask` (the one definition the dense path uses too).
  """
  B, S, H, D = q_BSHD.shape
  n = -(-S // block)
  pad = n * block - S

  def blocks_of(x_BSHD):  # [B, S, H, D] -> [n, B, H, block, D]
    x = jnp.pad(x_BSHD, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(B, n, block, H, D)
    return jnp.transpose(x, (1, 0, 3, 2, 4))

  q = blocks_of(q_BSHD)
  k = blocks_of(_repeat_kv(k_BSKD, H))
  v = blocks_of(_repeat_kv(v_BSKD, H))
  doc = None if doc_BS is None else jnp.moveaxis(jnp.pad(doc_BS, [(0, 0), (0, pad)]).reshape(B, n, block), 1, 0)
  scale = 1.0 / jnp.sqrt(jnp.float32(D))
  offsets = jnp.arange(block)

  def query_block(_, i):
    q_i = q[i]  # [B, H, bq, D]
    q_pos = (i * block + offsets)[None, :, None]  # [1, bq, 1]
    q_doc = None if doc is None else doc[i][:, :, None]

    @jax.checkpoint
    def key_block(carry, j):
      def visit(carry):
        m, l, acc = carry  # [B, H, bq], [B, H, bq], [B, H, bq, D]
        k_pos = (j * block + offsets)[None, None, :]
        k_doc = None if doc is None else doc[j][:, None, :]
        mask = masks.self_attention_mask(q_pos, k_pos, q_doc, k_doc, window) & (k_pos < S)  # [B|1, bq, bk]
        s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k[j], preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

      first = 0 if window is None else jnp.maximum(0, (i * block - window + 1) // block)
      return jax.lax.cond((j <= i) & (j >= first), visit, lambda c: c, carry), None

    # A finite start for the running max: fully masked rows keep p = 0 and end with l = 0 (output 0, as dense).
    init = (
        jnp.full((B, H, block), -1e30, jnp.float32),
        jnp.zeros((B, H, block), jnp.float32),
        jnp.zeros((B, H, block, D), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(n))
    return None, (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(v.dtype)

  _, out = jax.lax.scan(query_block, None, jnp.arange(n))  # [n, B, H, bq, D]
  return jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(B, n * block, H, D)[:, :S]


def _segment_reduce(op, data_BN, ids_BN, num_segments: int):
  """Per-row segment reduction over axis 1 (ids outside [0, num_segments) are dropped)."""
  return jax.vmap(lambda d, i: op(d, i, num_segments=num_segments))(data_BN, ids_BN)


def encoder_cross_attention(
    q_BQHD: jnp.ndarray,
    k_BNHD: jnp.ndarray,
    v_BNHD: jnp.ndarray,
    patch_ids_BN: jnp.ndarray,
    num_patches: int,
    slots: int,
    window: Optional[int] = None,
) -> jnp.ndarray:
  """Patch slots (`Q = P * slots`) attend the bytes of their patch (or of the `window` patches ending there).

  Each byte scores only the slots that may see it, then a segment softmax per (patch, slot, head) normalises over
  the bytes of the patch; equal to `masked_attention` with `masks.dense_encoder_cross_mask`.
  """
  B, N, H, D = k_BNHD.shape
  P = num_patches
  q_BPRHD = q_BQHD.reshape(B, P, slots, H, D)
  offsets = range(window or 1)
  seg_ids, scores = [], []
  for o in offsets:  # byte j feeds patches pid(j) + o for o < w (spec 6.1 encoder window)
    ids = patch_ids_BN + o
    q_sel = jnp.take_along_axis(q_BPRHD, jnp.clip(ids, 0, P - 1)[:, :, None, None, None], axis=1)  # [B,N,R,H,D]
    s = jnp.einsum("bnrhd,bnhd->bnrh", q_sel, k_BNHD, preferred_element_type=jnp.float32)
    seg_ids.append(jnp.where(ids < P, ids, P))  # P is out of range: dropped by the segment ops
    scores.append(s / jnp.sqrt(jnp.float32(D)))
  seg = jnp.concatenate(seg_ids, axis=1)
  s = jnp.concatenate(scores, axis=1)  # [B, N*w, R, H]
  v = jnp.concatenate([v_BNHD] * len(offsets), axis=1)
  seg_max = _segment_reduce(jax.ops.segment_max, s, seg, P)  # [B, P, R, H]; -inf for empty patches
  seg_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(seg_max), seg_max, 0.0))
  e = jnp.exp(s - jnp.take_along_axis(seg_max, jnp.clip(seg, 0, P - 1)[:, :, None, None], axis=1))
  denom = _segment_reduce(jax.ops.segment_sum, e, seg, P)  # [B, P, R, H]
  # The numerator is a scatter-add over the patch's bytes, not a dot: summed in bf16 it would round at every
  # byte, so it is formed and summed in float32 like the denominator and rounded once at the end.
  weighted = e[..., None] * v[:, :, None, :, :].astype(jnp.float32)  # [B, N*w, R, H, D]
  num = _segment_reduce(jax.ops.segment_sum, weighted, seg, P)  # [B, P, R, H, D]
  out = num / jnp.where(denom > 0, denom, 1.0)[..., None]
  return out.reshape(B, P * slots, H, D).astype(v_BNHD.dtype)


def decoder_cross_attention(
    q_BNHD: jnp.ndarray,
    k_BQHD: jnp.ndarray,
    v_BQHD: jnp.ndarray,
    decoder_patch_ids_BN: jnp.ndarray,
    slots: int,
    window: Optional[int] = None,
) -> jnp.ndarray:
  """Each byte attends the `slots` slots of patch dpid(i) (of patches dpid(i)-w+1 .. dpid(i) with a window)."""
  B, N, H, D = q_BNHD.shape
  P = k_BQHD.shape[1] // slots
  k_BPRHD = k_BQHD.reshape(B, P, slots, H, D)
  v_BPRHD = v_BQHD.reshape(B, P, slots, H, D)
  w = window or 1
  patches_BNW = decoder_patch_ids_BN[:, :, None] - jnp.arange(w)[None, None, :]  # spec 6.1 decoder window
  valid_BNW = (patches_BNW >= 0) & (patches_BNW < P)
  idx = jnp.clip(patches_BNW, 0, P - 1).reshape(B, N * w)
  k_sel = jnp.take_along_axis(k_BPRHD, idx[:, :, None, None, None], axis=1).reshape(B, N, w * slots, H, D)
  v_sel = jnp.take_along_axis(v_BPRHD, idx[:, :, None, None, None], axis=1).reshape(B, N, w * slots, H, D)
  scores = jnp.einsum("bnhd,bnkhd->bnhk", q_BNHD, k_sel, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
  mask = jnp.repeat(valid_BNW, slots, axis=-1)[:, :, None, :]  # [B, N, 1, w*slots]
  probs = _softmax_rows(scores, mask)
  return jnp.einsum("bnhk,bnkhd->bnhd", probs.astype(v_sel.dtype), v_sel)
