"""Pure, jit-able train and eval steps for the BLT and the entropy model.

A batch is a dict of `[B, N]` arrays: `tokens`, `targets`, `loss_mask` and optionally precomputed `entropies`.
For the BLT, patches are made inside the step (entropy model, space, static or byte patching), so the whole
text -> ids -> entropies -> patches -> logits -> loss line runs in one compiled program with fixed shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from blt_jax import loss as loss_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import layer_stacking, patching, sharding
from blt_jax.data import patch_rows
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import EntropyModel, compute_entropies
from blt_jax.model import BLT, init_blt


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static that the steps close over."""

  model: Any  # BLTConfig or EntropyModelConfig
  patching: Optional[PatchingConfig] = None  # BLT only
  max_patches: int = 0  # BLT only
  entropy_model: Optional[EntropyModelConfig] = None  # BLT with in-graph entropy patching

  @property
  def is_blt(self) -> bool:
    return isinstance(self.model, BLTConfig)


def make_init_fn(sc: StepConfig, tx: optax.GradientTransformation, rng: jax.Array) -> Callable[[], TrainState]:
  """`() -> TrainState` with boxed params, so `sharding.init_sharded` can shard params and optimizer moments.

  With `scan_layers` the scanned stacks are stacked (`layer_stacking`): params `[L, ...]` under one `layers`
  subtree, so the optimizer's moments are stacked too and the step neither stacks nor slices them. The values are
  those of the per-layer init with the same rng.
  """

  def init():
    if sc.is_blt:
      params = init_blt(rng, sc.model)
    else:
      params = EntropyModel(sc.model).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    params = layer_stacking.to_run_layout(params, sc.model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def make_patches(sc: StepConfig, batch, entropy_params) -> patching.Patches:
  """Fixed-shape patches of `batch["tokens"]` with the next-token convention the model needs (spec 3.2)."""
  tokens = batch["tokens"]
  if patch_rows.STARTS in batch:  # rows the loader cut to a patch budget carry their starts (patching.rows="patches")
    return patching.starts_to_patches(patch_rows.step_starts(batch[patch_rows.STARTS]), sc.max_patches)
  entropies = None
  if sc.patching.mode == "entropy":
    if "entropies" in batch:  # precomputed by scripts/precompute_entropies.py (data.entropy_store)
      entropies = batch["entropies"]
    elif entropy_params is None or sc.entropy_model is None:
      raise ValueError("entropy patching needs an entropy model (entropy_params) or batches with 'entropies'")
    else:
      # The entropy model's params are replicated: its rows go over every chip, tensor axis included, so the chips
      # of one tensor group do not each repeat the same rows (issue 25).
      entropies = compute_entropies(entropy_params, sharding.rows_over_every_device(tokens), sc.entropy_model)
      entropies = sharding.rows_over_batch_axes(entropies)
    entropies = jax.lax.stop_gradient(entropies)
  return patching.patch(
      tokens, entropies, include_next_token=True, max_patches=sc.max_patches, **sc.patching.patch_kwargs()
  )


def loss_terms(sc: StepConfig, params, batch, entropy_params=None):
  """(loss sum in nats, counted bytes, patch stats) of one batch."""
  tokens = batch["tokens"]
  stats = {}
  if sc.is_blt:
    patches = make_patches(sc, batch, entropy_params)
    logits = BLT(sc.model).apply({"params": params}, tokens, patches.patch_lengths_BP)
    # Rows without a counted byte are eval padding (e.g. a host past its share of the validation set): their
    # patches would deflate bytes-per-patch.
    real_B = jnp.any(batch["loss_mask"] > 0, axis=-1)
    stats = dict(
        num_patches=jnp.sum(jnp.where(real_B, patches.num_patches_B, 0)).astype(jnp.float32),
        overflow_rows=jnp.sum(patches.overflow_B & real_B).astype(jnp.float32),
    )
  else:
    logits = EntropyModel(sc.model).apply({"params": params}, tokens)
  loss_sum, count = loss_lib.cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
  return loss_sum, count, stats


def _mesh_while_tracing(batch_sharding, rules):
  """Lets the model's logical activation constraints (`layers.batch_sharded`) bind to the batch sharding's mesh."""
  return sharding.mesh_while_tracing(getattr(batch_sharding, "mesh", None), rules)


def make_train_step(
    sc: StepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batch_sharding=None,
    grad_shardings=None,
    rules=None,
):
  """`(state, batches_ABN, entropy_params) -> (state, metrics)`; A micro-batches are accumulated exactly.

  The loss is the masked sum over all micro-batches divided by the total number of counted bytes, so any
  split into micro-batches gives the same gradient. A non-finite loss or gradient leaves the state unchanged
  and reports `finite = False`; the trainer then stops. On a mesh, pass the sharding of one micro-batch's arrays
  and the params' shardings: they pin the scan's slices and gradient accumulators, which XLA otherwise may replicate,
  and the model's activations to the batch axes (through the logical `rules`, default `sharding`'s), so that FSDP
  all-gathers weights (rounded to the compute dtype first, `layers.low_precision_dot`) rather than activations.
  """

  def constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

  def constrain_batch(batch):
    if micro_batch_sharding is None:
      return batch
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, micro_batch_sharding), batch)

  def micro(params, batch, entropy_params):
    def f(p):
      s, n, stats = loss_terms(sc, p, batch, entropy_params)
      return s, (n, stats)

    (s, (n, stats)), g = jax.value_and_grad(f, has_aux=True)(params)
    return s, n, stats, g

  def step(state: TrainState, batches, entropy_params=None):
    with _mesh_while_tracing(micro_batch_sharding, rules):
      return _step(state, batches, entropy_params)

  def _step(state: TrainState, batches, entropy_params):
    first = constrain_batch(jax.tree_util.tree_map(lambda x: x[0], batches))
    s, n, stats, g = micro(state.params, first, entropy_params)
    g = constrain(g, grad_shardings)
    num_micro = jax.tree_util.tree_leaves(batches)[0].shape[0]
    if num_micro > 1:

      def body(carry, batch):
        s_acc, n_acc, stats_acc, g_acc = carry
        s_i, n_i, stats_i, g_i = micro(state.params, constrain_batch(batch), entropy_params)
        g_sum = constrain(jax.tree_util.tree_map(jnp.add, g_acc, g_i), grad_shardings)
        return (s_acc + s_i, n_acc + n_i, jax.tree_util.tree_map(jnp.add, stats_acc, stats_i), g_sum), None

      rest = jax.tree_util.tree_map(lambda x: x[1:], batches)
      (s, n, stats, g), _ = jax.lax.scan(body, (s, n, stats, g), rest)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree_util.tree_map(lambda x: x / denom, g)
    loss = s / denom
    grad_norm = optimizer_lib.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(old: TrainState) -> TrainState:
      updates, opt_state = tx.update(grads, old.opt_state, old.params)
      return TrainState(step=old.step + 1, params=optax.apply_updates(old.params, updates), opt_state=opt_state)

    # A branch, not `where(finite, new, old)` per leaf: with the state donated, a select that still reads the old
    # moments after the update has overwritten them in place makes XLA copy the whole optimizer state first.
    new_state = jax.lax.cond(finite, apply, lambda old: old, state)
    metrics = dict(
        loss=loss,
        bpb=loss / loss_lib.LN2,
        grad_norm=grad_norm,
        lr=schedule(state.step),
        bytes=n,
        finite=finite,
        **stats,
    )
    return new_state, metrics

  return step


def make_eval_step(sc: StepConfig, batch_sharding=None, rules=None):
  """`(params, batch, entropy_params) -> dict(loss_sum, count, ...)`: sums, for exact multi-batch averages.

  `batch_sharding` (and `rules`): as `make_train_step`'s, to keep the activations batch-sharded on a mesh.
  """

  def step(params, batch, entropy_params=None):
    with _mesh_while_tracing(batch_sharding, rules):
      s, n, stats = loss_terms(sc, params, batch, entropy_params)
    return dict(loss_sum=s, count=n, **stats)

  return step
