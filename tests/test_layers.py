"""Building blocks against hand-worked values (spec 5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import layers


def test_rmsnorm_hand_case():
  x = jnp.array([[3.0, 4.0]])
  params = {"params": {"scale": jnp.array([1.0, 2.0])}}
  y = layers.RMSNorm(eps=0.0).apply(params, x)
  rms = np.sqrt((9 + 16) / 2)
  np.testing.assert_allclose(y, [[3 / rms, 8 / rms]], rtol=1e-6)


def test_rope_rotates_interleaved_pairs():
  """Dims (2i, 2i+1) form one 2-D vector rotated by pos * theta^(-2i/hd) (Meta layout, not rotate_half)."""
  hd, theta = 4, 100.0
  cos, sin = layers.rope_tables(3, hd, theta)
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, hd).repeat(3, axis=1)
  out = np.asarray(layers.apply_rope(x, cos, sin))[0, :, 0]
  for pos in range(3):
    for i in range(hd // 2):
      angle = pos * theta ** (-2 * i / hd)
      a, b = x[0, 0, 0, 2 * i], x[0, 0, 0, 2 * i + 1]
      np.testing.assert_allclose(out[pos, 2 * i], a * np.cos(angle) - b * np.sin(angle), rtol=1e-5)
      np.testing.assert_allclose(out[pos, 2 * i + 1], a * np.sin(angle) + b * np.cos(angle), rtol=1e-5)


def test_rope_keeps_dtype_and_norm():
  cos, sin = layers.rope_tables(8, 16, 500000.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 3, 16)).astype(jnp.bfloat16)
  y = layers.apply_rope(x, cos, sin)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      jnp.linalg.norm(y.astype(jnp.float32), axis=-1), jnp.linalg.norm(x.astype(jnp.float32), axis=-1), rtol=1e-2
  )


def test_linear_is_x_times_kernel_and_params_are_logically_annotated():
  lin = layers.Linear(3, ("embed", "mlp"), std=0.1)
  boxed = lin.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
  assert boxed["params"]["kernel"].names == ("embed", "mlp")
  kernel = nn.meta.unbox(boxed)["params"]["kernel"]
  assert float(jnp.abs(kernel).max()) <= 0.3 + 1e-6  # truncated at 3 std
  x = jnp.array([[1.0, 2.0]])
  np.testing.assert_allclose(lin.apply({"params": {"kernel": kernel}}, x), x @ kernel, rtol=1e-6)


def test_cross_attention_returns_input_plus_update():
  """CrossAttention returns x + wo(attn) (the residual inside; callers add x again: Q1)."""
  xattn = layers.CrossAttention(dim=8, n_heads=2, std=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))
  kv = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 8))
  nothing = lambda q, k, v: jnp.zeros_like(q)  # fully masked rows give 0
  params = xattn.init(jax.random.PRNGKey(2), x, kv, nothing)
  np.testing.assert_allclose(xattn.apply(params, x, kv, nothing), x, atol=1e-7)


def test_rmsnorm_bf16_normalises_in_float32_and_rounds_once():
  x = (100.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 64))).astype(jnp.bfloat16)
  scale = jax.random.uniform(jax.random.PRNGKey(1), (64,), minval=0.5, maxval=1.5)
  y = layers.RMSNorm(dtype="bfloat16").apply({"params": {"scale": scale}}, x)
  assert y.dtype == jnp.bfloat16
  x32 = np.asarray(x.astype(jnp.float32))
  ref = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5) * np.asarray(scale)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2.0**-8)


def test_bf16_linear_rounds_the_kernel_and_returns_a_float32_kernel_gradient():
  """Forward and input gradient in bf16; the kernel gradient is a float32 sum over the batch (so FSDP reduces it in
  float32), equal to float32 arithmetic on the bf16 operands, not rounded to bf16."""
  lin = layers.Linear(16, ("embed", "mlp"), std=0.5, dtype="bfloat16")
  kernel = nn.meta.unbox(lin.init(jax.random.PRNGKey(0), jnp.ones((1, 32))))["params"]["kernel"]
  x = jax.random.normal(jax.random.PRNGKey(1), (512, 32)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.PRNGKey(2), (512, 16)).astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, k: lin.apply({"params": {"kernel": k}}, x), x, kernel)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      y.astype(jnp.float32),
      x.astype(jnp.float32) @ kernel.astype(jnp.bfloat16).astype(jnp.float32),
      rtol=2.0**-8,
      atol=1e-6,
  )
  dx, dkernel = vjp(g)
  assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
  ref = x.astype(jnp.float32).T @ g.astype(jnp.float32)
  np.testing.assert_allclose(dkernel, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(ref.astype(jnp.bfloat16).astype(jnp.float32) - ref)).max() > 1e-3  # bf16 would fail


def test_batch_sharded_is_a_no_op_without_a_mesh():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  np.testing.assert_array_equal(layers.batch_sharded(x), x)


# ---------------------------------------------------------------------------------------------------------------
# run_blocks and the two param layouts of a stack (blt_jax.layer_stacking).


def _entropy_model(scan_layers: bool, n_layers: int = 3):
  from blt_jax.config import EntropyModelConfig  # pylint: disable=g-import-not-at-top

  return EntropyModelConfig(
      dim=32, n_layers=n_layers, n_heads=2, multiple_of=32, sliding_window=8, max_seqlen=32, scan_layers=scan_layers
  )


def test_stack_layers_round_trip_keeps_values_and_logical_axes():
  from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top
  from blt_jax.entropy_model import init_entropy_model  # pylint: disable=g-import-not-at-top

  boxed = init_entropy_model(jax.random.PRNGKey(0), _entropy_model(False))
  stacked = layer_stacking.stack_layers(boxed)
  assert sorted(stacked) == ["layers", "norm", "output", "tok_embeddings"]
  wq = stacked["layers"]["attention"]["wq"]["kernel"]
  assert wq.names == ("layers", "embed", "heads") and wq.value.shape == (3, 32, 32)
  np.testing.assert_array_equal(wq.value[2], boxed["layers_2"]["attention"]["wq"]["kernel"].value)
  back = layer_stacking.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(boxed)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(boxed)):
    np.testing.assert_array_equal(a, b)
  plain = nn.meta.unbox(boxed)  # unboxed trees (live params, optimizer moments) the same way
  assert jax.tree.structure(layer_stacking.unstack_layers(layer_stacking.stack_layers(plain))) == jax.tree.structure(
      plain
  )
  with np.testing.assert_raises_regex(ValueError, "layers_0 ... layers_1, found layers"):
    layer_stacking.stack_layers({"layers_0": {"w": jnp.ones(2)}, "layers_2": {"w": jnp.ones(2)}})


def test_run_blocks_runs_stacked_and_per_layer_params_alike():
  """One function for both layouts: a scanned stack on stacked params, or on per-layer ones (stacked in the call),
  and the Python loop over per-layer params give the same logits."""
  from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top
  from blt_jax.entropy_model import EntropyModel, init_entropy_model  # pylint: disable=g-import-not-at-top

  params = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(0), _entropy_model(False)))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 4, 260).at[0, 7].set(2)
  loop = EntropyModel(_entropy_model(False)).apply({"params": params}, tokens)
  scan = _entropy_model(True)
  stacked = layer_stacking.stack_params(params, scan)
  np.testing.assert_allclose(EntropyModel(scan).apply({"params": params}, tokens), loop, atol=1e-5)
  np.testing.assert_allclose(EntropyModel(scan).apply({"params": stacked}, tokens), loop, atol=1e-5)
  np.testing.assert_allclose(EntropyModel(_entropy_model(False)).apply({"params": stacked}, tokens), loop, atol=1e-5)
  with np.testing.assert_raises_regex(ValueError, "hold 3 layers; the stack has 4"):
    EntropyModel(_entropy_model(True, n_layers=4)).apply({"params": stacked}, tokens)
