"""Fast attention paths equal dense masked attention; hand-checked masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import attention, masks, patching

# Jitted once per static configuration: far faster on CPU than op-by-op dispatch.
self_attention = jax.jit(attention.self_attention, static_argnums=(4,))
masked_attention = jax.jit(attention.masked_attention)
encoder_cross = jax.jit(attention.encoder_cross_attention, static_argnums=(4, 5, 6))
decoder_cross = jax.jit(attention.decoder_cross_attention, static_argnums=(4, 5))


def _qkv(key, B, S, T, H, D, K=None):
  kq, kk, kv = jax.random.split(key, 3)
  return (
      jax.random.normal(kq, (B, S, H, D)),
      jax.random.normal(kk, (B, T, K or H, D)),
      jax.random.normal(kv, (B, T, K or H, D)),
  )


def test_document_ids_end_at_and_include_eos():
  tokens = jnp.array([[1, 5, 2, 1, 6, 2, 7]])
  np.testing.assert_array_equal(masks.document_ids(tokens), [[0, 0, 0, 1, 1, 1, 2]])


def test_window_mask_hand_case():
  m = masks.dense_self_attention_mask(None, 5, window=2)[0]
  expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(m, expected)


blocked = jax.jit(attention.blocked_self_attention, static_argnums=(4, 5))


@pytest.mark.parametrize(
    "S,window,kv_heads,block,with_docs",
    [(37, 8, 2, 8, True), (50, None, 2, 8, True), (70, None, 4, 16, False), (33, 7, 4, 8, False)],
)
def test_blocked_self_attention_equals_dense(S, window, kv_heads, block, with_docs):
  """Values and gradients, causal or windowed, with documents (segment ids) or without, GQA, ragged last block."""
  q, k, v = _qkv(jax.random.PRNGKey(0), 2, S, S, 4, 8, kv_heads)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, S), 3, 260).at[0, 11].set(2).at[1, 30].set(2)
  doc = masks.document_ids(tokens) if with_docs else None
  fast = blocked(q, k, v, doc, window, block)
  dense = masked_attention(q, k, v, masks.dense_self_attention_mask(doc, S, window))
  np.testing.assert_allclose(fast, dense, atol=1e-5)
  weights = jax.random.normal(jax.random.PRNGKey(2), fast.shape)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  g_fast = jax.jit(
      jax.grad(loss(lambda q, k, v: attention.blocked_self_attention(q, k, v, doc, window, block)), argnums=(0, 1, 2))
  )(q, k, v)
  g_dense = jax.jit(
      jax.grad(
          loss(lambda q, k, v: attention.masked_attention(q, k, v, masks.dense_self_attention_mask(doc, S, window))),
          argnums=(0, 1, 2),
      )
  )(q, k, v)
  for a, b in zip(g_fast, g_dense):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_self_attention_picks_the_blocked_path_for_long_sequences():
  S = 2 * attention.BLOCK + 5
  q, k, v = _qkv(jax.random.PRNGKey(3), 1, S, S, 2, 8)
  hlo = jax.jit(lambda q, k, v: attention.self_attention(q, k, v, None, None)).lower(q, k, v).as_text()
  assert f"{S}x{S}" not in hlo  # no [S, S] score matrix
  np.testing.assert_allclose(
      self_attention(q, k, v, None, None),
      masked_attention(q, k, v, masks.dense_self_attention_mask(None, S, None)),
      atol=1e-5,
  )


def _random_patches(seed, B, N, max_len, P):
  rng = np.random.default_rng(seed)
  starts = jnp.asarray(rng.random((B, N + 1)) < 0.35).at[:, :2].set(True)
  return patching.starts_to_patches(patching.limit_patch_length(starts, max_len), P)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_encoder_cross_attention_equals_dense(window):
  B, N, P, k, H, D = 2, 30, 24, 2, 2, 8
  patches = _random_patches(0, B, N, 5, P)
  ids = patching.patch_ids_from_lengths(patches.patch_lengths_BP, N)
  q, kk, v = _qkv(jax.random.PRNGKey(2), B, P * k, N, H, D)
  fast = encoder_cross(q, kk, v, ids, P, k, window)
  dense = masked_attention(q, kk, v, masks.dense_encoder_cross_mask(ids, P, k, window))
  np.testing.assert_allclose(fast, dense, atol=1e-5)
  # Empty (padding) patches attend nothing and give exactly zero.
  empty = np.asarray(patches.patch_lengths_BP) == 0
  assert empty.any()
  if window is None:
    out = np.asarray(fast).reshape(B, P, k, H, D)
    assert np.all(out[empty] == 0)


@pytest.mark.parametrize("window", [None, 2])
def test_decoder_cross_attention_equals_dense(window):
  B, N, P, k, H, D = 2, 30, 24, 2, 2, 8
  patches = _random_patches(1, B, N, 5, P)
  dec_ids = patching.decoder_patch_ids(patches.patch_lengths_BP, N)
  q, kk, v = _qkv(jax.random.PRNGKey(3), B, N, P * k, H, D)
  fast = decoder_cross(q, kk, v, dec_ids, k, window)
  dense = masked_attention(q, kk, v, masks.dense_decoder_cross_mask(dec_ids, P, k, window))
  np.testing.assert_allclose(fast, dense, atol=1e-5)


def test_cross_attention_gradients_match_dense():
  B, N, P, k, H, D = 1, 20, 12, 2, 2, 4
  patches = _random_patches(2, B, N, 4, P)
  ids = patching.patch_ids_from_lengths(patches.patch_lengths_BP, N)
  q, kk, v = _qkv(jax.random.PRNGKey(4), B, P * k, N, H, D)
  mask = masks.dense_encoder_cross_mask(ids, P, k)
  g_fast = jax.jit(jax.grad(lambda *a: jnp.sum(attention.encoder_cross_attention(*a, ids, P, k) ** 2), (0, 1, 2)))(
      q, kk, v
  )
  g_dense = jax.jit(jax.grad(lambda *a: jnp.sum(attention.masked_attention(*a, mask) ** 2), (0, 1, 2)))(q, kk, v)
  for a, b in zip(g_fast, g_dense):
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.isfinite(a).all()


def test_cross_attention_cost_is_linear_in_bytes():
  """No [P*k, N] score tensor: the largest intermediate grows linearly with N."""

  def largest_intermediate(N):
    P, slots, H, D = N // 2, 2, 2, 8
    ids = jnp.minimum(jnp.arange(N)[None] // 2, P - 1)
    q, kk, v = _qkv(jax.random.PRNGKey(0), 1, P * slots, N, H, D)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.encoder_cross_attention(q, k, v, ids, P, slots))(q, kk, v)
    return max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)

  assert largest_intermediate(2048) <= 2.1 * largest_intermediate(1024)


def _bf16_qkv(key, B, S, T, H, D):
  """bf16 q, k (small scores) and values around 1 (a running sum of them grows: where bf16 loses bits)."""
  q, k, v = _qkv(key, B, S, T, H, D)
  return (0.1 * q).astype(jnp.bfloat16), (0.1 * k).astype(jnp.bfloat16), (1.0 + 0.5 * v).astype(jnp.bfloat16)


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


def test_encoder_cross_attention_sums_a_long_patch_in_float32():
  """bf16 inputs, one 1023-byte patch: the numerator is a segment sum over its bytes. Summed in bf16 it stalls
  (the output was off by up to 47% before this test was written); summed in float32 the bf16 output is the float32
  result rounded once (<= 2^-8 relative)."""
  B, N, P, k, H, D = 1, 1024, 2, 2, 2, 8
  ids = jnp.ones((B, N), jnp.int32).at[:, 0].set(0)
  q, kk, v = _bf16_qkv(jax.random.PRNGKey(5), B, P * k, N, H, D)
  out = encoder_cross(q, kk, v, ids, P, k, None)
  assert out.dtype == jnp.bfloat16
  ref = encoder_cross(*_f32(q, kk, v), ids, P, k, None)
  rel = np.abs(np.asarray(out.astype(jnp.float32) - ref)) / np.abs(np.asarray(ref))
  assert rel.max() <= 2.0**-8, rel.max()


def test_bf16_self_and_decoder_cross_attention_stay_within_bf16_rounding():
  """The other kernels in bf16: softmax in float32, probs x values a dot (float32 accumulation). The output differs
  from float32 attention on the same inputs only by the rounding of the probs and of the result: a bf16 ulp or two
  of values ~1-3."""
  B, N, P, k, H, D = 1, 600, 40, 2, 2, 8
  q, kk, v = _bf16_qkv(jax.random.PRNGKey(6), B, N, N, H, D)
  out = self_attention(q, kk, v, None, 256)  # blocked path: 600 > 2 * 256
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      out.astype(jnp.float32), self_attention(*_f32(q, kk, v), None, 256), rtol=2.0**-7, atol=2.0**-7
  )
  dec_ids = jnp.minimum(jnp.arange(N)[None] // 16, P - 1)
  q, kk, v = _bf16_qkv(jax.random.PRNGKey(7), B, N, P * k, H, D)
  out = decoder_cross(q, kk, v, dec_ids, k, None)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      out.astype(jnp.float32), decoder_cross(*_f32(q, kk, v), dec_ids, k, None), rtol=2.0**-7, atol=2.0**-7
  )
