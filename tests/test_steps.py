"""The jitted steps in bfloat16: patches from float32 entropy comparisons, the BLT loss and a few train steps against
float32, and what an fsdp mesh communicates (bf16 weight all-gathers, float32 cross-device sums)."""

import collections
import dataclasses
import glob
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from blt_jax import loss as loss_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import entropy_store, sharding, steps, tokenizer, train_config
from blt_jax.config import EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import compute_entropies_jit, init_entropy_model
from blt_jax.model import BLT, init_blt

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 64  # bytes per row
B = 8  # rows: one per device on the 8-device mesh
NUM_STEPS = 4
# bf16 vs float32 on the same params and bytes (configs/tiny.py, rows of 64 bytes). Measured at init: logits differ by
# <= 0.041 (their std is 0.99), the loss by 1.3e-5 relative. Over NUM_STEPS train steps at lr 1e-2 (losses 6.08 ->
# 2.12) the bf16 and float32 losses differ by <= 0.17% relative at every step.
LOGITS_ATOL = 0.1
LOSS_RTOL = 0.01


def _tiny(dtype: str):
  """configs/tiny.py's BLT (space patching) at `dtype`, rows of N bytes."""
  cfg = train_config.load_config_file(str(ROOT / "configs" / "tiny.py"))
  cfg.compute_dtype = dtype
  cfg.seq_len = N
  return steps.StepConfig(train_config.model_config(cfg), train_config.patching_config(cfg), N + 1)


TEXT = (
    "A byte latent transformer reads raw bytes. A small entropy model scores how surprising each next byte is, "
    "and a new patch starts wherever that entropy is high, so predictable runs of text share one patch while "
    "hard bytes get patches of their own. A light local encoder turns the bytes of each patch into a vector, a "
    "large latent transformer runs over the patch vectors, and a light local decoder predicts the next byte "
    "from them. Compute follows information: the big model spends its steps where the text is hard to guess."
)


def _batches(num: int):
  """`num` batches `[1, B, N]` of TEXT, tiled (real text: the loss falls quickly as the model trains)."""
  ids = np.asarray(tokenizer.encode(TEXT, add_bos=True, add_eos=True), np.int32)
  need = num * B * (N + 1)
  ids = np.tile(ids, -(-need // len(ids)))[:need].reshape(num, B, N + 1)
  return [
      dict(tokens=ids[i, None, :, :-1], targets=ids[i, None, :, 1:], loss_mask=np.ones((1, B, N), np.float32))
      for i in range(num)
  ]


# ---------------------------------------------------------------------------------------------------------------
# Patching.


def test_patches_compare_entropies_in_float32_with_a_bf16_model():
  """An entropy in (threshold, bf16(threshold)] opens a patch: the comparison is float32 (patching.compare_dtype),
  whatever the model computes in; compare_dtype=bfloat16 reproduces the reference's realtime patching (Q4)."""
  sc = dataclasses.replace(_tiny("bfloat16"), patching=PatchingConfig(mode="entropy"))
  thr = sc.patching.threshold  # 1.335442..., bf16(thr) = 1.3359375
  between = 1.3356
  assert thr < between and jnp.bfloat16(between) == jnp.bfloat16(thr)
  tokens = jnp.full((1, 8), 100, jnp.int32).at[0, 0].set(tokenizer.BOS_ID)
  entropies = jnp.zeros((1, 8), jnp.float32).at[0, 3].set(between)
  batch = dict(tokens=tokens, entropies=entropies)
  f32 = steps.make_patches(sc, batch, None)
  bf16 = steps.make_patches(
      dataclasses.replace(sc, patching=PatchingConfig(mode="entropy", compare_dtype="bfloat16")), batch, None
  )
  assert int(f32.num_patches_B[0]) == int(bf16.num_patches_B[0]) + 1

  # In-graph: a bf16 entropy model still gives float32 entropies, computed from its logits in float32.
  ent_cfg = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=8, max_seqlen=64, dtype="bfloat16")
  ent_params = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(1), ent_cfg))
  tokens = jnp.asarray(_batches(1)[0]["tokens"][0])
  ent = compute_entropies_jit(ent_params, tokens, ent_cfg)
  assert ent.dtype == jnp.float32
  assert np.any(np.asarray(ent) != np.asarray(ent.astype(jnp.bfloat16).astype(jnp.float32)))  # not bf16 values
  ent32 = compute_entropies_jit(ent_params, tokens, dataclasses.replace(ent_cfg, dtype="float32"))
  np.testing.assert_allclose(ent, ent32, atol=0.05)


def test_stored_entropies_give_the_in_graph_patches_and_losses():
  """Entropy patching from entropies scored once per document and stored (`entropy_store`) trains as the step's
  in-graph entropy model does: on the same params and rows, the same patch count and loss (train steps and the
  eval step share `make_patches` and `loss_terms`). The threshold sits in the widest gap near the median entropy,
  so the patching depends on the entropies: all-zero ones give other patches. Mutation seen to fail: batch
  "entropies" replaced with zeros in steps.make_patches."""
  ent_cfg = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=32, max_seqlen=N)
  ent_params = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(1), ent_cfg))
  text = tokenizer.encode(TEXT, add_bos=False, add_eos=False)
  docs = [np.concatenate([[tokenizer.BOS_ID], text[37 * b : 37 * b + N]]).astype(np.int32) for b in range(B)]
  batch = dict(
      tokens=np.stack([d[:N] for d in docs]),
      targets=np.stack([d[1:] for d in docs]),
      loss_mask=np.ones((B, N), np.float32),
  )
  stored = np.stack(
      entropy_store.compute_document_entropies([d[:N] for d in docs], ent_params, ent_cfg, tokens_per_batch=B * N)
  )
  sorted_e = np.sort(stored.ravel())
  mid = slice(len(sorted_e) // 3, 2 * len(sorted_e) // 3)
  i = mid.start + int(np.argmax(np.diff(sorted_e)[mid]))
  threshold = float(sorted_e[i] + sorted_e[i + 1]) / 2
  sc = dataclasses.replace(
      _tiny("float32"), patching=PatchingConfig(mode="entropy", threshold=threshold), entropy_model=ent_cfg
  )
  params = jax.jit(lambda: nn.meta.unbox(init_blt(jax.random.PRNGKey(0), sc.model)))()  # jitted: 2x faster
  in_graph = jax.jit(steps.make_eval_step(sc))(params, batch, ent_params)
  from_store = jax.jit(steps.make_eval_step(dataclasses.replace(sc, entropy_model=None)))
  got = from_store(params, dict(batch, entropies=stored), None)
  assert float(got["num_patches"]) == float(in_graph["num_patches"])
  np.testing.assert_allclose(got["loss_sum"], in_graph["loss_sum"], rtol=1e-6)
  zeros = from_store(params, dict(batch, entropies=np.zeros_like(stored)), None)  # the same program
  assert float(zeros["num_patches"]) < 0.7 * float(got["num_patches"]), (zeros["num_patches"], got["num_patches"])
  assert abs(float(zeros["loss_sum"]) / float(got["loss_sum"]) - 1) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The forward pass.


def test_bf16_logits_and_loss_match_fp32():
  """The BLT forward on the same params and bytes: logits within LOGITS_ATOL, the loss within LOSS_RTOL."""
  sc16, sc32 = _tiny("bfloat16"), _tiny("float32")
  params = nn.meta.unbox(init_blt(jax.random.PRNGKey(0), sc32.model))
  batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0]), _batches(1)[0])
  patches = steps.make_patches(sc32, batch, None)  # space patching: the same for both dtypes

  @jax.jit
  def logits_and_loss(params):
    out = []
    for sc in (sc16, sc32):
      logits = BLT(sc.model).apply({"params": params}, batch["tokens"], patches.patch_lengths_BP)
      s, n = loss_lib.cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
      out.append((logits, s / n))
    return out

  (logits16, loss16), (logits32, loss32) = logits_and_loss(params)
  assert logits16.dtype == logits32.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=LOGITS_ATOL)
  np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
  print(
      "logits max |bf16 - fp32|",
      float(jnp.max(jnp.abs(logits16 - logits32))),
      "logits std",
      float(jnp.std(logits32)),
      "loss",
      float(loss16),
      float(loss32),
  )


# ---------------------------------------------------------------------------------------------------------------
# Train steps on an fsdp mesh.


def _collectives(hlo: str):
  """[(op, dtype, shape)] of the all-gathers, all-reduces and reduce-scatters in an HLO module's text."""
  pattern = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter)(?:-start)?\(")
  return [(m.group(3), m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in pattern.finditer(hlo)]


@pytest.fixture(scope="module")
def fsdp_steps(tmp_path_factory):
  return compile_fsdp_steps(tmp_path_factory.mktemp)


def compile_fsdp_steps(mktemp):
  """Per dtype: (the train step compiled on mesh (1, 8, 1), its HLO after SPMD partitioning, the initial state,
  the batch sharding).

  XLA:CPU runs no collective in bf16: its float-normalization pass upcasts bf16 all-gathers to f32 after
  partitioning. The partitioned HLO is where the collectives' dtypes are decided for every backend, so it is
  dumped from the same compilation that runs the steps.
  """
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  opt = optimizer_lib.default_optimizer_config()
  opt.scheduler, opt.lr, opt.clip, opt.weight_decay = "constant", 1e-2, 1.0, 0.0
  tx, schedule = optimizer_lib.make_optimizer(opt, NUM_STEPS), optimizer_lib.lr_schedule(opt, NUM_STEPS)
  batch_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  batch = jax.device_put(_batches(1)[0], batch_sharding)
  init_fn = steps.make_init_fn(_tiny("float32"), tx, jax.random.PRNGKey(0))  # the same init for both dtypes
  shardings = sharding.logical_to_shardings(jax.eval_shape(init_fn), mesh)
  state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  out = {}
  for dtype in ("bfloat16", "float32"):
    step = jax.jit(
        steps.make_train_step(_tiny(dtype), tx, schedule, sharding.data_sharding(mesh), shardings.params),
        in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    dump = pathlib.Path(mktemp(f"hlo_{dtype}"))
    compiled = step.lower(state, batch, None).compile(
        {"xla_dump_to": str(dump), "xla_dump_hlo_pass_re": "spmd-partitioning"}
    )
    (path,) = glob.glob(str(dump / "*after_spmd-partitioning*"))
    out[dtype] = (compiled, pathlib.Path(path).read_text(), state, batch_sharding)
  return out


def _kernel_shapes(params):
  return [
      tuple(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(params)
      if jax.tree_util.keystr(path).endswith("['kernel']")
  ]


def test_fsdp_gathers_bf16_weights_and_sums_in_float32(fsdp_steps):
  """bf16 on (data, fsdp, tensor) = (1, 8, 1): every projection weight is all-gathered as bf16 (cast on its shard),
  and no other bf16 value crosses devices: activations stay batch-sharded (before, XLA replicated them and all-reduced
  bf16 matmul partial sums), and every cross-device sum is float32, weight gradients included, as with the
  reference's FSDP `reduce_dtype=fp32` (spec 13.3). Measured: 50 bf16 kernel all-gathers, 0 f32, no other bf16
  collective; before, also 47 bf16 activation all-gathers and 50 bf16 all-reduces (33 activation partial sums, 17
  weight gradients)."""
  _, hlo, state, _ = fsdp_steps["bfloat16"]
  kernels = _kernel_shapes(state.params)
  ops = _collectives(hlo)
  gathered = collections.Counter(dtype for op, dtype, shape in ops if op == "all-gather" and shape in kernels)
  assert gathered["bf16"] >= len(kernels) and gathered["f32"] == 0, (gathered, len(kernels))
  other_bf16 = [
      (op, shape) for op, dtype, shape in ops if dtype == "bf16" and not (op == "all-gather" and shape in kernels)
  ]
  assert not other_bf16, other_bf16
  # float32 compute gathers the same weights in float32 (the check above sees dtypes, not just counts).
  _, hlo32, _, _ = fsdp_steps["float32"]
  gathered32 = collections.Counter(
      dtype for op, dtype, shape in _collectives(hlo32) if op == "all-gather" and shape in kernels
  )
  assert gathered32["f32"] >= len(kernels) and gathered32["bf16"] == 0, gathered32


def test_bf16_train_steps_track_fp32(fsdp_steps):
  """NUM_STEPS steps from the same init on the same batches: bf16 losses within LOSS_RTOL of float32's."""
  losses = {}
  for dtype, (compiled, _, state, batch_sharding) in fsdp_steps.items():
    losses[dtype] = []
    for batch in _batches(NUM_STEPS):
      state, metrics = compiled(state, jax.device_put(batch, batch_sharding), None)
      assert bool(metrics["finite"])
      losses[dtype].append(float(metrics["loss"]))
  l16, l32 = np.array(losses["bfloat16"]), np.array(losses["float32"])
  print("bf16 losses", l16, "fp32 losses", l32, "max rel diff", np.max(np.abs(l16 / l32 - 1)))
  assert l32[-1] < l32[0] - 0.5  # the steps train: the comparison is not between two untouched inits
  np.testing.assert_allclose(l16, l32, rtol=LOSS_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# Donation.


def test_donated_state_is_updated_in_place_without_a_copy():
  """With the state donated, the step must not copy the optimizer state before updating it (a per-leaf select of
  new vs old state did: +45% temporaries on the CPU benchmark config, suspected in the H100's 5x slower donated loop);
  and a non-finite step still leaves the donated state unchanged."""
  sc = _tiny("float32")
  tx = optimizer_lib.make_optimizer(train_config.base_config().optimizer, 10)
  params = jax.eval_shape(lambda: nn.meta.unbox(init_blt(jax.random.PRNGKey(0), sc.model)))
  state = steps.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params)
  )
  batch = _batches(1)[0]
  compiled = {}
  for donate in (False, True):
    fn = jax.jit(steps.make_train_step(sc, tx, lambda s: 1e-3), donate_argnums=(0,) if donate else ())
    compiled[donate] = fn.lower(state, batch, None).compile()
  hlo = compiled[True].as_text()
  state_copies = [line for line in hlo.splitlines() if re.search(r"copy\(%state_", line)]
  assert not state_copies, state_copies[:3]
  assert compiled[True].memory_analysis().temp_size_in_bytes <= compiled[False].memory_analysis().temp_size_in_bytes
  real = nn.meta.unbox(init_blt(jax.random.PRNGKey(0), sc.model))
  start = steps.TrainState(step=jnp.zeros((), jnp.int32), params=real, opt_state=tx.init(real))
  expected = jax.tree.map(np.asarray, start)
  bad = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
  after, metrics = compiled[True](start, bad, None)
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), b)


# ---------------------------------------------------------------------------------------------------------------
# scan_layers: the global stack's params and optimizer state live stacked in the train state.


def test_scan_layers_state_is_stacked_and_trains_like_the_per_layer_one():
  """A 3-layer entropy model (the step code is the BLT's; its program compiles fast): with scan_layers the state
  holds `[3, ...]` params and Adam moments, and three steps give the per-layer run's losses, gradient norms and
  params (the reduction order differs: float32 ulps)."""
  from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top

  opt_cfg = train_config.base_config().optimizer
  opt_cfg.update(lr=1e-2, warmup=0, scheduler="constant", clip=1.0, weight_decay=0.1)
  tx = optimizer_lib.make_optimizer(opt_cfg, 10)
  schedule = optimizer_lib.lr_schedule(opt_cfg, 10)
  batches = _batches(3)
  runs = {}
  for scan in (False, True):
    sc = steps.StepConfig(
        EntropyModelConfig(
            dim=32, n_layers=3, n_heads=2, multiple_of=32, sliding_window=16, max_seqlen=N, scan_layers=scan
        )
    )
    state = jax.jit(lambda: nn.meta.unbox(steps.make_init_fn(sc, tx, jax.random.PRNGKey(0))()))()
    step = jax.jit(steps.make_train_step(sc, tx, schedule), donate_argnums=0)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    runs[scan] = state, losses
  (flat, flat_losses), (stacked, stacked_losses) = runs[False], runs[True]
  assert sorted(stacked.params) == ["layers", "norm", "output", "tok_embeddings"]
  assert stacked.params["layers"]["feed_forward"]["w1"]["kernel"].shape == (3, 32, 96)
  mu = stacked.opt_state[1][0].mu  # clip, then adamw's scale_by_adam: its moments mirror the stacked params
  assert mu["layers"]["feed_forward"]["w1"]["kernel"].shape == (3, 32, 96)
  np.testing.assert_allclose(stacked_losses, flat_losses, rtol=1e-5)
  assert stacked_losses[-1][0] < stacked_losses[0][0] - 0.5  # the steps train
  unstacked = layer_stacking.unstack_params(stacked.params, sc.model)
  assert jax.tree.structure(unstacked) == jax.tree.structure(flat.params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(unstacked), jax.tree.leaves(flat.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scan_layers_train_step_does_not_grow_with_depth():
  """The traced train step (stacked state) is the same program at 2 and 6 global layers: nothing is stacked, sliced
  or updated per layer (with the per-layer state it grows: the issue-13 compile-time growth)."""
  opt_cfg = train_config.base_config().optimizer
  tx = optimizer_lib.make_optimizer(opt_cfg, 10)
  batch = _batches(1)[0]

  def ops(depth, stacked):
    sc = _tiny("float32")
    sc = dataclasses.replace(sc, model=dataclasses.replace(sc.model, n_layers_global=depth, scan_layers=True))
    state = jax.eval_shape(lambda: nn.meta.unbox(steps.make_init_fn(sc, tx, jax.random.PRNGKey(0))()))
    if not stacked:
      from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top

      state = jax.eval_shape(lambda s: layer_stacking.restack(s, s.params, sc.model, False), state)
    text = jax.jit(steps.make_train_step(sc, tx, lambda s: 1e-3)).lower(state, batch, None).as_text()
    return sum(" = " in line for line in text.splitlines())

  assert ops(2, True) == ops(6, True)
  assert ops(6, False) > ops(2, False) + 100
