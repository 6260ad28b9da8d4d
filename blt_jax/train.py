"""Train a BLT or an entropy model: `python -m blt_jax.train --config configs/tiny.py --workdir DIR`.

Re-running the same command resumes from the newest readable checkpoint in `--workdir` (params, optimizer state and
the data iterator's position). SIGTERM (preemption) saves a checkpoint at the next step boundary and exits with
status 0; before the first step has run (start-up, its compile included) it ends the process as usual. The run
ends by writing `DIR/export/` (params + config.json, and the entropy model it patched with), which a later run can
name as its `init_from`, or, for an entropy model, as a BLT's `entropy_checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import re
import signal
import threading
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from blt_jax import calibrate
from blt_jax import checkpoint as ckpt_lib
from blt_jax import layer_stacking
from blt_jax import data as data_lib
from blt_jax import flops as flops_lib
from blt_jax import metrics as metrics_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import paths, sharding, steps, train_config
from blt_jax.config import BLTConfig, EntropyModelConfig
from blt_jax.data import patch_rows

log = logging.getLogger("blt_jax.train")


# Seconds jax has spent tracing, lowering and compiling in this process (its monitoring events), for the first
# step's compile time.
_COMPILE_SECONDS = [0.0]
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def _count_compile_seconds(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _COMPILE_SECONDS[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile_seconds)


class TrainingError(RuntimeError):
  """The run cannot continue (non-finite loss, patch overflow in 'error' mode)."""


def _say(line: str) -> None:
  """One console line from the primary process (the others would repeat it)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def _entropy_model_dir(path: str):
  """(dir, config.json contents) of the entropy model in a converted model dir, a `save_params` dir or a workdir."""
  root = paths.resolve(path)
  candidates = [root, root / "export", root / "entropy_model", root / "export" / "entropy_model"]
  for candidate in candidates:
    if (candidate / "config.json").is_file():
      meta = ckpt_lib.read_params_config(candidate)
      if meta.get("model_type") == "entropy_model":
        return candidate, meta
  raise FileNotFoundError(
      f"entropy_checkpoint {path!r}: no entropy model found (looked for config.json with "
      f"model_type 'entropy_model' in {', '.join(map(str, candidates))})"
  )


def _entropy_config(meta: dict, run: Optional[ml_collections.ConfigDict]) -> EntropyModelConfig:
  if run is None:
    return EntropyModelConfig.from_dict(meta["model"])
  return train_config.patching_entropy_model_config(run, meta["model"])


def load_entropy_model_config(path: str, run: Optional[ml_collections.ConfigDict] = None) -> EntropyModelConfig:
  """The EntropyModelConfig of `load_entropy_model(path, run)`, without reading its params."""
  return _entropy_config(_entropy_model_dir(path)[1], run)


def load_entropy_model(path: str, run: Optional[ml_collections.ConfigDict] = None):
  """(EntropyModelConfig, params) from a converted model dir, a `save_params` dir, or a training workdir.

  With `run` (a BLT run's config, which patches with it), the run settings (dtype, scan, kernel, remat) are that
  run's, not the ones the entropy model was trained with (`train_config.patching_entropy_model_config`).
  """
  directory, meta = _entropy_model_dir(path)
  params, _ = ckpt_lib.load_params(directory)
  return _entropy_config(meta, run), params


@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
  """Where `init_from` points: a `save_params` dir (convert output or a run's export/) and its config.json."""

  path: Any  # epath.Path of the dir holding params/ and config.json
  meta: dict
  entropy_model: Optional[str]  # its entropy_model/ dir, if it ships one


def find_init_checkpoint(path: str) -> InitCheckpoint:
  """The checkpoint `config.init_from` names: the dir itself, or a training workdir's `export/`."""
  root = paths.resolve(path)
  if not root.exists():
    raise FileNotFoundError(f"init_from {path!r}: {root} does not exist")
  for candidate in (root, root / "export"):
    if (candidate / ckpt_lib.CONFIG_FILE).is_file():
      break
  else:
    raise FileNotFoundError(
        f"init_from {path!r}: no {ckpt_lib.CONFIG_FILE} in {root} or {root / 'export'}; expected "
        f"the output of `python -m blt_jax.convert` or a training workdir (or its export/)"
    )
  try:
    meta = ckpt_lib.read_params_config(candidate)
  except json.JSONDecodeError as e:
    raise ValueError(f"init_from {path!r}: {candidate / ckpt_lib.CONFIG_FILE} is not valid json ({e})") from None
  if meta.get("format") != "blt_jax" or meta.get("model_type") not in ("blt", "entropy_model"):
    raise ValueError(
        f"init_from {path!r}: {candidate / ckpt_lib.CONFIG_FILE} is not a blt_jax checkpoint "
        f"(format={meta.get('format')!r}, model_type={meta.get('model_type')!r})"
    )
  if not (candidate / ckpt_lib.PARAMS_DIR).is_dir():
    raise FileNotFoundError(
        f"init_from {path!r}: {candidate} has {ckpt_lib.CONFIG_FILE} but no " f"{ckpt_lib.PARAMS_DIR}/ directory"
    )
  entropy = candidate / "entropy_model"
  has_entropy = meta["model_type"] == "blt" and (entropy / ckpt_lib.CONFIG_FILE).is_file()
  return InitCheckpoint(candidate, meta, str(entropy) if has_entropy else None)


class StopRequest:
  """SIGTERM (preemptible TPU VMs, Slurm, Kubernetes) -> stop at a step boundary that every process agrees on.

  With several processes, the signal may reach only some of them, at different steps. Each step every process
  contributes its flag to a max-reduction over all devices (a one-element-per-device array, a few bytes); the result
  is read at the next step, after that step has been dispatched, so the device always has work queued while the
  host waits for it. Every process reads the same reduction at the same step, so all stop at the same step.
  """

  def __init__(self, mesh):
    self.received = False
    self._announced = False
    self._previous = None
    self._pending = None
    self._mesh = mesh
    if jax.process_count() > 1:
      self._flags_sharding = NamedSharding(mesh, PartitionSpec(*mesh.axis_names))
      self._any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.received = True  # only a flag: the handler may interrupt any code, printing included

  def should_stop(self) -> bool:
    """Call once per step on every process; True on all of them at the same step."""
    if self.received and not self._announced:
      log.warning("SIGTERM received: saving a checkpoint at the step boundary all processes agree on, then exiting")
      self._announced = True
    if jax.process_count() == 1:
      return self.received
    agreed = self._pending is not None and bool(jax.device_get(self._pending))
    local = [
        jax.device_put(np.full((1,) * self._mesh.devices.ndim, self.received, np.int32), d)
        for d in self._flags_sharding.addressable_devices
    ]
    flags = jax.make_array_from_single_device_arrays(self._mesh.devices.shape, self._flags_sharding, local)
    self._pending = self._any(flags)
    return agreed


class Profile:
  """A `jax.profiler` trace of steps start <= s < stop (`config.profile_steps`) into `directory`."""

  def __init__(self, steps, directory):
    self.start, self.stop = tuple(steps) if steps else (0, 0)
    self.directory = directory
    self.active = False
    self.first = None  # first step traced

  def before_step(self, step: int) -> None:
    """`step`: the step about to be dispatched (1-based)."""
    if not self.active and self.start <= step < self.stop:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active, self.first = True, step

  def after_step(self, step: int, state) -> None:
    if self.active and step + 1 >= self.stop:
      self.close(state)
      _say(f"profile of steps {self.first}..{step} written to {self.directory}")

  def close(self, state=None) -> None:
    if self.active:
      if state is not None:
        jax.block_until_ready(state)  # the trace must contain the traced steps' device work
      jax.profiler.stop_trace()
      self.active = False


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


def uses_entropy_model(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the train step runs an entropy model in-graph (entropy patching without a `data.entropy_store`)."""
  return cfg.model_type == "blt" and train_config.patching_config(cfg).mode == "entropy" and not cfg.data.entropy_store


def fit_patching_threshold(
    cfg: ml_collections.ConfigDict,
    checkpointer: ckpt_lib.Checkpointer,
    entropy_cfg: Optional[EntropyModelConfig] = None,
    entropy_params=None,
) -> None:
  """With `patching.target_bytes_per_patch`, sets `cfg.patching.threshold` for it, once per run.

  A run with checkpoints takes the threshold stored in them and never recalibrates (its model learnt those
  patches). A new run calibrates on `patching.calibration_rows` rows from the start of its training stream
  (`calibrate.sample_rows`, `calibrate.calibrate`: the command's functions), the same rows on every process;
  process 0's threshold is broadcast all the same, so every process compiles one step.
  """
  target = cfg.patching.get("target_bytes_per_patch", 0.0)
  if cfg.model_type != "blt" or not target:
    return
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      stored = checkpointer.read_meta(step)["config"]["patching"]
    except Exception:  # pylint: disable=broad-except  (a damaged step: an older one holds the same threshold)
      continue
    cfg.patching.threshold = float(stored["threshold"])
    _say(
        f"patching.threshold={cfg.patching.threshold!r}: stored with the run (checkpoint step {step}; calibrated "
        f"for {stored.get('target_bytes_per_patch')} bytes per patch when it started), not recalibrated"
    )
    return
  rows = calibrate.sample_rows(cfg.data, cfg.seq_len, cfg.patching.calibration_rows, cfg.seed)
  result = calibrate.calibrate(
      rows, train_config.patching_config(cfg), target, entropy_params=entropy_params, entropy_config=entropy_cfg
  )
  threshold = result.threshold
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    threshold = float(multihost_utils.broadcast_one_to_all(np.float32(threshold)))
  cfg.patching.threshold = threshold
  _say(
      f"patching.threshold={threshold!r}: calibrated for target_bytes_per_patch={target:g} on {result.rows} "
      f"training rows (stored with the run)\n  " + calibrate.report(result).replace("\n", "\n  ")
  )


@dataclasses.dataclass(frozen=True)
class TrainStepParts:
  """The trainer's jitted steps and what they are built from: shared by `Trainer` and `blt_jax.aot`."""

  sc: steps.StepConfig
  rules: sharding.Rules
  schedule: Any  # optax schedule
  tx: Any  # optax.GradientTransformation
  init_fn: Any  # () -> TrainState with boxed params
  abstract_state: Any  # jax.eval_shape(init_fn): boxed ShapeDtypeStructs
  state_shardings: Any  # NamedSharding tree of the unboxed state
  batch_sharding: NamedSharding  # of the train step's [A, B, N] micro-batch stacks
  eval_sharding: NamedSharding  # of the eval step's [B, N] batches
  train_step: Any  # jitted (state, batches_ABN, entropy_params) -> (state, metrics), donates the state
  eval_step: Any  # jitted (params, batch_BN, entropy_params) -> sums


def build_train_step(
    cfg: ml_collections.ConfigDict, mesh, entropy_cfg: Optional[EntropyModelConfig] = None
) -> TrainStepParts:
  """The steps of a validated `cfg` on `mesh`; `entropy_cfg`: the in-graph entropy model's, when it has one.

  Nothing is allocated: the state exists only as shapes, so the mesh may be made of devices this process cannot
  run on (a TPU topology description, for ahead-of-time compiles).
  """
  rules = sharding.logical_axis_rules_from_config(cfg.mesh, mesh)
  shards = sharding.num_batch_shards(mesh)
  if cfg.global_batch_size % shards:
    raise ValueError(
        f"config.global_batch_size={cfg.global_batch_size} is not divisible by the {shards} batch "
        f"shards of mesh {dict(mesh.shape)} (data x fsdp)"
    )
  model_cfg = train_config.model_config(cfg)
  patch_cfg = train_config.patching_config(cfg) if isinstance(model_cfg, BLTConfig) else None
  sc = steps.StepConfig(model_cfg, patch_cfg, train_config.max_patches(cfg) if patch_cfg else 0, entropy_cfg)
  schedule = optimizer_lib.lr_schedule(cfg.optimizer, cfg.num_steps)
  tx = optimizer_lib.make_optimizer(cfg.optimizer, cfg.num_steps)
  init_fn = steps.make_init_fn(sc, tx, jax.random.PRNGKey(cfg.seed))
  abstract = jax.eval_shape(init_fn)
  state_shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  batch_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
  eval_sharding = sharding.data_sharding(mesh)
  rep = sharding.replicated(mesh)
  train_step = jax.jit(
      steps.make_train_step(sc, tx, schedule, eval_sharding, state_shardings.params, rules),
      in_shardings=(state_shardings, batch_sharding, rep),
      out_shardings=(state_shardings, rep),
      donate_argnums=0,
  )
  eval_step = jax.jit(
      steps.make_eval_step(sc, eval_sharding, rules),
      in_shardings=(state_shardings.params, eval_sharding, rep),
      out_shardings=rep,
  )
  return TrainStepParts(
      sc, rules, schedule, tx, init_fn, abstract, state_shardings, batch_sharding, eval_sharding, train_step, eval_step
  )


@functools.lru_cache(maxsize=None)
def _stacker(out_sharding):
  return jax.jit(lambda *leaves: jnp.stack(leaves), out_shardings=out_sharding)


@functools.lru_cache(maxsize=None)
def _splitter(n: int, out_sharding):
  return jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=(out_sharding,) * n)


def restack_live(tree, params_like, model, stacked: bool, free: bool):
  """`layer_stacking.restack` of live sharded arrays, one weight at a time, placed as the layout's shardings place
  them (a stacked weight: its layers' spec behind an unsharded layer axis, `sharding.fit_spec_to_shape`).

  With `free`, every input array is deleted as soon as its converted copy exists, so converting a whole train state
  needs one weight's worth of memory beyond it (a jit of the whole conversion would hold both layouts at once).
  """

  def spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))

  def stack(*leaves):
    out = _stacker(NamedSharding(leaves[0].sharding.mesh, PartitionSpec(None, *spec(leaves[0]))))(*leaves)
    if free:
      for leaf in leaves:
        leaf.delete()
    return out

  def split(x, n):
    out = list(_splitter(n, NamedSharding(x.sharding.mesh, PartitionSpec(*spec(x)[1:])))(x))
    if free:
      x.delete()
    return out

  return layer_stacking.restack(tree, params_like, model, stacked, stack=stack, split=split)


class Trainer:
  """Builds everything from a config once; `run()` trains to `num_steps`, resuming if a checkpoint exists."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str):
    _leave_sigterm_to_the_trainer()
    sharding.maybe_initialize_distributed(cfg.mesh)
    cfg = copy.deepcopy(cfg)  # init_from rewrites the model section; the caller's config stays as it was
    self.init_from = find_init_checkpoint(cfg.init_from) if cfg.init_from else None
    if self.init_from is not None:
      changes = train_config.apply_checkpoint_config(cfg, self.init_from.meta, self.init_from.entropy_model)
      _say(
          f"init_from {self.init_from.path}: its settings replace the config's"
          + (
              "".join(f"\n  {field}: {old!r} -> {new!r}" for field, old, new in changes)
              if changes
              else " (they already match)"
          )
      )
    train_config.validate(cfg)
    self.cfg, self.workdir = cfg, paths.resolve(workdir)
    self.mesh = sharding.make_mesh(cfg.mesh)
    entropy_cfg = self.entropy_params = params = None
    if uses_entropy_model(cfg):  # else batches carry stored entropies, or patching needs no model
      entropy_cfg, params = load_entropy_model(cfg.entropy_checkpoint, run=cfg)
      params = layer_stacking.to_run_layout(params, entropy_cfg)  # stacked once here, not in every step
      self.entropy_params = jax.device_put(params, sharding.replicated(self.mesh))
    self.checkpointer = ckpt_lib.Checkpointer(
        self.workdir,
        save_interval_steps=cfg.checkpoint_every,
        max_to_keep=cfg.keep_checkpoints,
        async_checkpointing=cfg.async_checkpointing,
    )
    fit_patching_threshold(cfg, self.checkpointer, entropy_cfg, params)  # before the steps: it is static in them
    built = build_train_step(cfg, self.mesh, entropy_cfg)
    self.rules, self.sc, self.schedule, self.tx = built.rules, built.sc, built.schedule, built.tx
    self._init_fn, self._abstract, self.state_shardings = built.init_fn, built.abstract_state, built.state_shardings
    self.train_step, self.eval_step = built.train_step, built.eval_step
    self.data_index, self.data_count = sharding.process_data_shard(self.mesh)
    self.seq_len = cfg.seq_len
    self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=cfg.num_steps)
    self.history: list = []  # (step, metrics dict) of every logged step, for tests and notes
    self.state = None  # the final train state once `run()` returns
    self._eval_iterator = None
    self.bad_records = 0  # training records skipped (data.on_bad_record="skip"), known once the data is read
    self.evaluates = data_lib.has_validation(cfg.data)
    if not self.evaluates:
      _say("no validation data (data.validation_fraction=0 and no data.validation_sources): evaluation is off")
    self.flops_per_byte = self._flops_per_byte(4.5)
    self._compile_s: Optional[float] = None
    self.peak_flops, peak_source = flops_lib.peak_flops(jax.devices())
    _say(f"MFU is measured against {self.peak_flops / 1e12:.4g} TFLOP/s: {peak_source}")
    if self.sc.is_blt and self.sc.entropy_model is not None:
      # The patcher's forward runs in every step, over every chip's rows, but is not the model's FLOPs (flops.py).
      patcher = flops_lib.entropy_model_train_flops_per_byte(self.sc.entropy_model, self.seq_len) / 3
      _say(
          f"FLOPs per byte: model {self.flops_per_byte:.4g} (at 4.5 bytes per patch, what MFU counts), in-graph "
          f"entropy model {patcher:.4g} more ({patcher / self.flops_per_byte:.1%}; data.entropy_store removes it)"
      )
    self.stop_request = StopRequest(self.mesh)
    profile_dir = self.workdir / "profile"
    if jax.process_count() > 1:  # hosts of one machine would write over each other's trace files
      profile_dir = profile_dir / f"process_{jax.process_index()}"
    self.profile = Profile(cfg.profile_steps, profile_dir)

  def _flops_per_byte(self, mean_patch_length: float) -> float:
    if self.sc.is_blt:
      return flops_lib.blt_train_flops_per_byte(self.sc.model, self.seq_len, mean_patch_length)
    return flops_lib.entropy_model_train_flops_per_byte(self.sc.model, self.seq_len)

  def _row_patcher(self):
    """With `patching.rows="patches"`, the loader's patcher: the step's rule and threshold (calibrated ones too)."""
    if not self.sc.is_blt or self.cfg.patching.get("rows", "bytes") != "patches":
      return None
    return patch_rows.RowPatcher(self.sc.patching.patch_kwargs(), self.sc.max_patches, self.cfg.seq_len)

  def _initial_state(self):
    """(state, data iterator, start step): the newest readable checkpoint, else init_from's params, else fresh."""
    cfg = self.cfg
    iterator = data_lib.make_train_iterator(
        cfg.data,
        cfg.seq_len,
        cfg.global_batch_size,
        cfg.seed,
        process_index=self.data_index,
        process_count=self.data_count,
        row_patcher=self._row_patcher(),
    )
    self.bad_records = int(getattr(iterator, "bad_records", 0))
    target = sharding.abstract_with_shardings(self._abstract, self.state_shardings)
    newest = self.checkpointer.restore_newest_readable(
        target, cfg.checkpoint_on_damaged, warn=self._warn, other_layouts=self._other_layouts()
    )
    if newest is not None:
      step, state, data_state, _ = newest
      if data_state is not None:
        iterator.set_state(data_state)
      log.info("resumed from step %d of %s", step, self.workdir)
      _say(
          f"resumed from checkpoint step {step} in {self.workdir}"
          + (f" (init_from {self.init_from.path} is not loaded: resuming wins)" if self.init_from else "")
      )
      return state, iterator, step
    if self.init_from is not None:
      return self._state_from_init_checkpoint(), iterator, 0
    state = jax.jit(lambda: _unbox(self._init_fn()), out_shardings=self.state_shardings)()
    return state, iterator, 0

  @property
  def _stacked(self) -> bool:
    """Whether this run keeps its scanned stacks stacked in the train state (`scan_layers`)."""
    return layer_stacking.uses_stacked_layout(self.sc.model)

  def _layout(self, stacked: bool):
    """(abstract boxed state, its shardings) with the model's scannable stacks stacked, or per-layer.

    The run's own layout is `self._abstract` (stacked with `scan_layers`); this gives either, for what is read or
    written in the other: checkpoints of the other layout, `init_from` and the export (per-layer on disk).
    """
    model = self.sc.model
    abstract = jax.eval_shape(lambda s: layer_stacking.restack(s, s.params, model, stacked), self._abstract)
    return abstract, sharding.logical_to_shardings(abstract, self.mesh, self.rules)

  def _other_layouts(self):
    """The param layout this run does not use, which its checkpoints may still be in (converted on restore)."""
    model, stacked = self.sc.model, self._stacked
    abstract, shardings = self._layout(not stacked)
    if jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(self._abstract):
      return ()
    run_shardings = self.state_shardings

    def convert(state):
      return jax.device_put(restack_live(state, state.params, model, stacked, free=True), run_shardings)

    names = " and ".join(
        f"{'/'.join(path + (layer_stacking.stacked_name(prefix),))}" for path, prefix in layer_stacking.stackable(model)
    )
    name = (
        f"per-layer params ({names}_0 ...; written without scan_layers)"
        if stacked
        else f"stacked params ({names} with a leading layer axis; written with scan_layers)"
    )
    return (ckpt_lib.OtherLayout(name, sharding.abstract_with_shardings(abstract, shardings), convert),)

  def _per_layer_params(self):
    """Abstract params with shardings in the per-layer layout, the one of `save_params` dirs (`init_from`)."""
    if not self._stacked:
      return sharding.abstract_with_shardings(self._abstract.params, self.state_shardings.params)
    abstract, shardings = self._layout(False)
    return sharding.abstract_with_shardings(abstract.params, shardings.params)

  def _state_from_init_checkpoint(self):
    """Step 0 with init_from's params, read shard by shard onto the mesh, and a fresh optimizer state.

    `init_from` is per-layer on disk: it is read in that layout, then converted to the run's."""
    path = self.init_from.path
    per_layer = self._per_layer_params()
    try:
      params, _ = ckpt_lib.load_params(path, per_layer)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"init_from {path}: its params do not load into the model its {ckpt_lib.CONFIG_FILE} "
          f"describes ({ckpt_lib.short_reason(e)})"
      ) from None
    params = jax.device_put(
        restack_live(params, params, self.sc.model, self._stacked, free=True), self.state_shardings.params
    )
    fresh = jax.jit(
        lambda p: steps.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p)),
        in_shardings=(self.state_shardings.params,),
        out_shardings=self.state_shardings,
        donate_argnums=0,
    )
    _say(f"initialised params from {path} (step 0, fresh optimizer state)")
    return fresh(params)

  def _warn(self, message: str) -> None:
    if jax.process_index() == 0:
      log.warning(message)

  def evaluate(self, params) -> Dict[str, float]:
    """Validation metrics of `params` (none when the config holds out no validation data)."""
    cfg = self.cfg
    if not self.evaluates:
      return {}
    if self._eval_iterator is None:  # re-iterable; building it counts every validation token, so only once
      self._eval_iterator = data_lib.make_eval_iterator(
          cfg.data,
          cfg.seq_len,
          cfg.global_batch_size,
          process_index=self.data_index,
          process_count=self.data_count,
          row_patcher=self._row_patcher(),
      )
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
    """Trains to `num_steps` (or until SIGTERM); returns start/final step, history, final metrics, preempted and
    checkpoint_step (the newest checkpoint on disk at the end, or None)."""
    try:
      return self._run()
    finally:
      self.profile.close()
      self.stop_request.uninstall()

  def _run(self) -> Dict[str, Any]:
    cfg = self.cfg
    state, iterator, step = self._initial_state()
    start_step = step
    if self.bad_records:  # the log named them at start-up; a metric too, beside the run's curves
      self.writer.write_tensorboard(step, {"data/bad_records": self.bad_records})
    if step == 0 and self.evaluates:
      initial = self.evaluate(state.params)
      self.writer.write_scalars(0, initial)
      self.history.append((0, initial))
    window = dict(t=time.perf_counter(), steps=0)
    metrics: Dict[str, Any] = {}
    preempted = False
    while step < cfg.num_steps:
      batches = [next(iterator) for _ in range(cfg.grad_accum_steps)]
      arrays = _stack_to_global(batches, self.mesh)
      self.profile.before_step(step + 1)
      if step == start_step:
        state, metrics = self._first_step(state, arrays)
        # Only now does SIGTERM wait for a step boundary: during start-up (a compile can outlast a preemption's
        # grace period) it ends the process at once, and the checkpoints on disk are all there is to keep.
        self.stop_request.install()
      else:
        state, metrics = self.train_step(state, arrays, self.entropy_params)
      step += 1
      self.profile.after_step(step, state)
      is_log = step % cfg.log_every == 0 or step == cfg.num_steps
      window["steps"] += 1
      if is_log or self.sc.is_blt and cfg.patching.on_overflow == "error":
        self._check(jax.device_get(metrics), step, state)
      if is_log:
        self._log_train(step, jax.device_get(metrics), window)
      if self.evaluates and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.num_steps):
        val = self.evaluate(state.params)
        self.writer.write_scalars(step, val)
        self.history.append((step, val))
      stop = self.stop_request.should_stop() and step < cfg.num_steps
      if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or stop:
        self._check(jax.device_get(metrics), step, state)  # never checkpoint a state that stopped updating
        self.checkpointer.save(step, state, iterator.get_state(), self._meta(step), force=True)
      if stop:
        preempted = True
        break
    self.checkpointer.wait_until_finished()
    self.state = state
    if not preempted:
      self._export(state.params)
    self.writer.flush()
    return dict(
        start_step=start_step,
        final_step=step,
        history=self.history,
        preempted=preempted,
        checkpoint_step=self.checkpointer.latest_step(),
        final_metrics={k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {},
    )

  def _first_step(self, state, arrays):
    """The run's first step, timed: its compile time is logged (and written as `compile_s`)."""
    before = _COMPILE_SECONDS[0]
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(self.train_step(state, arrays, self.entropy_params))
    total, compile_s = time.perf_counter() - t, _COMPILE_SECONDS[0] - before
    _say(f"first step: {total:.1f} s, of which {compile_s:.1f} s tracing and compiling the train step")
    self._compile_s = compile_s  # joins the next metrics line
    return state, metrics

  def _log_train(self, step: int, host, window) -> None:
    cfg = self.cfg
    now = time.perf_counter()
    elapsed = max(now - window["t"], 1e-9)
    rows = cfg.global_batch_size * cfg.grad_accum_steps
    # The step's counted bytes (every row position in byte rows; fewer where a patch budget ends rows), the last
    # step's count standing for the window's.
    step_bytes = float(host["bytes"])
    rows_bytes = step_bytes * window["steps"]
    line = dict(
        loss=host["loss"], bpb=host["bpb"], grad_norm=host["grad_norm"], lr=host["lr"], bytes_per_s=rows_bytes / elapsed
    )
    if self.sc.is_blt:
      num_patches = max(float(host["num_patches"]), 1.0)
      mean_patch = (step_bytes + rows) / num_patches  # a row of k bytes is patched over k + 1 positions
      line.update(
          mean_patch_length=mean_patch,
          patches_per_s=rows_bytes / elapsed / mean_patch,
          overflow_rows=host["overflow_rows"],
          slot_fill=num_patches / (rows * self.sc.max_patches),  # the global stack's slots that hold a patch
      )
      if cfg.patching.get("rows", "bytes") == "patches":
        line["row_fill"] = step_bytes / (rows * cfg.seq_len)  # the local models' positions that hold a byte
      self.flops_per_byte = self._flops_per_byte(mean_patch)
    line["mfu"] = flops_lib.mfu(self.flops_per_byte, line["bytes_per_s"], self.peak_flops)
    if self._compile_s is not None:
      line["compile_s"], self._compile_s = self._compile_s, None
    self.writer.write_scalars(step, line)
    self.history.append((step, {k: float(v) for k, v in line.items()}))
    window.update(t=time.perf_counter(), steps=0)

  def _check(self, host_metrics, step: int, state) -> None:
    # A step with a non-finite loss leaves `state.step` behind, so steps skipped between checks are caught too.
    applied = int(jax.device_get(state.step))
    if not bool(host_metrics["finite"]) or applied != step:
      self.checkpointer.wait_until_finished()
      if bool(host_metrics["finite"]):
        what = (
            f"{step - applied} step(s) before step {step} had a non-finite loss or gradient (not logged: "
            f"log_every={self.cfg.log_every})"
        )
      else:
        what = (
            f"non-finite loss or gradient at step {step} (loss={float(host_metrics['loss'])}, grad_norm="
            f"{float(host_metrics['grad_norm'])})"
        )
      raise TrainingError(
          f"{what}; those updates were not applied and the last good checkpoint "
          f"(step {self.checkpointer.latest_step()}) in {self.workdir} is intact. Lower optimizer.lr or check data."
      )
    if self.sc.is_blt and self.cfg.patching.on_overflow == "error" and float(host_metrics["overflow_rows"]) > 0:
      self.checkpointer.wait_until_finished()
      raise TrainingError(
          f"step {step}: {int(host_metrics['overflow_rows'])} row(s) needed more than patching.max_patches="
          f"{self.sc.max_patches} patches; raise it or set patching.on_overflow='count'"
      )

  def _meta(self, step: int) -> dict:
    return dict(step=step, config=json.loads(self.cfg.to_json_best_effort()))

  def _export(self, params) -> None:
    model_type = "blt" if self.sc.is_blt else "entropy_model"
    meta = {"format": "blt_jax", "model_type": model_type, "model": self.sc.model.to_dict()}
    if self.sc.patching is not None:
      meta["patching"] = self.sc.patching.to_dict()
    export = self.workdir / "export"
    if layer_stacking.is_stacked(params, self.sc.model):  # the export is per-layer, as every reader expects
      params = restack_live(params, params, self.sc.model, stacked=False, free=False)
    ckpt_lib.save_params(export, params, meta, overwrite=True)
    if self.entropy_params is not None:  # the export scores and generates on its own (blt_jax.loading)
      ckpt_lib.save_params(
          export / "entropy_model",
          layer_stacking.unstack_params(self.entropy_params, self.sc.entropy_model),
          {"format": "blt_jax", "model_type": "entropy_model", "model": self.sc.entropy_model.to_dict()},
          overwrite=True,
      )

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()


def _unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  return nn.meta.unbox(tree)


def _leave_sigterm_to_the_trainer() -> None:
  """jax.distributed's preemption notifier would take SIGTERM over from start-up on, and swallow one that arrives
  before the trainer's handler is installed; without it such a SIGTERM ends the process as usual (nothing to save)."""
  try:
    jax.config.update("jax_enable_preemption_service", False)
  except (AttributeError, KeyError, ValueError):  # a jax without that option
    pass


def train(cfg: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  trainer = Trainer(cfg, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()


def _command_line_overrides(argv: List[str]):
  """(config file path or None, dotted keys of the `--config.a.b[=value]` overrides) in `argv`."""
  path, keys = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      keys.append(arg[len("--config.") :].split("=", 1)[0])
  return path, keys


def unknown_override_error(argv: List[str]) -> Optional[str]:
  """One line naming the first `--config.KEY` that the config file does not have (and the closest key), or None."""
  path, keys = _command_line_overrides(argv)
  if not path or not keys:
    return None
  try:
    cfg = train_config.load_config_file(path)
  except Exception:  # pylint: disable=broad-except  (the flag parser reports an unreadable config file)
    return None
  for key in keys:
    error = train_config.unknown_key_error(cfg, key)
    if error:
      return error
  return None


# absl's text for a value that does not parse: "flag --config.seq_len=abc: invalid literal for int() ...".
_BAD_VALUE = re.compile(r"flag --config\.([\w.]+)=(.*?): (.*)", re.S)


def flag_error(e: Exception) -> str:
  """A one-line error for what the flag parser raised, naming the config key when there is one."""
  match = _BAD_VALUE.match(str(e))
  if match:
    key, value, reason = match.groups()
    return f"bad value {value!r} for config key {key!r}: {reason.strip().splitlines()[0]}"
  return f"bad command line: {type(e).__name__}: {e}"


def parse_flags(argv: List[str]) -> None:
  """Parses `argv` into the absl flags the caller defined (a `--config` file among them); an unknown
  `--config.KEY`, a value that does not parse or an unreadable config file exits with one `error:` line."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  unknown = unknown_override_error(argv)  # ml_collections would only say AttributeError: 'key'
  if unknown:
    raise SystemExit(f"error: {unknown}")
  try:
    flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config file that failed to load only raises when first used
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"error: {flag_error(e)}") from None


def end_of_run_line(summary: Dict[str, Any], workdir) -> str:
  """The CLI's last line for a `Trainer.run()` summary; it names a saved checkpoint only if one is on disk."""
  step, saved = summary["final_step"], summary["checkpoint_step"]
  if not summary["preempted"]:
    return f"done: steps {summary['start_step']} -> {step}; export in {workdir / 'export'}"
  if saved == step:
    return (
        f"stopped by SIGTERM after step {step}: checkpoint saved in {workdir / 'checkpoints'}; re-run the same "
        f"command to resume"
    )
  return (
      f"stopped by SIGTERM after step {step}, but no checkpoint of step {step} was saved in "
      f"{workdir / 'checkpoints'}; re-running the same command resumes from "
      f"{'the start' if saved is None else f'step {saved}'}"
  )


def main(argv=None) -> None:
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = sys.argv if argv is None else argv
  config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and the final export go here.")
  parse_flags(argv)
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if cfg is None or workdir is None:
    raise SystemExit("usage: python -m blt_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value]")
  logging.basicConfig(level=logging.WARNING)
  try:
    summary = train(cfg, workdir)
  except (
      ValueError,
      FileNotFoundError,
      TrainingError,
      ckpt_lib.DamagedCheckpointError,
      ckpt_lib.CheckpointReadError,
  ) as e:
    raise SystemExit(f"error: {e}") from None
  _say(end_of_run_line(summary, paths.resolve(workdir)))


if __name__ == "__main__":
  main()
