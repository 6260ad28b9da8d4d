"""Training checkpoints (orbax CheckpointManager) and standalone converted-weight checkpoints.

Training checkpoints live in `workdir/checkpoints/<step>/` with three items:
  * "state": the train state pytree (orbax StandardSave: tensorstore/OCDBT, each process writes its own shards);
  * "data":  the data iterator state of every process, one json file per process (`process_<i>-of-<n>.json`), so
             multi-host data loading resumes exactly; bytes are base64 inside the json;
  * "meta":  a small json dict from the trainer (config, metrics, ...), written by the primary process.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<ts>/` and renames it to `<step>/` only after
every item (and every process) has finished; `latest_step` only lists finalized names, so a crash mid-save leaves
a tmp dir that is never restored from (and is deleted the next time a `Checkpointer` opens the directory). On
object stores without atomic rename orbax marks finished steps with `commit_success.txt` instead.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from blt_jax import paths

DataState = Union[None, bytes, str, dict, list]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


# ---------------------------------------------------------------------------------------------------------------
# Data iterator state: json, one file per process.


def encode_data_state(state: DataState) -> dict:
  """json-able wrapper that remembers the type (grain's DataLoader gives bytes, dataset iterators a dict)."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
  if isinstance(state, str):
    return {"kind": "str", "value": state}
  if isinstance(state, (dict, list)):
    return {"kind": "json", "value": state}
  raise TypeError(f"data iterator state must be bytes, str, dict, list or None; got {type(state).__name__}")


def decode_data_state(wrapped: Mapping[str, Any]) -> DataState:
  kind = wrapped.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(wrapped["value"])
  if kind in ("str", "json"):
    return wrapped["value"]
  raise ValueError(f"unrecognised data iterator state record (kind={kind!r})")


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataStateHandler(ocp.CheckpointHandler):
  """Each process writes (and later reads back) its own iterator state; orbax's JsonSave is primary-only."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    _process_file(directory).write_text(json.dumps(encode_data_state(args.state)))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> DataState:
    del args
    path = _process_file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f"no data iterator state for this process at {path} (found {found}); was the "
                              f"checkpoint written with a different number of processes?")
    return decode_data_state(json.loads(path.read_text()))

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints.


def _to_abstract(tree: Any) -> Any:
  """Restore targets: jax.Arrays become ShapeDtypeStructs with their shardings; structs stay as they are."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree_util.tree_map(one, tree)


class Checkpointer:
  """Periodic, keep-N, async, atomic checkpoints of (train state, data iterator state, json metadata)."""

  def __init__(self, workdir: Union[str, os.PathLike], *, save_interval_steps: int = 1000,
               max_to_keep: Optional[int] = 3, async_checkpointing: bool = True, subdir: str = "checkpoints"):
    self.directory = paths.resolve(workdir) / subdir
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_interval_steps), 1),
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_checkpointing,
        create=True,
        # Unfinished saves from a crash are removed on start (they would never be restored anyway).
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, train_state: Any, data_iterator_state: DataState = None,
           extra_json: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started. All processes must call it.

    With async checkpointing this returns once the arrays are copied off the devices, so `train_state` may be
    donated or updated right after.
    """
    if int(step) in self._manager.all_steps():
      return False  # e.g. a final forced save on a step the periodic policy already saved
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=DataStateSave(data_iterator_state),
        meta=ocp.args.JsonSave(dict(extra_json or {})),
    )
    return self._manager.save(int(step), args=args, force=force)

  def latest_step(self) -> Optional[int]:
    """Newest finalized step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> Tuple[int, ...]:
    return tuple(self._manager.all_steps())

  def restore(self, step: Optional[int] = None, abstract_state: Any = None) -> Tuple[Any, DataState, dict]:
    """(train state, data iterator state, extra json) of `step` (default: the latest).

    `abstract_state` is the target tree: `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves (or live arrays,
    whose shardings are used) so that each process reads only its own shards, directly onto their devices; it
    may use a different mesh than the one that saved. None restores with the saved shardings (same topology only).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {list(self._manager.all_steps())})")
    target = None if abstract_state is None else _to_abstract(abstract_state)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=DataStateRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return restored["state"], restored["data"], dict(restored["meta"] or {})

  def wait_until_finished(self) -> None:
    """Blocks until a pending async save is fully written and finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------------------------
# Standalone params (converted weights, entropy model for the trainer).


def _config_to_dict(config: Any) -> dict:
  if config is None:
    return {}
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return dataclasses.asdict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def _unbox(tree: Any) -> Any:
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  return meta.unbox(tree)


def save_params(path: Union[str, os.PathLike], params: Any, config_dict: Any, overwrite: bool = False) -> epath.Path:
  """Writes `path/params/` (orbax PyTree) and `path/config.json`, atomically: both go to a tmp dir first.

  All processes must call it (arrays may be sharded); the primary process writes config.json and renames.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  path = paths.resolve(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  config_json = json.dumps(_config_to_dict(config_dict), indent=2, sort_keys=True)  # fail before writing anything
  # Same name on every process (it is a collective write); a leftover from a crashed save is removed first.
  tmp = path.parent / f".{path.name}.tmp"
  primary = jax.process_index() == 0
  if primary:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
      tmp.rmtree()
    tmp.mkdir()
  multihost_utils.sync_global_devices(f"blt_jax.save_params.start:{path}")

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / PARAMS_DIR, _unbox(params))
  checkpointer.wait_until_finished()
  checkpointer.close()

  if primary:
    (tmp / CONFIG_FILE).write_text(config_json)
    if path.is_dir():
      path.rmtree()
    elif path.exists():
      path.unlink()
    tmp.rename(path)
  multihost_utils.sync_global_devices(f"blt_jax.save_params.end:{path}")
  return path


def read_params_config(path: Union[str, os.PathLike]) -> dict:
  """`path/config.json` of a `save_params` directory, with clear errors for the usual mistakes."""
  path = paths.resolve(path)
  if not path.exists():
    raise FileNotFoundError(f"params checkpoint {path} does not exist")
  config_file = path / CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: expected a directory written by "
                            f"blt_jax.checkpoint.save_params (params/ + {CONFIG_FILE})")
  return json.loads(config_file.read_text())


def load_params(path: Union[str, os.PathLike], abstract: Any = None) -> Tuple[Any, dict]:
  """(params, config dict) from a `save_params` directory.

  `abstract`: target tree of ShapeDtypeStructs with shardings (or arrays) to restore each shard in place; None
  restores every array unsharded on the default device (fine for small models such as the entropy model).
  """
  path = paths.resolve(path)
  config = read_params_config(path)
  params_dir = path / PARAMS_DIR
  if not params_dir.exists():
    raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/ directory")
  checkpointer = ocp.StandardCheckpointer()
  try:
    if abstract is None:
      metadata = checkpointer.metadata(params_dir)
      tree = getattr(metadata, "item_metadata", metadata)
      tree = getattr(tree, "tree", tree)
      # Saved shardings may name devices that do not exist here: restore without them.
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    else:
      target = _to_abstract(_unbox(abstract))
    params = checkpointer.restore(params_dir, target)
  finally:
    checkpointer.close()
  return params, config
