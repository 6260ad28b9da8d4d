"""Train a BLT or an entropy model: `python -m blt_jax.train --config configs/tiny.py --workdir DIR`.

Re-running the same command resumes from the newest checkpoint in `--workdir` (params, optimizer state and the
data iterator's position). The run ends by writing `DIR/export/` (params + config.json), which a BLT config can
name as its `entropy_checkpoint` when the run trained an entropy model.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from blt_jax import checkpoint as ckpt_lib
from blt_jax import data as data_lib
from blt_jax import flops as flops_lib
from blt_jax import metrics as metrics_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import paths, sharding, steps, train_config
from blt_jax.config import BLTConfig, EntropyModelConfig

log = logging.getLogger("blt_jax.train")


class TrainingError(RuntimeError):
  """The run cannot continue (non-finite loss, patch overflow in 'error' mode)."""


def load_entropy_model(path: str):
  """(EntropyModelConfig, params) from a converted model dir, a `save_params` dir, or a training workdir."""
  root = paths.resolve(path)
  candidates = [root, root / "export", root / "entropy_model"]
  for candidate in candidates:
    if (candidate / "config.json").is_file():
      meta = ckpt_lib.read_params_config(candidate)
      if meta.get("model_type") == "entropy_model":
        params, _ = ckpt_lib.load_params(candidate)
        return EntropyModelConfig.from_dict(meta["model"]), params
  raise FileNotFoundError(f"entropy_checkpoint {path!r}: no entropy model found (looked for config.json with "
                          f"model_type 'entropy_model' in {', '.join(map(str, candidates))})")


def _stack_to_global(batches, mesh):
  """A list of host-local batches -> one dict of global `[A, B, N]` arrays, batch axis sharded."""
  spec = PartitionSpec(None, sharding.BATCH_AXES)
  named = NamedSharding(mesh, spec)
  out = {}
  for key in batches[0]:
    local = np.stack([b[key] for b in batches])
    global_shape = (local.shape[0], local.shape[1] * _num_data_slices(mesh)) + local.shape[2:]
    out[key] = jax.make_array_from_process_local_data(named, local, global_shape)
  return out


def _num_data_slices(mesh) -> int:
  return sharding.process_data_shard(mesh)[1]


class Trainer:
  """Builds everything from a config once; `run()` trains to `num_steps`, resuming if a checkpoint exists."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    sharding.maybe_initialize_distributed(cfg.mesh)
    train_config.validate(cfg)
    self.cfg, self.workdir = cfg, paths.resolve(workdir)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.rules = sharding.logical_axis_rules_from_config(cfg.mesh, self.mesh)
    shards = sharding.num_batch_shards(self.mesh)
    if cfg.global_batch_size % shards:
      raise ValueError(f"config.global_batch_size={cfg.global_batch_size} is not divisible by the {shards} batch "
                       f"shards of mesh {dict(self.mesh.shape)} (data x fsdp)")
    model_cfg = train_config.model_config(cfg)
    entropy_cfg = self.entropy_params = None
    patch_cfg = None
    if isinstance(model_cfg, BLTConfig):
      patch_cfg = train_config.patching_config(cfg)
      if patch_cfg.mode == "entropy" and not cfg.data.entropy_store:  # else batches carry stored entropies
        entropy_cfg, params = load_entropy_model(cfg.entropy_checkpoint)
        self.entropy_params = jax.device_put(params, sharding.replicated(self.mesh))
    self.sc = steps.StepConfig(model_cfg, patch_cfg, train_config.max_patches(cfg) if patch_cfg else 0, entropy_cfg)
    self.schedule = optimizer_lib.lr_schedule(cfg.optimizer, cfg.num_steps)
    self.tx = optimizer_lib.make_optimizer(cfg.optimizer, cfg.num_steps)

    init_fn = steps.make_init_fn(self.sc, self.tx, jax.random.PRNGKey(cfg.seed))
    abstract = jax.eval_shape(init_fn)
    self.state_shardings = sharding.logical_to_shardings(abstract, self.mesh, self.rules)
    self._init_fn = init_fn
    self._abstract = abstract

    batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, sharding.BATCH_AXES))
    eval_sharding = sharding.data_sharding(self.mesh)
    rep = sharding.replicated(self.mesh)
    self.train_step = jax.jit(steps.make_train_step(self.sc, self.tx, self.schedule, eval_sharding,
                                                    self.state_shardings.params),
                              in_shardings=(self.state_shardings, batch_sharding, rep),
                              out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.eval_step = jax.jit(steps.make_eval_step(self.sc), in_shardings=(self.state_shardings.params,
                                                                          eval_sharding, rep), out_shardings=rep)
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir, save_interval_steps=cfg.checkpoint_every,
                                              max_to_keep=cfg.keep_checkpoints,
                                              async_checkpointing=cfg.async_checkpointing)
    self.data_index, self.data_count = sharding.process_data_shard(self.mesh)
    self.seq_len = cfg.seq_len
    self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=cfg.num_steps)
    self.history: list = []  # (step, metrics dict) of every logged step, for tests and notes
    self.state = None  # the final train state once `run()` returns
    self._eval_iterator = None
    self.flops_per_byte = self._flops_per_byte(4.5)

  def _flops_per_byte(self, mean_patch_length: float) -> float:
    if self.sc.is_blt:
      return flops_lib.blt_train_flops_per_byte(self.sc.model, self.seq_len, mean_patch_length)
    return flops_lib.entropy_model_train_flops_per_byte(self.sc.model, self.seq_len)

  def _initial_state(self):
    """(state, data iterator, start step): restored from the latest checkpoint, else freshly initialised."""
    cfg = self.cfg
    iterator = data_lib.make_train_iterator(cfg.data, cfg.seq_len, cfg.global_batch_size, cfg.seed,
                                            process_index=self.data_index, process_count=self.data_count)
    latest = self.checkpointer.latest_step()
    if latest is None:
      state = jax.jit(lambda: _unbox(self._init_fn()), out_shardings=self.state_shardings)()
      return state, iterator, 0
    target = sharding.abstract_with_shardings(self._abstract, self.state_shardings)
    state, data_state, meta = self.checkpointer.restore(latest, target)
    if data_state is not None:
      iterator.set_state(data_state)
    log.info("resumed from step %d of %s", latest, self.workdir)
    if jax.process_index() == 0:
      print(f"resumed from checkpoint step {latest} in {self.workdir}", flush=True)
    return state, iterator, latest

  def evaluate(self, params) -> Dict[str, float]:
    cfg = self.cfg
    if self._eval_iterator is None:  # re-iterable; building it counts every validation token, so only once
      self._eval_iterator = data_lib.make_eval_iterator(cfg.data, cfg.seq_len, cfg.global_batch_size,
                                                        process_index=self.data_index, process_count=self.data_count)
    total, count, patches = 0.0, 0.0, 0.0
    for i, batch in enumerate(self._eval_iterator):
      if cfg.eval_batches and i >= cfg.eval_batches:
        break
      arrays = sharding.host_local_batch_to_global(batch, self.mesh)
      out = jax.device_get(self.eval_step(params, arrays, self.entropy_params))
      total += float(out["loss_sum"])
      count += float(out["count"])
      patches += float(out.get("num_patches", 0.0))
    result = dict(val_bpb=total / math.log(2) / max(count, 1.0), val_loss=total / max(count, 1.0))
    if self.sc.is_blt and patches:
      result["val_bytes_per_patch"] = count / patches
    return result

  def run(self) -> Dict[str, Any]:
    cfg = self.cfg
    state, iterator, step = self._initial_state()
    start_step = step
    if step == 0:
      initial = self.evaluate(state.params)
      self.writer.write_scalars(0, initial)
      self.history.append((0, initial))
    window = dict(t=time.perf_counter(), steps=0)
    metrics: Dict[str, Any] = {}
    while step < cfg.num_steps:
      batches = [next(iterator) for _ in range(cfg.grad_accum_steps)]
      arrays = _stack_to_global(batches, self.mesh)
      state, metrics = self.train_step(state, arrays, self.entropy_params)
      step += 1
      is_log = step % cfg.log_every == 0 or step == cfg.num_steps
      window["steps"] += 1
      if is_log or self.sc.is_blt and cfg.patching.on_overflow == "error":
        self._check(jax.device_get(metrics), step, state)
      if is_log:
        host = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed = max(now - window["t"], 1e-9)
        rows_bytes = cfg.global_batch_size * cfg.grad_accum_steps * cfg.seq_len * window["steps"]
        line = dict(loss=host["loss"], bpb=host["bpb"], grad_norm=host["grad_norm"], lr=host["lr"],
                    bytes_per_s=rows_bytes / elapsed)
        if self.sc.is_blt:
          positions = cfg.global_batch_size * cfg.grad_accum_steps * (cfg.seq_len + 1)
          mean_patch = positions / max(float(host["num_patches"]), 1.0)
          line.update(mean_patch_length=mean_patch, patches_per_s=rows_bytes / elapsed / mean_patch,
                      overflow_rows=host["overflow_rows"])
          self.flops_per_byte = self._flops_per_byte(mean_patch)
        peak = flops_lib.device_peak_flops(jax.devices()[0]) * jax.device_count()
        line["mfu"] = flops_lib.mfu(self.flops_per_byte, line["bytes_per_s"], peak)
        self.writer.write_scalars(step, line)
        self.history.append((step, {k: float(v) for k, v in line.items()}))
        window.update(t=time.perf_counter(), steps=0)
      if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.num_steps:
        val = self.evaluate(state.params)
        self.writer.write_scalars(step, val)
        self.history.append((step, val))
      if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
        self._check(jax.device_get(metrics), step, state)  # never checkpoint a state that stopped updating
        self.checkpointer.save(step, state, iterator.get_state(), self._meta(step), force=True)
    self.checkpointer.wait_until_finished()
    self.state = state
    self._export(state.params)
    self.writer.flush()
    return dict(start_step=start_step, final_step=step, history=self.history,
                final_metrics={k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {})

  def _check(self, host_metrics, step: int, state) -> None:
    # A step with a non-finite loss leaves `state.step` behind, so steps skipped between checks are caught too.
    applied = int(jax.device_get(state.step))
    if not bool(host_metrics["finite"]) or applied != step:
      self.checkpointer.wait_until_finished()
      if bool(host_metrics["finite"]):
        what = (f"{step - applied} step(s) before step {step} had a non-finite loss or gradient (not logged: "
                f"log_every={self.cfg.log_every})")
      else:
        what = (f"non-finite loss or gradient at step {step} (loss={float(host_metrics['loss'])}, grad_norm="
                f"{float(host_metrics['grad_norm'])})")
      raise TrainingError(
          f"{what}; those updates were not applied and the last good checkpoint "
          f"(step {self.checkpointer.latest_step()}) in {self.workdir} is intact. Lower optimizer.lr or check data.")
    if self.sc.is_blt and self.cfg.patching.on_overflow == "error" and float(host_metrics["overflow_rows"]) > 0:
      self.checkpointer.wait_until_finished()
      raise TrainingError(
          f"step {step}: {int(host_metrics['overflow_rows'])} row(s) needed more than patching.max_patches="
          f"{self.sc.max_patches} patches; raise it or set patching.on_overflow='count'")

  def _meta(self, step: int) -> dict:
    return dict(step=step, config=json.loads(self.cfg.to_json_best_effort()))

  def _export(self, params) -> None:
    model_type = "blt" if self.sc.is_blt else "entropy_model"
    meta = {"format": "blt_jax", "model_type": model_type, "model": self.sc.model.to_dict()}
    if self.sc.patching is not None:
      meta["patching"] = self.sc.patching.to_dict()
    ckpt_lib.save_params(self.workdir / "export", params, meta, overwrite=True)

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def _unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(tree)


def train(cfg: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  trainer = Trainer(cfg, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()


def main(argv=None) -> None:
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and the final export go here.")
  try:
    flags.FLAGS(sys.argv if argv is None else argv)
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if cfg is not None:
      cfg.keys()  # a config file that failed to load only raises when first used
  except Exception as e:  # pylint: disable=broad-except
    # Unknown keys, bad values and unreadable config files surface here: one line, no traceback.
    raise SystemExit(f"error: bad command line: {type(e).__name__}: {e}") from None
  if cfg is None or workdir is None:
    raise SystemExit("usage: python -m blt_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value]")
  logging.basicConfig(level=logging.WARNING)
  try:
    summary = train(cfg, workdir)
  except (ValueError, FileNotFoundError, TrainingError) as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print(f"done: steps {summary['start_step']} -> {summary['final_step']}; export in "
          f"{paths.resolve(workdir) / 'export'}", flush=True)


if __name__ == "__main__":
  main()
