"""The trainer end to end on a micro BLT: meshes, resume, gradient accumulation, guards, entropy patching, CLI,
multi-process training, preemption (SIGTERM), damaged checkpoints, profiling and fine-tuning from a converted
checkpoint.

Every run uses configs/tiny.py shrunk further (`MICRO`: seq_len 64, 8 rows, one layer per stage, fp32) on a few
stdlib files copied to a tmp corpus. XLA compilation dominates the time, so the module turns on a persistent
compilation cache: runs with the same mesh and shapes (most use (data, fsdp, tensor) = (2, 2, 2), the CLI run
included) compile their programs once.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P

import helpers
from blt_jax import checkpoint as ckpt_lib
from blt_jax import convert, entropy_store, flops, patching, train
from blt_jax.convert import safetensors_io
from blt_jax.entropy_model import compute_entropies
from blt_jax.loss import cross_entropy_sum
from blt_jax.model import BLT, init_blt

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multiprocess_train_driver.py"


def _load_module(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


driver = _load_module("multiprocess_train_driver", DRIVER)
read_scalars = _load_module("test_metrics_events", ROOT / "tests" / "test_metrics.py")._read_scalars

# The same fp32 run on different meshes differs only in reduction order: measured <= 1.2e-7 relative on loss and
# grad norm over 3 steps, so 1e-5 leaves a wide margin while still catching any real divergence.
MESH_RTOL = 1e-5
# A resumed run replays the same compiled programs on the same data from exactly restored arrays.
RESUME_RTOL = 1e-6

MICRO = {
    "model.dim_local_encoder": 32,
    "model.dim_local_decoder": 32,
    "model.n_heads_local_encoder": 2,
    "model.n_heads_local_decoder": 2,
    "model.n_layers_local_decoder": 1,
    "model.dim_global": 64,  # = cross_attn_k * dE: no global input projection, as in tiny
    "model.n_layers_global": 1,
    "model.n_heads_global": 2,
    "model.cross_attn_nheads": 2,
    "model.encoder_hash_byte_group_size": (3, 4),
    "model.encoder_hash_byte_group_vocab": 512,
    "model.multiple_of": 32,
    "model.max_seqlen": 128,
    "model.max_encoder_seq_length": 128,
    "model.local_attention_window_len": 32,
    "seq_len": 64,
    "global_batch_size": 8,
    "num_steps": 2,
    "log_every": 1,
    "eval_batches": 1,
    # Constant lr from the first update: every step changes the params, and the schedule (hence the compiled
    # step) does not depend on num_steps, so runs of different lengths share programs.
    "optimizer.scheduler": "constant",
    "data.num_threads": 1,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
}
CORPUS_FILES = ("bisect.py", "heapq.py", "shlex.py", "string.py", "textwrap.py", "json/encoder.py")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent XLA cache for this module only (restored afterwards); returns its env for subprocesses.

  Set BLT_JAX_TEST_XLA_CACHE to a directory to keep the cache across sessions (reruns then skip most compiles).
  """
  path = os.environ.get("BLT_JAX_TEST_XLA_CACHE") or str(tmp_path_factory.mktemp("xla_cache"))
  settings = {
      "jax_compilation_cache_dir": path,
      "jax_persistent_cache_min_compile_time_secs": 0.0,
      "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  old = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # jax decides once per process whether the cache is on
  yield {name.upper(): str(value) for name, value in settings.items()}
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Data overrides: six stdlib modules as .txt training documents, and a 300-byte validation document.

  The validation set is 5 windows of 64 bytes, so an 8-row eval batch has 3 padding rows.
  """
  root = tmp_path_factory.mktemp("corpus")
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  (root / "train").mkdir()
  for name in CORPUS_FILES:
    shutil.copy(stdlib / name, root / "train" / (pathlib.Path(name).stem + ".txt"))
  (root / "val.txt").write_bytes((stdlib / "this.py").read_bytes()[:300])
  return {"data.sources": (str(root / "train" / "*.txt"),), "data.validation_sources": (str(root / "val.txt"),)}


@pytest.fixture(scope="module")
def micro(corpus):
  """`micro(overrides)`: a fresh micro config."""

  def make(overrides=None):
    return driver.apply_overrides(driver.load_config("tiny"), {**MICRO, **corpus, **(overrides or {})})

  return make


class _Tap:
  """Wraps the train iterator: records each batch's tokens (or whole batches); can crash, corrupt the n-th one or
  send this process a SIGTERM while fetching it."""

  def __init__(self, inner, record, fail_at=None, nan_at=None, whole=False, sigterm_at=None):
    self.inner, self.record, self.fail_at, self.nan_at, self.whole = inner, record, fail_at, nan_at, whole
    self.sigterm_at = sigterm_at
    self.calls = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.calls += 1
    if self.calls == self.fail_at:
      raise RuntimeError(f"simulated crash while loading batch {self.calls}")
    if self.calls == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    batch = next(self.inner)
    self.record.append({k: v.copy() for k, v in batch.items()} if self.whole else batch["tokens"].copy())
    if self.calls == self.nan_at:  # NaN counted bytes -> NaN loss, without changing any shape or dtype
      batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


@contextlib.contextmanager
def tapped(record, **kwargs):
  original = train.data_lib.make_train_iterator
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.data_lib, "make_train_iterator", lambda *a, **k: _Tap(original(*a, **k), record, **kwargs))
    yield


def run(cfg, workdir):
  """(summary, trainer) of a full `Trainer.run()`; `trainer.state` is the final state."""
  trainer = train.Trainer(cfg, str(workdir))
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  return summary, trainer


def train_rows(summary):
  """{step: train metrics} of the logged steps (eval rows left out)."""
  return {step: m for step, m in summary["history"] if "loss" in m}


def as_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_close(a, b, rtol, atol=0.0):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def straight(micro, tmp_path_factory):
  """6 steps in one go on mesh (2, 2, 2), checkpoint every 3: the reference for the resume tests."""
  record = []
  with tapped(record):
    summary, trainer = run(micro({"num_steps": 6, "checkpoint_every": 3}), tmp_path_factory.mktemp("straight"))
  return dict(summary=summary, trainer=trainer, params=as_numpy(trainer.state.params), batches=record)


def test_first_step_logs_its_compile_time_and_mfu_has_a_measured_cpu_peak(straight):
  """CPU has no vendor peak: MFU is against a matmul rate measured at start-up, so it is never a constant 0."""
  rows = train_rows(straight["summary"])
  first, *rest = sorted(rows)
  assert rows[first]["compile_s"] > 0 and all("compile_s" not in rows[s] for s in rest)
  assert straight["trainer"].peak_flops > 1e8  # any CPU multiplies faster than 0.1 GFLOP/s
  for step in rows:
    assert 0 < rows[step]["mfu"] < 1, (step, rows[step]["mfu"])
    expected = straight["trainer"].flops_per_byte * rows[step]["bytes_per_s"] / straight["trainer"].peak_flops
    np.testing.assert_allclose(rows[step]["mfu"], expected, rtol=0.2)  # flops_per_byte follows the patch length


# ---------------------------------------------------------------------------------------------------------------
# 1. Meshes.


def _leaf(tree, *keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_meshes_give_same_losses_and_params_are_sharded(micro, straight, tmp_path):
  ref = train_rows(straight["summary"])
  for shape in ((8, 1, 1), (1, 8, 1)):
    cfg = micro({"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2], "num_steps": 3})
    summary, trainer = run(cfg, tmp_path / "x".join(map(str, shape)))
    got = train_rows(summary)
    assert sorted(got) == [1, 2, 3]
    for step in got:
      for key in ("loss", "grad_norm", "mean_patch_length"):
        np.testing.assert_allclose(got[step][key], ref[step][key], rtol=MESH_RTOL, err_msg=f"{shape} step {step} {key}")
    w1 = _leaf(trainer.state.params, "global_transformer", "layers_0", "feed_forward", "w1", "kernel")
    if shape == (1, 8, 1):  # ("embed", "mlp") -> ("fsdp", "tensor"), tensor of size 1
      assert w1.sharding.spec == P("fsdp", "tensor")
      assert w1.addressable_shards[0].data.shape == (w1.shape[0] // 8, w1.shape[1])
    else:  # pure data parallelism: every device holds the whole kernel
      assert w1.addressable_shards[0].data.shape == w1.shape
    evals = [(s, m) for s, m in summary["history"] if "val_loss" in m]
    ref_evals = [(s, m) for s, m in straight["summary"]["history"] if "val_loss" in m]
    np.testing.assert_allclose(evals[0][1]["val_loss"], ref_evals[0][1]["val_loss"], rtol=MESH_RTOL)
    np.testing.assert_allclose(evals[0][1]["val_bytes_per_patch"], ref_evals[0][1]["val_bytes_per_patch"])

  # The eval batch has 3 padding rows (see `corpus`); their patches must not count.
  for step, m in straight["summary"]["history"]:
    if "val_bytes_per_patch" in m:
      assert 2.0 < m["val_bytes_per_patch"] < 16.0, (step, m)

  state = straight["trainer"].state  # mesh (2, 2, 2)
  params = state.params
  ffn = _leaf(params, "global_transformer", "layers_0", "feed_forward")
  w1, w2 = ffn["w1"]["kernel"], ffn["w2"]["kernel"]
  assert w1.sharding.spec == P("fsdp", "tensor")  # ("embed", "mlp")
  assert w2.sharding.spec == P("tensor", "fsdp")  # ("mlp", "embed")
  assert w1.addressable_shards[0].data.shape == (w1.shape[0] // 2, w1.shape[1] // 2)
  table = params["hash_embeddings"]["embedding"]  # ("hash_tables", "hash_vocab", "embed"): rows over fsdp x tensor
  assert table.sharding.spec == P(None, ("fsdp", "tensor"), None)
  assert table.addressable_shards[0].data.shape == (2, 512 // 4, 32)
  scale = params["global_transformer"]["layers_0"]["ffn_norm"]["scale"]
  assert scale.sharding.spec in (P(), P(None))
  # Adam moments follow their params.
  mu_w1 = [
      x
      for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if "mu" in jax.tree_util.keystr(path)
      and "global_transformer']['layers_0']['feed_forward']['w1'" in jax.tree_util.keystr(path)
  ]
  assert len(mu_w1) == 1 and mu_w1[0].sharding.spec == P("fsdp", "tensor")
  # Overall one device holds well under half of the params (only norms and tiny vectors are replicated).
  total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  per_device = sum(x.addressable_shards[0].data.size for x in jax.tree_util.tree_leaves(params))
  assert per_device < total / 3


# ---------------------------------------------------------------------------------------------------------------
# 2. Resume.


def _assert_matches_straight(straight, rows, steps_, params=None):
  ref = train_rows(straight["summary"])
  assert sorted(rows) == list(steps_)
  for step in steps_:
    np.testing.assert_allclose(rows[step]["loss"], ref[step]["loss"], rtol=RESUME_RTOL, err_msg=f"step {step}")
    np.testing.assert_allclose(rows[step]["grad_norm"], ref[step]["grad_norm"], rtol=RESUME_RTOL)
  if params is not None:
    assert_trees_close(params, straight["params"], rtol=RESUME_RTOL, atol=1e-7)


def test_stop_and_resume_equals_straight_run(micro, straight, tmp_path):
  record = []
  with tapped(record):
    first, _ = run(micro({"num_steps": 3, "checkpoint_every": 3}), tmp_path)
    second, trainer = run(micro({"num_steps": 6, "checkpoint_every": 3}), tmp_path)
  assert (first["start_step"], first["final_step"]) == (0, 3)
  assert (second["start_step"], second["final_step"]) == (3, 6)
  _assert_matches_straight(straight, train_rows(first), [1, 2, 3])
  _assert_matches_straight(straight, train_rows(second), [4, 5, 6], as_numpy(trainer.state.params))
  assert int(trainer.state.step) == 6
  # Data order: the resumed run read batches 4..6 of the straight run, not batches 1..3 again.
  assert len(record) == 6
  for got, want in zip(record, straight["batches"]):
    np.testing.assert_array_equal(got, want)


def test_crash_keeps_last_checkpoint_and_rerun_resumes(micro, straight, tmp_path):
  cfg = micro({"num_steps": 6, "checkpoint_every": 3})
  with tapped([], fail_at=4), pytest.raises(RuntimeError, match="simulated crash"):
    train.train(cfg, str(tmp_path))
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == (3,)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
  record = []
  with tapped(record):
    summary, trainer = run(micro({"num_steps": 6, "checkpoint_every": 3}), tmp_path)
  assert summary["start_step"] == 3
  _assert_matches_straight(straight, train_rows(summary), [4, 5, 6], as_numpy(trainer.state.params))
  assert len(record) == len(straight["batches"][3:]) == 3  # zip would pass on an empty record
  for got, want in zip(record, straight["batches"][3:]):
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# 3. Gradient accumulation.


def test_grad_accumulation_is_exact(micro, straight, tmp_path):
  # The trainer's own jitted step on mesh (2, 2, 2): the [1, 8, L] program is the one `straight` compiled.
  trainer = train.Trainer(micro(), str(tmp_path))
  init = jax.jit(lambda: nn.meta.unbox(trainer._init_fn()), out_shardings=trainer.state_shardings)
  batch = next(train.data_lib.make_train_iterator(trainer.cfg.data, 64, 8, 0, process_index=0, process_count=1))
  # Unequal counted bytes per micro-batch: averaging per-micro-batch means would be wrong here.
  batch["loss_mask"][5:, 40:] = 0.0
  # [1, 8, L] (one micro-batch of 8 rows) vs [2, 4, L] (the same rows as two micro-batches of 4).
  one, m_one = trainer.train_step(init(), train._stack_to_global([batch], trainer.mesh), None)
  halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
  two, m_two = trainer.train_step(init(), train._stack_to_global(halves, trainer.mesh), None)
  trainer.close()
  m_one, m_two = jax.device_get(m_one), jax.device_get(m_two)
  assert bool(m_one["finite"]) and bool(m_two["finite"])
  assert float(m_one["bytes"]) == float(m_two["bytes"]) == 8 * 64 - 3 * 24
  assert float(m_one["num_patches"]) == float(m_two["num_patches"])
  np.testing.assert_allclose(m_two["loss"], m_one["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_two["grad_norm"], m_one["grad_norm"], rtol=1e-5)
  # Adam's first update is lr * g / (|g| + eps): entries with |g| within a few eps amplify fp32 summation-order
  # noise (4.8e-5 seen on one entry of w1), so params get an absolute tolerance of lr / 20 (1e-4): a real
  # disagreement moves entries by up to lr (2e-3) and shows in the loss, grad norm and moments checked here too.
  assert_trees_close(two.params, one.params, rtol=1e-5, atol=1e-4)
  assert_trees_close(two.opt_state, one.opt_state, rtol=1e-4, atol=1e-8)
  assert int(one.step) == int(two.step) == 1
  assert not np.allclose(
      np.asarray(one.params["local_decoder"]["output"]["kernel"]),
      np.asarray(init().params["local_decoder"]["output"]["kernel"]),
  )  # the update did happen


# ---------------------------------------------------------------------------------------------------------------
# 4. Guards.


def test_unknown_config_key_is_rejected(micro):
  cfg = micro()
  cfg.lock()  # as --config does
  with pytest.raises(AttributeError, match="nonexistent"):
    cfg.model.nonexistent = 1
  with pytest.raises(KeyError, match="nonexistent"):
    cfg.update_from_flattened_dict({"optimizer.nonexistent": 1})


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"patching.mode": "entropy"}, ValueError, "needs config.entropy_checkpoint"),
        ({"seq_len": 256}, ValueError, r"seq_len=256 exceeds model.max_encoder_seq_length=128"),
        ({"param_dtype": "bfloat16"}, ValueError, "param_dtype"),
        ({"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1}, ValueError, "must equal the number of devices"),
        ({"mesh.data": 3, "mesh.fsdp": -1, "mesh.tensor": 1}, ValueError, "does not divide the 8 available devices"),
        (
            {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1, "global_batch_size": 4},
            ValueError,
            r"global_batch_size=4 is not divisible by the 8 batch shards",
        ),
        ({"data.sources": ("{tmp}/nothing/*.txt",)}, ValueError, "matched no files"),
        ({"keep_checkpoints": 0}, ValueError, r"config.keep_checkpoints=0: must be >= 1"),
        (
            {"patching.mode": "entropy", "entropy_checkpoint": "{tmp}/no_such_model"},
            FileNotFoundError,
            "no_such_model.*no entropy model found",
        ),
    ],
)
def test_bad_setups_fail_at_start_up(micro, tmp_path, overrides, error, match):
  overrides = {
      k: tuple(x.format(tmp=tmp_path) for x in v)
      if isinstance(v, tuple)
      else v.format(tmp=tmp_path)
      if isinstance(v, str)
      else v
      for k, v in overrides.items()
  }
  cfg = micro(overrides)
  with pytest.raises(error, match=match):
    train.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro, straight, tmp_path):
  # Step 3 is not logged (log_every=2): its skipped update must still stop the run before step 4 is checkpointed.
  cfg = micro({"num_steps": 4, "checkpoint_every": 2, "log_every": 2})
  with tapped([], nan_at=3), pytest.raises(train.TrainingError) as info:
    train.train(cfg, str(tmp_path))
  message = str(info.value)
  assert "1 step(s) before step 4 had a non-finite loss" in message, message
  assert f"last good checkpoint (step 2) in {tmp_path} is intact" in message, message
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == (2,)

  # The checkpoint is intact: a rerun resumes from it and matches the straight run at step 3; then a NaN at the
  # logged step 4 stops it, naming that step.
  record = []
  trainer = train.Trainer(micro({"num_steps": 4, "checkpoint_every": 2, "log_every": 1}), str(tmp_path))
  try:
    with tapped(record, nan_at=2), pytest.raises(train.TrainingError) as info:
      trainer.run()
  finally:
    trainer.close()
  message = str(info.value)
  assert "non-finite loss or gradient at step 4 (loss=nan" in message, message
  assert "last good checkpoint (step 2)" in message, message
  _assert_matches_straight(straight, {s: m for s, m in trainer.history if "loss" in m}, [3])
  assert len(record) == len(straight["batches"][2:4]) == 2  # zip would pass on an empty record
  for got, want in zip(record, straight["batches"][2:4]):
    np.testing.assert_array_equal(got, want)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == (2,)


# ---------------------------------------------------------------------------------------------------------------
# 5. Entropy patching end to end.


def test_entropy_model_then_entropy_patched_blt(micro, corpus, tmp_path):
  ecfg = driver.apply_overrides(
      driver.load_config("entropy_tiny"),
      {
          **corpus,
          **{k: v for k, v in MICRO.items() if not k.startswith("model.")},
          "entropy_model.dim": 32,
          "entropy_model.n_layers": 1,
          "entropy_model.n_heads": 2,
          "entropy_model.multiple_of": 32,
          "entropy_model.max_seqlen": 128,
          "entropy_model.sliding_window": 32,
      },
  )
  summary = train.train(ecfg, str(tmp_path / "entropy"))
  assert summary["final_step"] == 2
  meta = json.loads((tmp_path / "entropy" / "export" / "config.json").read_text())
  assert meta["model_type"] == "entropy_model"

  cfg = micro(
      {
          "patching.mode": "entropy",
          "entropy_checkpoint": str(tmp_path / "entropy"),
          "patching.threshold": 2.0,
          "patching.max_patch_length": 8,
      }
  )
  summary = train.train(cfg, str(tmp_path / "blt"))
  rows = train_rows(summary)
  assert sorted(rows) == [1, 2]
  for m in rows.values():
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert 1.0 <= m["mean_patch_length"] <= 8.0
  assert json.loads((tmp_path / "blt" / "export" / "config.json").read_text())["patching"]["mode"] == "entropy"

  # The same BLT patched from entropies scored once and stored (no entropy model in the step).
  ent_cfg, ent_params = train.load_entropy_model(str(tmp_path / "entropy"))
  entropy_store.write_corpus_store(str(tmp_path / "store"), cfg.data, ent_params, ent_cfg)
  stored = micro(
      {
          "patching.mode": "entropy",
          "entropy_checkpoint": "",
          "data.entropy_store": str(tmp_path / "store"),
          "patching.threshold": 2.0,
          "patching.max_patch_length": 8,
      }
  )
  trainer = train.Trainer(stored, str(tmp_path / "blt_stored"))
  assert trainer.entropy_params is None
  try:
    rows = train_rows(trainer.run())
  finally:
    trainer.close()
  for m in rows.values():
    assert np.isfinite(m["loss"]) and 1.0 <= m["mean_patch_length"] <= 8.0


def test_in_graph_entropy_model_takes_the_runs_settings_not_its_checkpoints(micro, tmp_path, capsys):
  from blt_jax.config import EntropyModelConfig  # pylint: disable=g-import-not-at-top
  from blt_jax.entropy_model import init_entropy_model  # pylint: disable=g-import-not-at-top

  arch = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, multiple_of=32, max_seqlen=128, sliding_window=32)
  params = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(0), arch))
  # Trained in bf16, scanned, rematerialised, with a kernel this platform may not have: none of it is architecture.
  trained = {**arch.to_dict(), "dtype": "bfloat16", "scan_layers": True, "remat": True, "attention_impl": "splash"}
  ckpt_lib.save_params(
      tmp_path / "entropy", params, {"format": "blt_jax", "model_type": "entropy_model", "model": trained}
  )
  cfg = micro(
      {
          "patching.mode": "entropy",
          "entropy_checkpoint": str(tmp_path / "entropy"),
          "attention_impl": "dense",
          "compute_dtype": "bfloat16",
      }
  )
  trainer = train.Trainer(cfg, str(tmp_path / "run"))
  try:
    used = trainer.sc.entropy_model
    assert (used.dtype, used.scan_layers, used.remat, used.attention_impl) == ("float32", False, False, "dense")
    assert dataclasses.replace(used, attention_impl="auto") == arch  # the checkpoint's architecture, unchanged
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 256)
    got = compute_entropies(trainer.entropy_params, tokens, used)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, compute_entropies(params, tokens, arch), rtol=1e-5, atol=1e-5)
    # The patcher's cost, printed beside the model's: its forward per byte, which MFU does not count.
    patcher = flops.entropy_model_train_flops_per_byte(arch, cfg.seq_len) / 3
    model = flops.blt_train_flops_per_byte(trainer.sc.model, cfg.seq_len, 4.5)
    assert (
        f"FLOPs per byte: model {model:.4g} (at 4.5 bytes per patch, what MFU counts), in-graph entropy model "
        f"{patcher:.4g} more ({patcher / model:.1%}" in capsys.readouterr().out
    )
  finally:
    trainer.close()


def test_no_validation_data_means_no_evaluation(micro, tmp_path, capsys):
  cfg = micro({"data.validation_sources": (), "data.validation_fraction": 0.0, "num_steps": 1, "eval_every": 1})
  trainer = train.Trainer(cfg, str(tmp_path / "run"))
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  assert summary["final_step"] == 1 and not any("val_loss" in m for _, m in summary["history"])
  out = capsys.readouterr().out
  assert out.count("evaluation is off") == 1, out


def test_bad_records_stop_the_run_or_are_skipped_counted_and_logged(micro, corpus, tmp_path, caplog):
  from test_metrics import _read_scalars  # pylint: disable=g-import-not-at-top

  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text(
      "\n".join(
          [
              json.dumps({"text": "a good line " * 20}),
              "{not json",
              json.dumps({"content": "no text"}),
              json.dumps({"text": "another good one " * 20}),
          ]
      )
  )
  sources = tuple(corpus["data.sources"]) + (str(mixed),)
  trainer = train.Trainer(micro({"data.sources": sources}), str(tmp_path / "stop"))
  try:  # the default, "error": stops before the first step, naming the line
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: invalid JSON"):
      trainer.run()
  finally:
    trainer.close()
  cfg = micro({"data.sources": sources, "data.on_bad_record": "skip", "num_steps": 1, "eval_every": 100})
  trainer = train.Trainer(cfg, str(tmp_path / "skip"))
  try:
    with caplog.at_level("WARNING"):
      summary = trainer.run()
  finally:
    trainer.close()
  assert summary["final_step"] == 1 and trainer.bad_records == 2
  assert "skipped 2 bad record(s)" in caplog.text and "mixed.jsonl:3: missing text field 'text'" in caplog.text
  assert _read_scalars(tmp_path / "skip")["data/bad_records"] == [(0, 2.0)]


# ---------------------------------------------------------------------------------------------------------------
# 6. Command line.


def _flag(key, value):
  return f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"


def _cli(compile_cache):
  """(command prefix, env) for `python -m blt_jax.train` in a subprocess that reuses this module's XLA cache."""
  env = dict(os.environ, **compile_cache)  # XLA_FLAGS from conftest: the same 8 devices, so cached programs fit
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return [sys.executable, "-m", "blt_jax.train"], env


def test_cli_trains_and_rejects_unknown_keys(corpus, compile_cache, tmp_path):
  # Run from another directory with relative paths, as a user would (orbax itself refuses relative paths).
  workdir = tmp_path / "run"
  flags = [_flag(k, v) for k, v in {**MICRO, **corpus}.items()]
  python, env = _cli(compile_cache)
  config = os.path.relpath(ROOT / "configs" / "tiny.py", tmp_path)
  cmd = python + ["--config", config, "--workdir"]
  proc = subprocess.run(cmd + ["run"] + flags, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "done: steps 0 -> 2" in proc.stdout
  assert re.search(r"^step 2/2 \(100.0%\) \| elapsed [0-9hms]+ \| eta 0s \| loss ", proc.stdout, re.M), proc.stdout
  assert (workdir / "checkpoints" / "2").is_dir()
  meta = json.loads((workdir / "export" / "config.json").read_text())
  assert meta["model"]["dim_global"] == 64 and meta["model"]["encoder_hash_byte_group_size"] == [3, 4]
  assert list(workdir.glob("events.out.tfevents*"))

  bad = subprocess.run(
      cmd + ["bad", "--config.optimizer.nope=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
  )
  assert bad.returncode != 0
  assert bad.stderr.strip() == (
      "error: unknown config key 'optimizer.nope' (every field is listed in " "blt_jax/train_config.py)"
  ), bad.stderr
  assert not (tmp_path / "bad").exists()  # rejected while parsing flags, before anything is written

  # A damaged latest checkpoint with checkpoint_on_damaged='error': one line naming step and path, nothing moved.
  (workdir / "checkpoints" / "2" / "meta" / "metadata").write_text("{truncated")
  damaged = subprocess.run(
      cmd + ["run"] + flags + ["--config.num_steps=3", "--config.checkpoint_on_damaged=error"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert damaged.returncode != 0
  last = damaged.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f"error: checkpoint step 2 at {workdir / 'checkpoints' / '2'} is damaged: JSONDecodeError"
  ), damaged.stderr[-3000:]
  assert "Traceback" not in damaged.stderr
  assert (workdir / "checkpoints" / "2").is_dir()


def test_command_line_errors_name_the_key():
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  config = str(ROOT / "configs" / "tiny.py")
  argv = lambda *overrides: ["train", "--config", config, "--workdir", "w", *overrides]
  assert train.unknown_override_error(argv("--config.optimizer.lr=1e-3", "--config.model.dim_global=64")) is None
  assert train.unknown_override_error(argv("--config.nonexistent=1")) == (
      "unknown config key 'nonexistent' (every field is listed in blt_jax/train_config.py)"
  )
  assert train.unknown_override_error(argv("--config.seq_len=8", "--config.optimizer.nope=2")).startswith(
      "unknown config key 'optimizer.nope' ("
  )
  for key, guess in [
      ("lr", "optimizer.lr"),
      ("patching.treshold", "patching.threshold"),
      ("modle.dim_global", "model.dim_global"),
      ("data.source", "data.sources"),
  ]:
    message = train.unknown_override_error(["train", f"--config={config}", f"--config.{key}", "1"])
    assert message.startswith(f"unknown config key {key!r}; did you mean {guess!r}?"), message
  # A value that does not parse names the key; absl's text (as `--config.seq_len=abc` makes ml_collections raise
  # it) starts with the flag, which reads as if the flag itself were wrong.
  error = absl_flags.IllegalFlagValueError("flag --config.seq_len=abc: invalid literal for int() with base 10: 'abc'")
  assert train.flag_error(error) == (
      "bad value 'abc' for config key 'seq_len': invalid literal for int() " "with base 10: 'abc'"
  )
  assert train.flag_error(absl_flags.UnrecognizedFlagError("workdri")).startswith("bad command line: ")


# ---------------------------------------------------------------------------------------------------------------
# 7. Two processes.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(overrides, workdir, logdir, env):
  """Starts both processes of a 2-process run; output to files (a full pipe would stall a collective)."""
  procs = []
  for i in range(2):
    with open(logdir / f"out{i}.txt", "w") as out, open(logdir / f"err{i}.txt", "w") as err:
      procs.append(
          subprocess.Popen(
              [sys.executable, str(DRIVER), str(workdir), json.dumps({**overrides, "mesh.process_id": i})],
              cwd=ROOT,
              env=env,
              stdout=out,
              stderr=err,
          )
      )
  return procs


def _reports(procs, logdir, timeout=300):
  """Each process's last JSON line, once all have exited with 0 (any still running at `timeout` is killed)."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  reports = []
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}: rc={p.returncode}\n{(logdir / f'err{i}.txt').read_text()[-4000:]}"
    lines = (logdir / f"out{i}.txt").read_text().splitlines()
    reports.append(json.loads([line for line in lines if line.startswith("{")][-1]))
  return reports


def test_two_processes_train_one_mesh(micro, corpus, tmp_path):
  overrides = {
      **MICRO,
      **corpus,
      "mesh.data": 1,
      "mesh.fsdp": 2,
      "mesh.tensor": 2,
      "mesh.coordinator_address": f"127.0.0.1:{_free_port()}",
      "mesh.num_processes": 2,
  }
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
  )
  reports = _reports(_launch(overrides, tmp_path / "run", tmp_path, env), tmp_path)
  assert [r["process"] for r in reports] == [0, 1]
  assert all(r["process_count"] == 2 and r["device_count"] == 4 for r in reports)
  assert sorted(reports[0]["losses"]) == ["1", "2"]
  assert reports[0]["losses"] == reports[1]["losses"]  # one global computation, replicated scalars
  assert all(np.isfinite(v) for v in reports[0]["losses"].values())
  assert reports[0]["evals"] == reports[1]["evals"]
  # Process 1 has no validation document, so it feeds only padding rows: they must not count as patches.
  assert all(2.0 < m["val_bytes_per_patch"] < 16.0 for m in reports[0]["evals"].values())
  workdir = tmp_path / "run"
  assert (workdir / "checkpoints" / "2" / "data" / "process_1-of-2.json").is_file()
  assert (workdir / "export" / "config.json").is_file()
  # And equal one process's on the same global batches (host 0's rows, then host 1's), on the module's mesh
  # (2, 2, 2): the straight run's programs, so nothing new to compile when the module runs in order; no
  # validation data (evaluation off, about 2 s in all).
  original = train.data_lib.make_train_iterator
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.data_lib, "make_train_iterator", lambda *a, **k: _BothHosts(original, *a, **k))
    ref = _losses_by_step(
        train_rows(
            run(
                micro({"num_steps": 2, "data.validation_sources": (), "data.validation_fraction": 0.0}),
                tmp_path / "ref",
            )[0]
        )
    )
  for step, loss in reports[0]["losses"].items():
    np.testing.assert_allclose(loss, ref[int(step)], rtol=MESH_RTOL, err_msg=f"step {step}")


# ---------------------------------------------------------------------------------------------------------------
# 8. Preemption: SIGTERM saves a checkpoint at a step boundary, exits 0, and the same command resumes.


def _wait_for(path, pattern, proc, timeout=300):
  """Polls a log file until `pattern` appears (or the process exits); returns the match."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    match = re.search(pattern, path.read_text() if path.exists() else "", re.M)
    if match:
      return match
    if proc.poll() is not None:
      break
    time.sleep(0.2)
  raise AssertionError(f"{pattern!r} never appeared in {path} (rc={proc.poll()}):\n{path.read_text()[-3000:]}")


def _losses_by_step(rows):
  return {step: m["loss"] for step, m in rows.items()}


def test_sigterm_line_claims_a_checkpoint_only_when_one_was_saved(tmp_path):
  stopped = dict(start_step=0, final_step=5, preempted=True)
  assert train.end_of_run_line({**stopped, "checkpoint_step": 5}, tmp_path) == (
      f"stopped by SIGTERM after step 5: checkpoint saved in {tmp_path / 'checkpoints'}; re-run the same command to "
      f"resume"
  )
  for newest, where in ((3, "step 3"), (None, "the start")):
    line = train.end_of_run_line({**stopped, "checkpoint_step": newest}, tmp_path)
    assert "checkpoint saved" not in line and "no checkpoint of step 5 was saved" in line, line
    assert f"re-running the same command resumes from {where}" in line, line


def test_sigterm_during_start_up_ends_the_process_as_usual(micro, tmp_path):
  """Until the first step has run, SIGTERM is left to the process's usual handler (by default: end at once, in the
  middle of a compile too): it is not held until a step is trained and saved. Nothing is written to checkpoints/."""

  class Terminated(BaseException):
    pass

  def usual(signum, frame):
    raise Terminated(signum)

  previous = signal.signal(signal.SIGTERM, usual)
  try:
    # Sent from the first batch's fetch: start-up (restore, init, step-0 evaluation) is over, the first step is next.
    with tapped([], sigterm_at=1), pytest.raises(Terminated):
      run(micro({"num_steps": 6, "checkpoint_every": 3}), tmp_path)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not list((tmp_path / "checkpoints").iterdir())


def test_sigterm_saves_exits_zero_and_rerun_resumes(micro, corpus, compile_cache, tmp_path):
  python, env = _cli(compile_cache)
  flags = [_flag(k, v) for k, v in {**MICRO, **corpus}.items()]
  cmd = python + ["--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run")] + flags
  out, err = tmp_path / "out.txt", tmp_path / "err.txt"
  with open(out, "w") as o, open(err, "w") as e:
    proc = subprocess.Popen(cmd + ["--config.num_steps=100000"], cwd=tmp_path, env=env, stdout=o, stderr=e)
  try:
    _wait_for(out, r"^step 1/100000 ", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, err.read_text()[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  stop = int(
      re.search(
          r"^stopped by SIGTERM after step (\d+): checkpoint saved in (\S+); re-run the same " r"command to resume$",
          out.read_text(),
          re.M,
      ).group(1)
  )
  assert (tmp_path / "run" / "checkpoints" / str(stop) / "data").is_dir()
  assert not (tmp_path / "run" / "export").exists()  # the run is not finished

  # The same command (shorter: the constant schedule does not depend on num_steps) resumes at that step.
  rerun = subprocess.run(
      cmd + [f"--config.num_steps={stop + 2}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert f"resumed from checkpoint step {stop} in {tmp_path / 'run'}" in rerun.stdout
  assert f"done: steps {stop} -> {stop + 2}" in rerun.stdout

  # Both runs' logged losses (TensorBoard, float32) equal an uninterrupted run's.
  logged = dict(read_scalars(tmp_path / "run")["loss"])
  assert sorted(logged) == list(range(1, stop + 3))
  ref = _losses_by_step(train_rows(run(micro({"num_steps": stop + 2}), tmp_path / "ref")[0]))
  for step in logged:
    np.testing.assert_allclose(logged[step], ref[step], rtol=RESUME_RTOL, err_msg=f"step {step}")


class _BothHosts:
  """The train iterator of a 2-process run as one process: host 0's rows, then host 1's (the global batch order)."""

  def __init__(self, make, *args, **kwargs):
    for key in ("process_index", "process_count"):
      kwargs.pop(key, None)
    self.hosts = [make(*args, process_index=i, process_count=2, **kwargs) for i in range(2)]

  def __iter__(self):
    return self

  def __next__(self):
    rows = [next(h) for h in self.hosts]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  def get_state(self):
    return [h.get_state() for h in self.hosts]

  def set_state(self, state):
    for h, s in zip(self.hosts, state):
      h.set_state(s)


def test_two_processes_sigterm_and_resume_match_one_process(micro, corpus, compile_cache, tmp_path, capsys):
  """SIGTERM to one of two processes: both stop at the same step; resumed, the losses are a 1-process run's."""
  env = dict(
      os.environ,
      **compile_cache,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
  )
  overrides = {**MICRO, **corpus, "mesh.num_processes": 2}  # mesh (2, 2, 2) over 2 x 4 devices
  first = tmp_path / "first"
  first.mkdir()
  procs = _launch(
      {**overrides, "num_steps": 100000, "mesh.coordinator_address": f"127.0.0.1:{_free_port()}"},
      tmp_path / "run",
      first,
      env,
  )
  try:
    # Step 2 needs both processes, and each takes SIGTERM over once its first step is done: process 1 has by then.
    _wait_for(first / "out0.txt", r"^step 2/100000 ", procs[0])
  except BaseException:
    for p in procs:
      p.kill()
    raise
  procs[1].send_signal(signal.SIGTERM)  # only one host is told, as when a single VM of a slice is preempted
  reports = _reports(procs, first, timeout=120)
  stop = reports[0]["final_step"]
  assert [r["preempted"] for r in reports] == [True, True]
  assert reports[1]["final_step"] == stop and stop < 100000
  assert [r["data_shard"] for r in reports] == [[0, 2], [1, 2]]
  assert (tmp_path / "run" / "checkpoints" / str(stop) / "data" / "process_1-of-2.json").is_file()

  second = tmp_path / "second"
  second.mkdir()
  resumed = _reports(
      _launch(
          {**overrides, "num_steps": stop + 2, "mesh.coordinator_address": f"127.0.0.1:{_free_port()}"},
          tmp_path / "run",
          second,
          env,
      ),
      second,
  )
  assert [(r["start_step"], r["final_step"], r["preempted"]) for r in resumed] == [(stop, stop + 2, False)] * 2
  got = {int(k): v for r in (reports[0], resumed[0]) for k, v in r["losses"].items()}
  assert sorted(got) == list(range(1, stop + 3))

  # One process, 8 devices, the same global batches: rows of host 0 then host 1, as the 2-process mesh lays them.
  original = train.data_lib.make_train_iterator
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.data_lib, "make_train_iterator", lambda *a, **k: _BothHosts(original, *a, **k))
    ref = _losses_by_step(train_rows(run(micro({"num_steps": stop + 2}), tmp_path / "ref")[0]))
  with capsys.disabled():  # the numbers, for notes (pytest -s)
    print(
        f"\n2-process losses (SIGTERM after step {stop}, resumed):",
        {s: round(v, 6) for s, v in got.items()},
        "\n1-process losses:",
        {s: round(v, 6) for s, v in ref.items()},
    )
  for step, loss in got.items():
    np.testing.assert_allclose(loss, ref[step], rtol=MESH_RTOL, err_msg=f"step {step}")


# ---------------------------------------------------------------------------------------------------------------
# 9. Damaged checkpoints: the run resumes from the newest readable one and keeps the damaged one aside.


def _break_data_json(step_dir):
  (step_dir / "data" / "process_0-of-1.json").write_text('{"kind": "json", "value": {')


def _truncate_largest_array_file(step_dir):
  os.truncate(helpers.largest_state_array_file(step_dir), 1000)


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _break_data_json])
def test_damaged_latest_checkpoint_falls_back(micro, straight, tmp_path, caplog, monkeypatch, damage):
  # The straight run's checkpoints (steps 3 and 6) with step 6 damaged: one array file cut short, or a json file.
  monkeypatch.setattr(ckpt_lib, "RETRY_PAUSE_S", 0.0)  # damage is confirmed by a second read; no need to wait here
  shutil.copytree(straight["trainer"].workdir / "checkpoints", tmp_path / "checkpoints")
  damage(tmp_path / "checkpoints" / "6")
  record = []
  with tapped(record), caplog.at_level("WARNING"):
    summary, trainer = run(micro({"num_steps": 6, "checkpoint_every": 3}), tmp_path)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("blt_jax")]
  assert len(warnings) == 1, warnings
  assert f"checkpoint step 6 at {tmp_path / 'checkpoints' / '6'} is damaged: " in warnings[0]
  assert f"moved it aside to {tmp_path / 'checkpoints' / '6.damaged'}" in warnings[0]
  assert summary["start_step"] == 3
  _assert_matches_straight(straight, train_rows(summary), [4, 5, 6], as_numpy(trainer.state.params))
  assert len(record) == len(straight["batches"][3:]) == 3  # zip would pass on an empty record
  for got, want in zip(record, straight["batches"][3:]):
    np.testing.assert_array_equal(got, want)
  assert (tmp_path / "checkpoints" / "6.damaged" / "state").is_dir()  # kept for inspection
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == (3, 6)  # step 6 written afresh


def test_changed_model_is_not_taken_for_damage(micro, straight, tmp_path):
  shutil.copytree(straight["trainer"].workdir / "checkpoints", tmp_path / "checkpoints")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"checkpoint step 6 at .* does not fit .*layers_1"):
    run(micro({"num_steps": 6, "model.n_layers_global": 2}), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]


# ---------------------------------------------------------------------------------------------------------------
# 10. Profiling and progress lines.


def test_profile_steps_write_a_trace(micro, tmp_path, capsys):
  summary, _ = run(micro({"num_steps": 4, "profile_steps": (2, 4)}), tmp_path)
  assert summary["final_step"] == 4
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  out = capsys.readouterr().out
  assert f"profile of steps 2..3 written to {tmp_path / 'profile'}" in out
  lines = [line for line in out.splitlines() if line.startswith("step ") and "| loss " in line]
  assert [line.split(" (")[0] for line in lines] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
  assert all(" | elapsed " in line for line in lines)
  assert all(" | eta " in line for line in lines[1:])  # from the second step on (the first one compiles)


# ---------------------------------------------------------------------------------------------------------------
# 11. Fine-tuning from a converted checkpoint (init_from).


@pytest.fixture(scope="module")
def golden_checkpoint(golden, tmp_path_factory):
  """The golden BLT and its entropy model as `python -m blt_jax.convert` writes them (via the safetensors layout)."""
  arrays, meta = golden
  root = tmp_path_factory.mktemp("golden_ckpt")
  for name, prefix, args in (
      ("blt", "blt/", meta["blt_args"]),
      ("entropy", "entropy_model/", meta["entropy_model_args"]),
  ):
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps({"args": args}))
    safetensors_io.write_safetensors(
        root / name / "model.safetensors", {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    )
  train_args = {"data": {"patcher_args": {"patching_mode": "entropy", "threshold": meta["threshold"]}}}
  (root / "blt" / "train_args.json").write_text(json.dumps(train_args))
  convert.convert_dir(root / "blt", root / "ckpt", entropy_src=root / "entropy")
  return root / "ckpt"


def _direct_loss(params, model_cfg, patch_cfg, ent, batch, max_patches):
  """Mean loss of `batch` from `BLT(cfg).apply`, patched by the entropy model: no trainer code involved."""
  ent_cfg, ent_params = ent
  tokens = jax.numpy.asarray(batch["tokens"])
  patches = patching.patch(
      tokens,
      compute_entropies(ent_params, tokens, ent_cfg),
      include_next_token=True,
      max_patches=max_patches,
      **patch_cfg.patch_kwargs(),
  )
  logits = BLT(model_cfg).apply({"params": params}, tokens, patches.patch_lengths_BP)
  total, count = cross_entropy_sum(logits, jax.numpy.asarray(batch["targets"]), jax.numpy.asarray(batch["loss_mask"]))
  return float(total / count)


def test_init_from_converted_checkpoint_fine_tunes(micro, golden_checkpoint, tmp_path, capsys):
  # Everything model-related comes from the checkpoint (the MICRO model fields and space patching are replaced).
  cfg = micro({"init_from": str(golden_checkpoint), "num_steps": 6, "checkpoint_every": 6})
  batches = []
  with tapped(batches, whole=True):
    summary, trainer = run(cfg, tmp_path / "run")
  out = capsys.readouterr().out
  assert f"init_from {golden_checkpoint}: its settings replace the config's\n" in out
  for change in (
      "model.n_layers_global: 1 -> 2",
      "model.encoder_hash_byte_group_vocab: 512 -> 1009",
      "model.encoder_hash_byte_group_size: (3, 4) -> (3, 4, 5, 6, 7, 8)",
      "patching.mode: 'space' -> 'entropy'",
      f"entropy_checkpoint: '' -> '{golden_checkpoint / 'entropy_model'}'",
  ):
    assert f"\n  {change}\n" in out, change
  assert "model.dim_global" not in out  # 64 in both: only changes are listed
  assert f"initialised params from {golden_checkpoint} (step 0, fresh optimizer state)" in out
  assert summary["start_step"] == 0 and summary["final_step"] == 6

  # Step 1's loss (computed before its update) is the checkpoint's own loss on that batch, not a fresh init's.
  model_cfg, params, patch_cfg = convert.load_converted(golden_checkpoint)
  ent = convert.load_converted(golden_checkpoint / "entropy_model")[:2]
  losses = _losses_by_step(train_rows(summary))
  direct = _direct_loss(params, model_cfg, patch_cfg, ent, batches[0], 65)
  fresh = _direct_loss(init_blt(jax.random.PRNGKey(0), model_cfg), model_cfg, patch_cfg, ent, batches[0], 65)
  np.testing.assert_allclose(losses[1], direct, rtol=MESH_RTOL)
  assert abs(fresh - direct) > 100 * MESH_RTOL * direct
  with capsys.disabled():  # the curve, for notes (pytest -s)
    print(
        "\nfine-tune losses:",
        {s: round(v, 5) for s, v in losses.items()},
        "checkpoint loss:",
        round(direct, 5),
        "fresh-init loss:",
        round(fresh, 5),
    )
  assert losses[6] < losses[1] - 0.3, losses  # fine-tuning does learn
  assert int(trainer.state.step) == 6
  counts = [
      int(x)
      for path, x in jax.tree_util.tree_leaves_with_path(trainer.state.opt_state)
      if jax.tree_util.keystr(path).endswith(".count")
  ]
  assert counts and set(counts) == {6}  # Adam started from zero, not from any saved state
  w1 = trainer.state.params["global_transformer"]["layers_0"]["feed_forward"]["w1"]["kernel"]
  assert w1.sharding.spec == P("fsdp", "tensor")  # read straight into the run's layout on mesh (2, 2, 2)
  assert w1.addressable_shards[0].data.shape == (w1.shape[0] // 2, w1.shape[1] // 2)
  export = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
  assert export["model"]["n_layers_global"] == 2 and export["patching"]["mode"] == "entropy"
  assert (tmp_path / "run" / "export" / "entropy_model" / "config.json").is_file()

  # A checkpoint in the workdir wins: the run resumes (saying so) instead of starting from init_from again.
  summary, _ = run(
      micro({"init_from": str(golden_checkpoint), "num_steps": 7, "checkpoint_every": 6}), tmp_path / "run"
  )
  assert summary["start_step"] == 6
  assert f"(init_from {golden_checkpoint} is not loaded: resuming wins)" in capsys.readouterr().out

  # Another run's workdir works as init_from too (its export/, entropy model included).
  trainer = train.Trainer(micro({"init_from": str(tmp_path / "run")}), str(tmp_path / "second"))
  trainer.close()
  assert trainer.cfg.entropy_checkpoint == str(tmp_path / "run" / "export" / "entropy_model")
  assert trainer.sc.model.n_layers_global == 2 and trainer.sc.patching.mode == "entropy"


@pytest.mark.parametrize(
    "config_json,match",
    [
        (None, "does not exist"),
        ("", "no config.json in .*bad or .*bad/export"),
        ('{"format": "hf"}', "config.json is not a blt_jax checkpoint"),
        ('{"format": "blt_jax", "model_type": "blt"', "config.json is not valid json"),
        ('{"format": "blt_jax", "model_type": "blt", "model": {}}', "has config.json but no params/ directory"),
    ],
)
def test_init_from_errors(micro, tmp_path, config_json, match):
  if config_json is not None:
    (tmp_path / "bad").mkdir()
    if config_json:
      (tmp_path / "bad" / "config.json").write_text(config_json)
  with pytest.raises((FileNotFoundError, ValueError), match=f"^init_from .*{match}"):
    train.Trainer(micro({"init_from": str(tmp_path / "bad")}), str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------
# 12. scan_layers: the global stack stacked in the train state (blt_jax.layer_stacking).


def test_scan_layers_run_resumes_exactly_reads_either_layout_and_exports_per_layer(micro, tmp_path):
  """Two global layers with scan_layers: checkpoints hold the stacked state and a resumed run equals the straight
  one bit for bit; a per-layer checkpoint resumes into a scan run and the reverse (converted on restore); the export
  is per-layer (the final params exactly), `loading.load` scores it as the unscanned model and generates from it."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from blt_jax import generate, layer_stacking, loading, score  # pylint: disable=g-import-not-at-top

  loop = {"model.n_layers_global": 2, "checkpoint_every": 2}
  scan = {**loop, "scan_layers": True}
  straight, trainer = run(micro({**scan, "num_steps": 4}), tmp_path / "straight")
  ref, ref_params = train_rows(straight), as_numpy(trainer.state.params)
  assert sorted(ref_params["global_transformer"]) == ["layers"]
  assert ref_params["global_transformer"]["layers"]["attention"]["wq"]["kernel"].shape == (2, 64, 64)

  for name in ("resumed", "scan_then_loop"):  # the straight run stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "straight", tmp_path / name)
    shutil.rmtree(tmp_path / name / "checkpoints" / "4")
  second, resumed = run(micro({**scan, "num_steps": 4}), tmp_path / "resumed")
  assert (second["start_step"], second["final_step"]) == (2, 4)
  for step, row in train_rows(second).items():
    assert (row["loss"], row["grad_norm"]) == (ref[step]["loss"], ref[step]["grad_norm"]), step
  for a, b in zip(
      jax.tree_util.tree_leaves(as_numpy(resumed.state)), jax.tree_util.tree_leaves(as_numpy(trainer.state))
  ):
    np.testing.assert_array_equal(a, b)

  # The other layout's checkpoints: per-layer -> scan run, scan -> per-layer run (float32 ulps: scan vs loop).
  run(micro({**loop, "num_steps": 2}), tmp_path / "loop_then_scan")
  from_loop, scanned = run(micro({**scan, "num_steps": 4}), tmp_path / "loop_then_scan")
  from_scan, looped = run(micro({**loop, "num_steps": 4}), tmp_path / "scan_then_loop")
  assert from_loop["start_step"] == from_scan["start_step"] == 2
  for rows in (train_rows(from_loop), train_rows(from_scan)):
    for step in (3, 4):
      np.testing.assert_allclose(rows[step]["loss"], ref[step]["loss"], rtol=MESH_RTOL)
  assert_trees_close(as_numpy(scanned.state.params), ref_params, rtol=1e-4, atol=1e-6)
  per_layer_ref = layer_stacking.unstack_params(ref_params, trainer.sc.model)
  assert_trees_close(as_numpy(looped.state.params), per_layer_ref, rtol=1e-4, atol=1e-6)

  # init_from reads a run's (per-layer) export into a scan run's stacked state.
  tuned = train.Trainer(micro({**scan, "init_from": str(tmp_path / "straight")}), str(tmp_path / "tuned"))
  try:
    state, _, _ = tuned._initial_state()  # pylint: disable=protected-access
  finally:
    tuned.close()
  assert_trees_close(as_numpy(state.params), ref_params, rtol=0)

  # The export: per-layer, the final params exactly; scoring and cached generation as the unscanned model's.
  loaded = loading.load(tmp_path / "straight")
  assert loaded.config.scan_layers and "layers_1" in loaded.params["global_transformer"]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree_util.tree_leaves(per_layer_ref)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  unscanned = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, scan_layers=False))
  text = ["def f(x):\n    return x + 1\n", "import os\n"]
  nll = [
      [d.nll_nats for d in score.Scorer(m, row_bytes=64, batch_bytes=64 * 8).score_texts(text)]
      for m in (loaded, unscanned)
  ]
  np.testing.assert_allclose(nll[0], nll[1], rtol=1e-5)
  # Cached generation reads the per-layer global stack whatever scan_layers says: the export is all it needs.
  (result,) = generate.generate(loaded, ["def "], 6)
  assert result.stopped in ("max_bytes", "eos") and len(result.continuation) <= 6
