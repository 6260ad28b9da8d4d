"""The Pallas splash path (interpret mode on CPU) computes the dense mask's attention, values and gradients; under a
mesh it runs per batch shard; compiled for a real TPU target it lowers to the Mosaic kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blt_jax import attention, masks, splash

B, S, H, K, D = 2, 256, 4, 2, 64


def _inputs():
  q = jax.random.normal(jax.random.PRNGKey(0), (B, S, H, D))
  k = jax.random.normal(jax.random.PRNGKey(1), (B, S, K, D))  # GQA: 2 query heads per kv head
  v = jax.random.normal(jax.random.PRNGKey(2), (B, S, K, D))
  tokens = jnp.zeros((B, S), jnp.int32).at[0, 100].set(2).at[1, 30].set(2).at[1, 200].set(2)  # EOS: documents
  return q, k, v, masks.document_ids(tokens)


@pytest.mark.parametrize("window,documents", [(None, True), (64, True), (200, False)])
def test_splash_equals_dense_values_and_gradients(window, documents):
  q, k, v, doc = _inputs()
  doc = doc if documents else None
  run = lambda impl: jax.jit(
      jax.value_and_grad(
          lambda q, k, v: jnp.sum(jnp.sin(attention.self_attention(q, k, v, doc, window, impl=impl))), (0, 1, 2)
      )
  )
  (value, grads), (ref_value, ref_grads) = run("splash")(q, k, v), run("dense")(q, k, v)
  out = attention.self_attention(q, k, v, doc, window, impl="splash")
  ref = attention.self_attention(q, k, v, doc, window, impl="dense")
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-5)


def test_splash_under_a_mesh_runs_per_batch_shard():
  """With the batch sharded over a mesh set while tracing, the kernel is shard-mapped and gives the same numbers."""
  q, k, v, doc = _inputs()
  mesh = Mesh(
      np.asarray(jax.devices()[:2]).reshape(2, 1, 1),
      ("data", "fsdp", "tensor"),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )
  rows = NamedSharding(mesh, PartitionSpec("data"))

  def fn(q, k, v, doc):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return attention.self_attention(q, k, v, doc, 64, impl="splash")

  lowered = jax.jit(fn, in_shardings=(rows,) * 4, out_shardings=rows).lower(q, k, v, doc)
  assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text().lower()
  out = jax.jit(fn, in_shardings=(rows,) * 4, out_shardings=rows)(q, k, v, doc)
  np.testing.assert_allclose(out, attention.self_attention(q, k, v, doc, 64, impl="dense"), atol=1e-5)


def test_splash_under_a_tensor_axis_runs_per_head_shard(monkeypatch):
  """With a "tensor" axis the kernel also splits the heads, as the projections lay them out: each shard's kernel
  is built for H / tensor heads (all H on every chip of a tensor group made the 7B's v5p step run 1.7x its global
  matmuls), and the numbers are the dense ones."""
  q, k, v, doc = _inputs()
  mesh = Mesh(
      np.asarray(jax.devices()[:4]).reshape(2, 1, 2),
      ("data", "fsdp", "tensor"),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )
  built = []
  real = splash._kernel
  monkeypatch.setattr(splash, "_kernel", lambda S, n_heads, *a: built.append(n_heads) or real(S, n_heads, *a))
  rows = NamedSharding(mesh, PartitionSpec("data"))
  heads = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))

  def fn(q, k, v, doc):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return attention.self_attention(q, k, v, doc, 64, impl="splash")

  out = jax.jit(fn, in_shardings=(heads, heads, heads, rows), out_shardings=heads)(q, k, v, doc)
  assert built == [q.shape[2] // 2]
  np.testing.assert_allclose(out, attention.self_attention(q, k, v, doc, 64, impl="dense"), atol=1e-5)


def test_splash_rejects_lengths_off_its_blocks():
  q, k, v, doc = _inputs()
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.self_attention(q[:, :200], k[:, :200], v[:, :200], doc[:, :200], None, interpret=True)


def test_auto_picks_splash_when_compiling_for_a_tpu_and_it_lowers_to_mosaic():
  """An ahead-of-time compile for a TPU topology on this CPU host traces with the TPU mesh set: "auto" must pick the
  splash kernel (not the interpreter), and the program must hold the Mosaic custom call."""
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"libtpu cannot describe a TPU topology here: {e}")
  mesh = Mesh(
      np.asarray(devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  rows = NamedSharding(mesh, PartitionSpec("data"))
  shapes = [jax.ShapeDtypeStruct((8, S, H, D), jnp.bfloat16, sharding=rows)]
  shapes += [jax.ShapeDtypeStruct((8, S, K, D), jnp.bfloat16, sharding=rows)] * 2
  shapes += [jax.ShapeDtypeStruct((8, S), jnp.int32, sharding=rows)]
  chosen = []

  def fn(q, k, v, doc):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      chosen.append(attention.choose_impl("auto", S, True))
      return attention.self_attention(q, k, v, doc, 128)

  lowered = jax.jit(fn).lower(*shapes)
  assert chosen == ["splash"]
  assert "tpu_custom_call" in lowered.as_text()
  lowered.compile()  # Mosaic compiles for the v5e target


def test_auto_on_this_cpu_is_dense_then_blocked_and_cudnn_needs_no_documents():
  assert attention.choose_impl("auto", 255, True) == "dense"
  assert attention.choose_impl("auto", 256, True) == "blocked"
  q, k, v, doc = _inputs()
  with pytest.raises(ValueError, match="cannot split attention at documents"):
    attention.self_attention(q, k, v, doc, None, impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.choose_impl("flash", 256, False)
  # The cuDNN call's arguments (causal, window as (W-1, 0)) give the dense mask's numbers through XLA's path.
  out = attention.cudnn_self_attention(q, k, v, 64, implementation="xla")
  np.testing.assert_allclose(out, attention.self_attention(q, k, v, None, 64, impl="dense"), atol=1e-5)
