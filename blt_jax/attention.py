"""Attention kernels as plain functions of q, k, v and ids (no parameters).

Shapes: q `[B, S, H, D]`, k/v `[B, T, Hkv, D]`. Scores, softmax statistics and the sums over keys run in float32
whatever the q/k/v dtype (probs x values are dots, which XLA accumulates in float32; the encoder's segment sums are
done in float32 explicitly), and the output is rounded once to v's dtype. Rows with no allowed key give 0 (spec 5.6,
20). Three access patterns, each costing what its mask allows rather than a dense S x T matrix:

* `self_attention`: causal with an optional window and document split. Sequences longer than twice the window are
  processed in query blocks of `window` rows against the previous and current key blocks (cost S * 2W).
* `encoder_cross_attention`: patch slots attend the bytes of their own patch. Computed per byte as a segment
  softmax over patch ids (cost N * k * w), never as a [P*k, N] matrix.
* `decoder_cross_attention`: each byte attends the k slots of one patch (w patches with a window): a gather.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from blt_jax import masks


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


def masked_attention(q_BSHD: jnp.ndarray, k_BTKD: jnp.ndarray, v_BTKD: jnp.ndarray,
                     mask_BST: jnp.ndarray) -> jnp.ndarray:
  """Plain attention with a boolean [B or 1, S, T] mask shared by all heads."""
  H, D = q_BSHD.shape[2], q_BSHD.shape[3]
  k, v = _repeat_kv(k_BTKD, H), _repeat_kv(v_BTKD, H)
  scores = jnp.einsum("bshd,bthd->bhst", q_BSHD, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
  probs = _softmax_rows(scores, mask_BST[:, None])
  return jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v)


def self_attention(q_BSHD: jnp.ndarray, k_BSKD: jnp.ndarray, v_BSKD: jnp.ndarray, doc_BS: Optional[jnp.ndarray],
                   window: Optional[int]) -> jnp.ndarray:
  """Causal self-attention, windowed (`i - W < j <= i`) and split at documents when given."""
  S = q_BSHD.shape[1]
  if window is None or S <= 2 * window:
    return masked_attention(q_BSHD, k_BSKD, v_BSKD, masks.dense_self_attention_mask(doc_BS, S, window))
  return _blocked_window_attention(q_BSHD, k_BSKD, v_BSKD, doc_BS, window)


def _blocked_window_attention(q_BSHD, k_BSKD, v_BSKD, doc_BS, window):
  """Sliding-window attention in blocks of `window` queries against 2*window keys."""
  B, S, H, D = q_BSHD.shape
  C = window
  nb = -(-S // C)
  pad = nb * C - S
  pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  q = pad_seq(q_BSHD).reshape(B, nb, C, H, D)
  k = _repeat_kv(pad_seq(k_BSKD), H).reshape(B, nb, C, H, D)
  v = _repeat_kv(pad_seq(v_BSKD), H).reshape(B, nb, C, H, D)
  with_prev = lambda x: jnp.concatenate([jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1], x], axis=2)
  k2, v2 = with_prev(k), with_prev(v)  # [B, nb, 2C, H, D]: previous block then current block
  q_pos = (jnp.arange(nb)[:, None] * C + jnp.arange(C)[None, :])[None, :, :, None]  # [1, nb, C, 1]
  k_pos = (jnp.arange(nb)[:, None] * C - C + jnp.arange(2 * C)[None, :])[None, :, None, :]  # [1, nb, 1, 2C]
  if doc_BS is None:
    q_doc = k_doc = None
  else:
    doc = pad_seq(doc_BS).reshape(B, nb, C)
    q_doc = doc[:, :, :, None]
    k_doc = with_prev(doc)[:, :, None, :]
  mask = masks.self_attention_mask(q_pos, k_pos, q_doc, k_doc, window) & (k_pos >= 0)  # [B|1, nb, C, 2C]
  scores = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k2, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
  probs = _softmax_rows(scores, mask[:, :, None])
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs.astype(v2.dtype), v2)
  return out.reshape(B, nb * C, H, D)[:, :S]


def _segment_reduce(op, data_BN, ids_BN, num_segments: int):
  """Per-row segment reduction over axis 1 (ids outside [0, num_segments) are dropped)."""
  return jax.vmap(lambda d, i: op(d, i, num_segments=num_segments))(data_BN, ids_BN)


def encoder_cross_attention(q_BQHD: jnp.ndarray, k_BNHD: jnp.ndarray, v_BNHD: jnp.ndarray, patch_ids_BN: jnp.ndarray,
                            num_patches: int, slots: int, window: Optional[int] = None) -> jnp.ndarray:
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


def decoder_cross_attention(q_BNHD: jnp.ndarray, k_BQHD: jnp.ndarray, v_BQHD: jnp.ndarray,
                            decoder_patch_ids_BN: jnp.ndarray, slots: int,
                            window: Optional[int] = None) -> jnp.ndarray:
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
