"""Mesh construction, logical rules, sharded init and batch sharding on 8 emulated CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from blt_jax import sharding


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor}))


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_mesh_shapes(sizes):
  mesh = _mesh(*sizes)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == sizes
  assert mesh.devices.size == 8 and len({d.id for d in mesh.devices.flat}) == 8


def test_mesh_axis_types_are_auto():
  mesh = _mesh(2, 2, 2)
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    assert tuple(mesh.axis_types) == (axis_type.Auto,) * 3


@pytest.mark.parametrize("sizes,expected", [((-1, 1, 1), (8, 1, 1)), ((1, -1, 2), (1, 4, 2)), ((2, 2, -1), (2, 2, 2))])
def test_mesh_fill(sizes, expected):
  assert tuple(_mesh(*sizes).shape.values()) == expected


def test_mesh_missing_fields_default_to_one():
  mesh = sharding.make_mesh({"fsdp": -1})
  assert tuple(mesh.shape.values()) == (1, 8, 1)


def test_mesh_subset_of_devices():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
  assert mesh.devices.size == 4


@pytest.mark.parametrize(
    "sizes,match",
    [
        ((2, 2, 1), r"product 4 must equal the number of devices \(8\)"),
        ((3, -1, 1), r"multiply to 3, which does not divide the 8 available devices"),
        ((-1, -1, 1), r"at most one axis may be -1"),
        ((0, 8, 1), r"must be positive"),
    ],
)
def test_mesh_bad_sizes(sizes, match):
  with pytest.raises(ValueError, match=match):
    _mesh(*sizes)


def test_rules_from_config_and_validation():
  cfg = ml_collections.ConfigDict(
      {
          "logical_axis_rules": [
              ["embed", ["fsdp"]],
              ["mlp", "tensor"],
              ["vocab", None],
              ["hash_vocab", ["fsdp", "tensor"]],
          ]
      }
  )
  rules = sharding.logical_axis_rules_from_config(cfg)
  assert rules == (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", None), ("hash_vocab", ("fsdp", "tensor")))
  assert sharding.logical_axis_rules_from_config({}) == sharding.default_logical_axis_rules()
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    sharding.parse_logical_axis_rules([["mlp", "model"]])
  with pytest.raises(ValueError, match="expected a pair"):
    sharding.parse_logical_axis_rules([["mlp"]])
  # The defaults only name real mesh axes.
  sharding.parse_logical_axis_rules(sharding.default_logical_axis_rules())


def test_fit_spec_to_shape():
  mesh = _mesh(2, 2, 2)
  assert sharding.fit_spec_to_shape(P("fsdp", "tensor"), (8, 6), mesh) == P("fsdp", "tensor")
  # vocab 261 cannot take tensor=2 and no other dim is free: replicated.
  assert sharding.fit_spec_to_shape(P("tensor", "fsdp"), (261, 8), mesh) == P(None, "fsdp")
  assert sharding.fit_spec_to_shape(P("tensor", "fsdp"), (261, 8), mesh, relocate=False) == P(None, "fsdp")
  # Keeps the dividing prefix, moves the rest to the largest free dim.
  assert sharding.fit_spec_to_shape(P(None, ("fsdp", "tensor"), None), (3, 10, 8), mesh) == P(None, "fsdp", "tensor")
  assert sharding.fit_spec_to_shape(P(None, ("fsdp", "tensor"), None), (3, 9, 8), mesh) == P(
      None, None, ("fsdp", "tensor")
  )
  assert sharding.fit_spec_to_shape(P(None, ("fsdp", "tensor"), None), (3, 9, 8), mesh, relocate=False) == P(
      None, None, None
  )
  # Short specs are padded; size-1 axes always fit.
  assert sharding.fit_spec_to_shape(P("data"), (4, 3), mesh) == P("data", None)
  assert sharding.fit_spec_to_shape(P("tensor"), (7,), _mesh(8, 1, 1)) == P("tensor")


class _Toy(nn.Module):
  """Dense-like kernels, a hash-like fused table and a norm, logically partitioned like the BLT."""

  vocab: int = 16
  hash_vocab: int = 32
  embed: int = 8
  mlp: int = 16
  random_init: bool = True  # False: constant init, far cheaper to compile for tests that only check layouts

  @nn.compact
  def __call__(self, ids):
    init = nn.initializers.normal(0.02) if self.random_init else nn.initializers.constant(0.01)
    tok = self.param("tok", nn.with_logical_partitioning(init, ("vocab", "embed")), (self.vocab, self.embed))
    hashes = self.param(
        "hash",
        nn.with_logical_partitioning(init, ("hash_tables", "hash_vocab", "embed")),
        (3, self.hash_vocab, self.embed),
    )
    w1 = self.param("w1", nn.with_logical_partitioning(init, ("embed", "mlp")), (self.embed, self.mlp))
    w2 = self.param("w2", nn.with_logical_partitioning(init, ("mlp", "embed")), (self.mlp, self.embed))
    scale = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (self.embed,))
    h = jnp.take(tok, ids, axis=0) + jnp.take(hashes[0], ids % self.hash_vocab, axis=0)
    h = h + jax.nn.silu(h @ w1) @ w2
    return (h * scale) @ tok.T


EXPECTED_222 = {
    "tok": P(None, "fsdp"),
    "hash": P(None, ("fsdp", "tensor"), None),
    "w1": P("fsdp", "tensor"),
    "w2": P("tensor", "fsdp"),
    "norm": P(None),
}
IDS = np.zeros((2, 4), np.int32)


def _spec(x):
  return sharding.fit_spec_to_shape(x.sharding.spec, x.shape, x.sharding.mesh)  # normalise trailing Nones


@pytest.fixture(scope="module")
def toy_state():
  """A (params, adamw state, step) train state initialised sharded on the (2, 2, 2) mesh (one compile)."""
  mesh = _mesh(2, 2, 2)
  model, tx = _Toy(), optax.adamw(1e-3)

  def init_state(rng):
    params = model.init(rng, IDS)["params"]
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  state, shardings = sharding.init_sharded(
      init_state, jax.random.key(0), mesh=mesh, rules=sharding.default_logical_axis_rules()
  )
  return mesh, model, state, shardings


def test_init_sharded_follows_rules(toy_state):
  _, _, state, shardings = toy_state
  params = state["params"]
  for name, want in EXPECTED_222.items():
    assert _spec(params[name]) == want, name
    assert shardings["params"][name].spec == want, name
    assert not isinstance(params[name], nn.meta.AxisMetadata)
  # Really split: shards are smaller than the array wherever a mesh axis of size > 1 applies.
  assert params["hash"].addressable_shards[0].data.shape == (3, 8, 8)
  assert params["w1"].addressable_shards[0].data.shape == (4, 8)
  assert params["tok"].addressable_shards[0].data.shape == (16, 4)
  assert params["norm"].addressable_shards[0].data.shape == (8,)
  assert 0.01 < float(jnp.std(params["hash"])) < 0.03
  # Optimizer moments follow their params; plain leaves are replicated.
  for name, want in EXPECTED_222.items():
    assert _spec(state["opt"][0].mu[name]) == want, name
  assert state["step"].sharding.spec == P()
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(shardings)
  # Restore targets for checkpoints.
  abstract = sharding.abstract_with_shardings(state, shardings)
  assert abstract["params"]["hash"] == jax.ShapeDtypeStruct(
      (3, 32, 8), jnp.float32, sharding=shardings["params"]["hash"]
  )


def test_rules_naming_unknown_mesh_axes_are_rejected(toy_state):
  mesh, _, state, _ = toy_state
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.logical_to_shardings(state["params"], mesh, [("embed", "model")])


def test_init_sharded_non_divisible_falls_back():
  mesh = _mesh(1, 4, 2)
  # hash rows 10: fsdp=4 does not divide, tensor=2 does; fsdp moves to the embed dim (8).
  model = _Toy(vocab=13, hash_vocab=10, embed=8, mlp=6, random_init=False)
  params, _ = sharding.init_sharded(lambda rng: model.init(rng, IDS)["params"], jax.random.key(0), mesh=mesh)
  assert _spec(params["hash"]) == P(None, "tensor", "fsdp")
  assert params["hash"].addressable_shards[0].data.shape == (3, 5, 2)
  assert _spec(params["w1"]) == P("fsdp", "tensor")
  assert _spec(params["tok"]) == P(None, "fsdp")
  # Layout only (no compile): mlp 12 on tensor=8 is replicated (the size-1 fsdp axis always fits).
  model = _Toy(vocab=13, hash_vocab=12, embed=6, mlp=12)
  abstract = jax.eval_shape(lambda rng: model.init(rng, IDS)["params"], jax.random.key(0))
  shardings = sharding.logical_to_shardings(abstract, _mesh(1, 1, 8))
  assert shardings["w1"].spec == P("fsdp", None)
  assert shardings["hash"].spec == P(None, "fsdp", None)


def test_jitted_step_with_shardings_and_donation(toy_state):
  mesh, model, state, shardings = toy_state
  params = jax.tree_util.tree_map(jnp.copy, state["params"])  # the fixture's arrays must survive donation
  param_shardings = shardings["params"]
  batch = sharding.host_local_batch_to_global({"ids": np.arange(32, dtype=np.int32).reshape(8, 4) % 16}, mesh)
  assert batch["ids"].sharding.spec == P(("data", "fsdp"))
  assert batch["ids"].addressable_shards[0].data.shape == (2, 4)

  def step(p, b):
    def loss_fn(p):
      logits = model.apply({"params": p}, b["ids"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, b["ids"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(p)
    return jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, grads), loss

  jitted = jax.jit(
      step,
      in_shardings=(param_shardings, sharding.data_sharding(mesh)),
      out_shardings=(param_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  with sharding.axis_rules_context():
    new_params, loss0 = jitted(params, batch)
    new_params, loss1 = jitted(new_params, batch)
  assert float(loss1) < float(loss0)
  for name, want in EXPECTED_222.items():
    assert _spec(new_params[name]) == want


def test_host_local_batch_errors():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(ValueError, match=r"global batch 6 .* not divisible by the 4 data shards"):
    sharding.host_local_batch_to_global({"x": np.zeros((6, 3))}, mesh)
  assert sharding.process_data_shard(mesh) == (0, 1)


def test_maybe_initialize_distributed_single_process(monkeypatch):
  for var in (
      "JAX_COORDINATOR_ADDRESS",
      "SLURM_NTASKS",
      "SLURM_STEP_NUM_TASKS",
      "SLURM_JOB_ID",
      "SLURM_PROCID",
      "OMPI_COMM_WORLD_SIZE",
      "TPU_WORKER_HOSTNAMES",
      "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert sharding.maybe_initialize_distributed(None) is False
  assert sharding.maybe_initialize_distributed(sharding.default_mesh_config()) is False
  assert not calls
  cfg = sharding.default_mesh_config()
  cfg.coordinator_address = "10.0.0.1:1234"
  cfg.num_processes = 2
  cfg.process_id = 1
  assert sharding.maybe_initialize_distributed(cfg) is True
  assert calls[-1][1]["coordinator_address"] == "10.0.0.1:1234" and calls[-1][1]["process_id"] == 1
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # the batch script of a 4-task job: one process
  n_calls = len(calls)
  assert sharding.maybe_initialize_distributed({}) is False and len(calls) == n_calls
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # under srun
  assert sharding.maybe_initialize_distributed({}) is True
  assert calls[-1] == ((), {})


def test_stacked_params_shard_as_each_of_their_layers():
  """The leading "layers" axis of stacked (scan_layers) params is never sharded, not even by a relocated axis: a
  stacked param gets its layers' spec behind an unsharded layer axis, with or without a "layers" rule."""
  from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top

  mesh = _mesh(1, 8, 1)
  layer = {
      "w": nn.LogicallyPartitioned(jnp.zeros((36, 4)), ("embed", "heads")),  # fsdp=8 divides neither dim
      "v": nn.LogicallyPartitioned(jnp.zeros((64, 12)), ("embed", "mlp")),
  }
  per_layer = {f"layers_{i}": layer for i in range(8)}  # 8 layers: the one dim fsdp would divide
  stacked = layer_stacking.stack_layers(per_layer)
  assert stacked["layers"]["w"].names == ("layers", "embed", "heads")
  custom = [r for r in sharding.default_logical_axis_rules() if r[0] != "layers"]
  for rules in (None, custom):
    one = sharding.logical_to_shardings(per_layer, mesh, rules)["layers_0"]
    got = sharding.logical_to_shardings(stacked, mesh, rules)["layers"]
    for key in ("w", "v"):
      assert got[key].spec == P(None, *one[key].spec), (key, got[key].spec, one[key].spec)
    assert got["w"].spec == P(None, None, "tensor")  # fsdp dropped, not moved onto the 8 layers
    assert got["v"].spec == P(None, "fsdp", "tensor")
