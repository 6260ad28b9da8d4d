"""Training checkpoints (sharded state, iterator state, keep-N, crash safety) and standalone params."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
from blt_jax import checkpoint
from blt_jax import sharding

SPECS = {"w": P("fsdp", "tensor"), "table": P(None, ("fsdp", "tensor")), "scale": P(), "step": P(), "emb": P("fsdp")}
# "emb" (128 KiB) is big enough that orbax writes it to the process's data files (`state/ocdbt.process_0/d/`); the
# small arrays also fit in the checkpoint's index (`state/d/`).
SHAPES = {"w": (8, 4), "table": (3, 16), "scale": (4,), "step": (), "emb": (256, 128)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _state(mesh, seed):
  """A sharded train-state-like tree built with device_put (no compilation)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in SHAPES.items():
    value = np.asarray(seed, np.int32) if name == "step" else rng.normal(size=shape).astype(np.float32)
    out[name] = jax.device_put(value, NamedSharding(mesh, SPECS[name]))
  return {
      "params": {k: out[k] for k in ("w", "table", "scale", "emb")},
      "opt": {"mu": out["w"] * 0 + 1.0},
      "step": out["step"],
  }


def _abstract(state):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_sharded_state(tmp_path, mesh):
  state = _state(mesh, 7)
  iterator_state = b'{"last_seen_indices": {"0": 41}, "worker_count": 0}\x00\xff'
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ckpt:
    assert ckpt.save(7, state, iterator_state, {"loss": 1.5, "config": {"lr": 4e-4}})
    ckpt.wait_until_finished()
    restored, data_state, meta = ckpt.restore(7, _abstract(state))
  _assert_same(restored, state)
  assert data_state == iterator_state  # bytes survive json (base64)
  assert meta == {"loss": 1.5, "config": {"lr": 4e-4}}
  for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
  assert restored["params"]["table"].addressable_shards[0].data.shape == (3, 4)
  assert (tmp_path / "checkpoints" / "7" / "data" / "process_0-of-1.json").exists()


def test_restore_into_other_shardings(tmp_path, mesh):
  state = _state(mesh, 3)
  with checkpoint.Checkpointer(tmp_path, async_checkpointing=False) as ckpt:
    ckpt.save(3, state, {"epoch": 1}, force=True)
  # A fresh process with another layout: everything replicated on a (1, 8, 1) mesh, params sharded by fsdp.
  other = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, P())), state
  )
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(other, P("fsdp")))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, data_state, meta = ckpt.restore(None, target)
  _assert_same(restored, state)
  assert data_state == {"epoch": 1} and meta == {}
  assert restored["params"]["w"].sharding.spec == P("fsdp")
  assert restored["params"]["w"].addressable_shards[0].data.shape == (1, 4)


def test_interval_keep_n_and_resume_from_latest(tmp_path, mesh):
  state = _state(mesh, 0)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [step for step in range(0, 45, 5) if ckpt.save(step, state, f"it{step}", {"step": step})]
    assert saved == [0, 10, 20, 30, 40]
    assert ckpt.save(41, state, "it41", {"step": 41}, force=True)
    assert not ckpt.save(41, state, "again", {}, force=True)  # already saved: skipped, not an error
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 41
    assert ckpt.all_steps() == (40, 41)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["40", "41"]
  # Resume: a new Checkpointer (new process) finds the newest step and its iterator state.
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 41
    _, data_state, meta = ckpt.restore(abstract_state=_abstract(state))
    assert data_state == "it41" and meta == {"step": 41}
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 10"):
      ckpt.restore(10, _abstract(state))


def test_unfinished_save_is_ignored(tmp_path, mesh):
  state = _state(mesh, 5)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(20, state, None, {}, force=True)
  # What a crash in the middle of writing step 30 leaves behind: orbax's tmp dir, never renamed.
  tmp = tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\x00" * 10)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 20
    restored, data_state, _ = ckpt.restore(None, _abstract(state))
    _assert_same(restored, state)
    assert data_state is None
    # Step 30 can be saved again afterwards.
    assert ckpt.save(30, state, None, {}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 30
  assert not tmp.exists()  # removed in the background when the Checkpointer opened the directory


def test_no_checkpoint_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finalized checkpoint"):
      ckpt.restore()


@pytest.mark.parametrize("value", [None, b"\x00\x01binary", "text", {"a": [1, 2], "b": {"c": "d"}}])
def test_data_state_encoding(value):
  wrapped = json.loads(json.dumps(checkpoint.encode_data_state(value)))
  assert checkpoint.decode_data_state(wrapped) == value
  with pytest.raises(TypeError):
    checkpoint.encode_data_state(3.5)


def test_save_and_load_params(tmp_path, mesh):
  params = _state(mesh, 11)["params"]
  config = {"dim": 8, "n_layers": 2, "sliding_window": None, "sizes": (3, 4)}
  path = checkpoint.save_params(tmp_path / "entropy_model", params, config)
  assert (path / "config.json").exists() and (path / "params").is_dir()
  assert not list(tmp_path.glob(".*tmp*"))
  loaded, loaded_config = checkpoint.load_params(path)
  _assert_same(loaded, params)
  # On a device, not numpy: numpy params would be copied to the device again by every jitted call.
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(loaded))
  assert loaded_config == {"dim": 8, "n_layers": 2, "sliding_window": None, "sizes": [3, 4]}
  # Into given shardings.
  loaded, _ = checkpoint.load_params(path, _abstract(params))
  assert loaded["table"].sharding.spec == P(None, ("fsdp", "tensor"))
  _assert_same(loaded, params)
  with pytest.raises(FileExistsError):
    checkpoint.save_params(path, params, config)
  checkpoint.save_params(path, jax.tree_util.tree_map(lambda x: x * 2, params), {"dim": 9}, overwrite=True)
  assert checkpoint.load_params(path)[1] == {"dim": 9}


def test_load_params_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(tmp_path / "missing")
  (tmp_path / "no_config" / "params").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    checkpoint.load_params(tmp_path / "no_config")


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: the newest readable one is used, the damaged one is kept aside; a changed model is no damage.


def _two_steps(tmp_path, mesh):
  states = {step: _state(mesh, step) for step in (10, 20)}
  with checkpoint.Checkpointer(tmp_path, async_checkpointing=False) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, f"it{step}", {"step": step}, force=True)
  return states, tmp_path / "checkpoints" / "20"


def _delete_arrays(step_dir):
  for p in helpers.state_array_files(step_dir):
    p.unlink()


def _bad_meta_json(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"step": 2')


def _bad_data_json(step_dir):
  (step_dir / "data" / "process_0-of-1.json").write_text("not json")


def _bad_state_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{")


def _delete_one_array_file(step_dir):
  helpers.largest_state_array_file(step_dir).unlink()


def _truncate_one_array_file(step_dir):
  os.truncate(helpers.largest_state_array_file(step_dir), 1000)


def _delete_state_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


@pytest.fixture(autouse=True)
def no_retry_pause(monkeypatch):
  """Damaged checkpoints are read twice; the pause between the reads (for storage to recover) is not needed here."""
  monkeypatch.setattr(checkpoint, "RETRY_PAUSE_S", 0.0)


@pytest.mark.parametrize(
    "damage",
    [
        helpers.truncate_state_arrays,
        _delete_arrays,
        _bad_meta_json,
        _bad_data_json,
        _bad_state_metadata,
        _delete_one_array_file,
        _truncate_one_array_file,
        _delete_state_metadata,
    ],
)
def test_damaged_latest_falls_back_and_is_kept_aside(tmp_path, mesh, damage):
  states, step_dir = _two_steps(tmp_path, mesh)
  damage(step_dir)
  warnings = []
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, restored, data_state, meta = ckpt.restore_newest_readable(_abstract(states[10]), warn=warnings.append)
    assert ckpt.all_steps() == (10,)  # the damaged step is no longer listed, so never re-tried or deleted
  assert (step, data_state, meta) == (10, "it10", {"step": 10})
  _assert_same(restored, states[10])
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert f"checkpoint step 20 at {step_dir} is damaged" in warnings[0], warnings[0]
  assert f"moved it aside to {step_dir}.damaged" in warnings[0]
  assert "tensorstore_spec" not in warnings[0]
  assert (tmp_path / "checkpoints" / "20.damaged" / "state").is_dir()
  # A new Checkpointer (the next run) neither lists nor deletes it, and saving step 20 again works.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    assert ckpt.latest_step() == 10
    ckpt.save(20, states[20], "again", {}, force=True)
    ckpt.save(30, states[20], "again", {}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == (30,)
  assert (tmp_path / "checkpoints" / "20.damaged").is_dir()


@pytest.mark.parametrize(
    "damage,reason",
    [
        (helpers.truncate_state_arrays, "ValueError: OUT_OF_RANGE"),
        (_truncate_one_array_file, "ValueError: OUT_OF_RANGE: Error reading"),
        (_delete_one_array_file, "ValueError: FAILED_PRECONDITION: Error reading"),
    ],
)
def test_damaged_latest_in_error_mode_names_step_and_path(tmp_path, mesh, damage, reason):
  states, step_dir = _two_steps(tmp_path, mesh)
  damage(step_dir)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.DamagedCheckpointError) as info:
      ckpt.restore_newest_readable(_abstract(states[10]), on_damaged="error")
    assert ckpt.all_steps() == (10, 20)  # nothing moved
  message = str(info.value)
  assert message.startswith(f"checkpoint step 20 at {step_dir} is damaged: {reason}"), message
  assert "\n" not in message and len(message) < 600
  assert info.value.step == 20


def _read_error(text, wrapped):
  """A storage error as orbax raises it: tensorstore's ValueError, wrapped in a bare Exception when reading arrays."""
  error = ValueError(f'{text}: Error reading "params.emb/0" in OCDBT database at "gs://bucket/ckpt/state/"')
  if wrapped:
    error.__cause__, error = error, Exception("Encountered error while reading array index: (slice(0, 128, 1),)")
  return error


def _failing_reads(monkeypatch, text, times, wrapped=True):
  """The train state's reads fail `times` times with `_read_error(text)`, then work; returns the list of calls."""
  original, calls = ocp.StandardCheckpointHandler.restore, []

  def restore(self, *args, **kwargs):
    calls.append(1)
    if len(calls) <= times:
      raise _read_error(text, wrapped)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
  return calls


def test_read_error_that_goes_away_is_not_damage(tmp_path, mesh, monkeypatch, caplog):
  states, _ = _two_steps(tmp_path, mesh)
  calls = _failing_reads(monkeypatch, "NOT_FOUND", times=1)  # e.g. an object store's listing that lags behind
  warnings = []
  with checkpoint.Checkpointer(tmp_path) as ckpt, caplog.at_level("WARNING"):
    step, restored, _, _ = ckpt.restore_newest_readable(_abstract(states[10]), warn=warnings.append)
    assert (step, len(calls), warnings) == (20, 2, [])
    assert ckpt.all_steps() == (10, 20)
  _assert_same(restored, states[20])
  assert "checkpoint step 20 read back on the second try" in caplog.text


def test_lasting_storage_error_is_not_damage(tmp_path, mesh, monkeypatch):
  """An error that does not say files are missing or corrupt (storage down for longer than the retry) stops the run
  with one line, and nothing is moved."""
  states, step_dir = _two_steps(tmp_path, mesh)
  _failing_reads(monkeypatch, "UNAVAILABLE", times=10**6, wrapped=False)
  warnings = []
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointReadError) as info:
      ckpt.restore_newest_readable(_abstract(states[10]), warn=warnings.append)
    assert ckpt.all_steps() == (10, 20) and warnings == []
  message = str(info.value)
  assert message.startswith(f"checkpoint step 20 at {step_dir} could not be read: ValueError: UNAVAILABLE"), message
  assert "\n" not in message and "nothing was moved" in message


@pytest.mark.parametrize(
    "here,there,expected",
    [
        ("intact", "damaged", "fallback"),
        ("intact", "failed", "CheckpointReadError"),
        ("damaged", "failed", "CheckpointReadError"),
        ("changed model", "intact", "CheckpointMismatchError"),
    ],
)
def test_processes_agree_on_each_step(tmp_path, mesh, monkeypatch, here, there, expected):
  """Every process shares what it found for a step, whatever it found (an error included), before any of them acts:
  none raises early while another waits for it, and a step is moved aside only when no process failed otherwise."""
  states, step_dir = _two_steps(tmp_path, mesh)
  target = _abstract(states[10])
  if here == "damaged":
    _truncate_one_array_file(step_dir)
  elif here == "changed model":
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=target["params"]["w"].sharding)
  code = {"intact": checkpoint.READ, "damaged": checkpoint.DAMAGED, "failed": checkpoint.FAILED}
  shared = []

  def gather(outcome):  # process 1 found `there` at step 20 and nothing wrong at step 10
    shared.append(outcome)
    return np.asarray([outcome, code[there] if len(shared) == 1 else checkpoint.READ])

  monkeypatch.setattr(checkpoint, "_gather_outcomes", gather)
  warnings = []
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    if expected == "fallback":
      assert ckpt.restore_newest_readable(target, warn=warnings.append)[0] == 10
      assert warnings[0].startswith(f"checkpoint step 20 at {step_dir} is damaged: damaged on process 1; moved it")
      assert ckpt.all_steps() == (10,)
    else:
      with pytest.raises(getattr(checkpoint, expected), match="step 20") as info:
        ckpt.restore_newest_readable(target, warn=warnings.append)
      assert "\n" not in str(info.value)
      if here == "intact":
        assert (
            "could not be read: it failed on process 1 (see its log); not taken for damage, nothing was moved"
            in str(info.value)
        )
      assert ckpt.all_steps() == (10, 20)  # nothing moved
  assert shared[0] == code["failed" if here == "changed model" else here]


def test_all_damaged_gives_none_and_changed_model_is_not_damage(tmp_path, mesh):
  states, step_dir = _two_steps(tmp_path, mesh)
  other = _abstract(states[10])
  other["params"]["w"] = jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=other["params"]["w"].sharding)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    # Another model's shapes: an error that names the array, and both checkpoints stay where they are.
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/w: saved \(8, 4\), expected \(8, 2\)"):
      ckpt.restore_newest_readable(other)
    assert ckpt.all_steps() == (10, 20)
  _bad_data_json(step_dir)
  _bad_meta_json(tmp_path / "checkpoints" / "10")
  warnings = []
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_newest_readable(_abstract(states[10]), warn=warnings.append) is None
    assert ckpt.all_steps() == ()
  assert [w.split(" is damaged")[0] for w in warnings] == [
      f"checkpoint step 20 at {step_dir}",
      f"checkpoint step 10 at {tmp_path / 'checkpoints' / '10'}",
  ]


def test_checkpoint_in_the_other_param_layout_is_converted_on_restore(tmp_path, mesh):
  """A per-layer state restores into a stacked (scan_layers) target through `OtherLayout`, and the reverse; one that
  fits neither says which layouts it was tried as."""
  from blt_jax import layer_stacking  # pylint: disable=g-import-not-at-top
  from blt_jax.config import EntropyModelConfig  # pylint: disable=g-import-not-at-top

  model = EntropyModelConfig(dim=8, n_layers=3, n_heads=2, scan_layers=True)
  rng = np.random.default_rng(0)
  spec = NamedSharding(mesh, P("fsdp"))
  per_layer = {f"layers_{i}": {"w": jax.device_put(rng.normal(size=(8, 2)).astype(np.float32), spec)} for i in range(3)}
  per_layer["norm"] = {"scale": jax.device_put(np.ones(8, np.float32), NamedSharding(mesh, P()))}
  flat = {"params": per_layer, "opt": {"mu": per_layer}, "step": jax.device_put(np.int32(3), NamedSharding(mesh, P()))}

  def restack(tree, stacked):
    return layer_stacking.restack(tree, tree["params"], model, stacked)

  stacked = jax.jit(lambda t: restack(t, True))(flat)
  assert stacked["params"]["layers"]["w"].shape == stacked["opt"]["mu"]["layers"]["w"].shape == (3, 8, 2)
  as_stacked = checkpoint.OtherLayout("stacked params", _abstract(stacked), jax.jit(lambda t: restack(t, False)))
  as_per_layer = checkpoint.OtherLayout("per-layer params", _abstract(flat), jax.jit(lambda t: restack(t, True)))
  with checkpoint.Checkpointer(tmp_path / "flat") as ckpt:
    ckpt.save(3, flat, None, {}, force=True)
    ckpt.wait_until_finished()
    restored, _, _ = ckpt.restore(3, _abstract(stacked), [as_per_layer])
  _assert_same(restored, stacked)
  assert jax.tree.structure(restored) == jax.tree.structure(stacked)
  with checkpoint.Checkpointer(tmp_path / "stacked") as ckpt:
    ckpt.save(3, stacked, None, {}, force=True)
    ckpt.wait_until_finished()
    restored, _, _ = ckpt.restore(3, _abstract(flat), [as_stacked])
    _assert_same(restored, flat)
    other = _abstract(flat)  # another model: fits neither layout
    other["params"]["norm"]["scale"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"expected \(4,\), nor as per-layer params"):
      ckpt.restore(3, other, [as_per_layer])
