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

Damage after the fact (a truncated or deleted array file, a deleted or unparseable metadata/json file) is caught
when restoring: `restore_newest_readable` moves a damaged step aside to `<step>.damaged` (orbax no longer lists it,
so it is never re-tried or deleted) and falls back to the next older one. A step counts as damaged only when it
fails twice, a pause apart, with an error that says files are missing, short or corrupt; any other failure (a
storage outage) raises `CheckpointReadError` and nothing is moved. A checkpoint of another model or process count is
not damage either: it raises `CheckpointMismatchError`. Processes share what each found before any of them acts.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from blt_jax import paths

DataState = Union[None, bytes, str, dict, list]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger("blt_jax.checkpoint")


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but was written for another model, optimizer or process count."""


class DamagedCheckpointError(RuntimeError):
  """A finalized checkpoint step cannot be read back (missing or truncated files, unparseable json)."""

  def __init__(self, step: int, path: Any, reason: str):
    self.step, self.path, self.reason = int(step), path, reason
    super().__init__(f"checkpoint step {step} at {path} is damaged: {reason}")


class CheckpointReadError(RuntimeError):
  """A checkpoint step could not be read for a reason that is not damage (e.g. storage unreachable): nothing moved."""

  def __init__(self, step: int, path: Any, reason: str):
    self.step, self.path, self.reason = int(step), path, reason
    super().__init__(
        f"checkpoint step {step} at {path} could not be read: {reason}; not taken for damage, " f"nothing was moved"
    )


def short_reason(e: BaseException) -> str:
  """One line out of an orbax/tensorstore error (whose text can carry kilobytes of tensorstore spec)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" [tensorstore_spec")[0]
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= 300 else text[:297] + "..."


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
      found = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
      if found:  # other processes' files are there: a different process count, not a lost file
        raise CheckpointMismatchError(
            f"no data iterator state for this process at {path} (found {found}): the "
            f"checkpoint was written by a different number of processes"
        )
      raise FileNotFoundError(f"no data iterator state at {path}")
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


# orbax wants restore args registered for every handler it manages, though `Checkpointer` reads items directly.
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


# Seconds between the two reads of a step that failed to read: long enough for a storage blip to pass.
RETRY_PAUSE_S = 2.0

# tensorstore status codes (the start of its error text) that say a file is missing, short or corrupt. Others
# (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, ...) say the storage failed, not the checkpoint.
_DAMAGE_STATUS = re.compile(r"^(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION): ")
_DAMAGE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError, IsADirectoryError)


def _causes(e: BaseException):
  """`e` and the errors behind it (orbax wraps tensorstore's read errors in a bare `Exception`)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _damage_evidence(e: BaseException) -> Optional[BaseException]:
  """The error behind `e` that says files of a step are missing, short or corrupt; None if none does."""
  for cause in _causes(e):
    if isinstance(cause, CheckpointMismatchError):
      return None
    if isinstance(cause, _DAMAGE_TYPES) or _DAMAGE_STATUS.match(str(cause)):
      return cause
  return None


def _check_tree_metadata(directory: epath.Path) -> None:
  """Raises when the state item's `_METADATA` is gone or unparseable. orbax restores arrays into a target without it,
  but every save writes it, and it is what tells another model's checkpoint from a damaged one."""
  path = directory / "_METADATA"
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing")
  json.loads(path.read_text())


def _quiet_closed_loop_callbacks() -> None:
  """Drops the 'Exception ignored ...' tracebacks a failed restore can leave behind.

  When a read fails, tensorstore may still complete orbax's other pending reads on the event loop orbax has already
  closed ("Event loop is closed"), or those reads are closed unfinished (an error caused by GeneratorExit); Python
  prints each as an unraisable error, which says nothing about the checkpoint. Others pass through.
  """
  previous = sys.unraisablehook
  if getattr(previous, "blt_jax_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    if isinstance(error, Exception) and any(isinstance(c, GeneratorExit) for c in _causes(error)):
      return
    previous(unraisable)

  hook.blt_jax_quiet = True
  sys.unraisablehook = hook


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes_by_path(tree: Any) -> dict:
  """{"params/a/kernel": shape} of every array leaf; paths spelled alike for live trees and orbax metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(getattr(x, "shape", ())) for path, x in leaves}


# What one process found when it read a checkpoint step.
READ, DAMAGED, FAILED = 0, 1, 2


def _processes(outcomes: np.ndarray, outcome: int) -> str:
  """ "process 1" / "processes 0, 3": those with `outcome`; "" if none."""
  ids = [str(i) for i, o in enumerate(outcomes) if o == outcome]
  return f"process{'es' if len(ids) > 1 else ''} {', '.join(ids)}" if ids else ""


def _gather_outcomes(outcome: int) -> np.ndarray:
  """Every process's outcome (READ, DAMAGED or FAILED), by process index: a host-side all-gather, start-up only."""
  if jax.process_count() == 1:
    return np.asarray([outcome])
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(np.asarray(outcome, np.int32))).reshape(-1)


@dataclasses.dataclass(frozen=True)
class OtherLayout:
  """Another on-disk layout of the same train state that `Checkpointer.restore` accepts and converts.

  E.g. a `scan_layers` run (stacked params, `blt_jax.layer_stacking`) resuming from a checkpoint written per-layer.
  """

  name: str  # said in messages: "per-layer params (layers_0 ... layers_{n-1})"
  target: Any  # restore target in that layout (ShapeDtypeStructs with shardings)
  convert: Callable[[Any], Any]  # restored tree -> the run's layout


class Checkpointer:
  """Periodic, keep-N, async, atomic checkpoints of (train state, data iterator state, json metadata)."""

  def __init__(
      self,
      workdir: Union[str, os.PathLike],
      *,
      save_interval_steps: int = 1000,
      max_to_keep: Optional[int] = 3,
      async_checkpointing: bool = True,
      subdir: str = "checkpoints",
  ):
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

  def save(
      self,
      step: int,
      train_state: Any,
      data_iterator_state: DataState = None,
      extra_json: Optional[Mapping[str, Any]] = None,
      force: bool = False,
  ) -> bool:
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

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def read_meta(self, step: int) -> dict:
    """The json metadata saved with `step` (`save`'s `extra_json`), without reading its arrays."""
    return dict(ocp.JsonCheckpointHandler().restore(self.step_path(step) / "meta") or {})

  def restore(
      self, step: Optional[int] = None, abstract_state: Any = None, other_layouts: Sequence[OtherLayout] = ()
  ) -> Tuple[Any, DataState, dict]:
    """(train state, data iterator state, extra json) of `step` (default: the latest).

    `abstract_state` is the target tree: `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves (or live arrays,
    whose shardings are used) so that each process reads only its own shards, directly onto their devices; it
    may use a different mesh than the one that saved. None restores with the saved shardings (same topology only).

    A checkpoint that does not fit `abstract_state` but fits one of `other_layouts` is restored in that layout and
    converted (logged with the layout's name).

    A step that fails to read is read again after `RETRY_PAUSE_S`. Raises `DamagedCheckpointError` when both reads
    fail with errors that say files of the step are missing, truncated or unparseable; `CheckpointReadError` when
    the second read fails otherwise (storage trouble says nothing about the files); `CheckpointMismatchError` when
    the saved arrays fit neither `abstract_state` nor any of `other_layouts` (another model or optimizer). Reads
    this process's part only and waits for no other process.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory} " f"(available: {list(self._manager.all_steps())})"
      )
    _quiet_closed_loop_callbacks()
    try:
      return self._read(step, abstract_state, other_layouts)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      first = e
    log.info(
        "reading checkpoint step %d failed (%s); reading it again in %g s", step, short_reason(first), RETRY_PAUSE_S
    )
    time.sleep(RETRY_PAUSE_S)
    try:
      restored = self._read(step, abstract_state, other_layouts)
    except CheckpointMismatchError:
      raise
    except Exception as second:  # pylint: disable=broad-except
      evidence = _damage_evidence(second)
      if evidence is not None and _damage_evidence(first) is not None:
        raise DamagedCheckpointError(step, self.step_path(step), short_reason(evidence)) from second
      raise CheckpointReadError(step, self.step_path(step), short_reason(second)) from second
    log.warning(
        "checkpoint step %d read back on the second try (the first failed: %s); it is not damaged",
        step,
        short_reason(first),
    )
    return restored

  def _read(self, step: int, abstract_state: Any, other_layouts: Sequence[OtherLayout]) -> Tuple[Any, DataState, dict]:
    """One attempt of `restore`, item by item through orbax's handlers: the manager's restore ends in a barrier of
    all processes, which one that failed would never reach."""
    directory = self.step_path(step)
    _check_tree_metadata(directory / "state")
    target = None if abstract_state is None else _to_abstract(abstract_state)
    layout = None if target is None else self._check_fits(step, target, other_layouts)
    if layout is not None:
      target = _to_abstract(layout.target)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(directory / "state", args=ocp.args.StandardRestore(target))
    finally:
      handler.close()
    data = DataStateHandler().restore(directory / "data")
    meta = ocp.JsonCheckpointHandler().restore(directory / "meta")
    if layout is not None:
      log.warning("checkpoint step %d at %s holds %s; converting it to this run's layout", step, directory, layout.name)
      state = layout.convert(state)
    return state, data, dict(meta or {})

  def _check_fits(self, step: int, target: Any, other_layouts: Sequence[OtherLayout] = ()) -> Optional[OtherLayout]:
    """Compares saved array shapes with the target's, so that a changed config is never mistaken for damage.

    Returns the one of `other_layouts` the checkpoint fits when it does not fit `target` (else None). When the
    array metadata cannot be read, returns None: the restore then fails on the same files and names them.
    """
    handler = ocp.StandardCheckpointHandler()  # the item's own metadata (the Checkpointer's would look for more)
    try:
      saved = handler.metadata(self.step_path(step) / "state")
    except Exception:  # pylint: disable=broad-except
      return None
    finally:
      handler.close()
    saved = getattr(saved, "tree", saved)
    have, want = _shapes_by_path(saved), _shapes_by_path(target)
    if have == want or not have:  # orbax answers None (and logs) when the array metadata cannot be read
      return None
    for layout in other_layouts:
      if _shapes_by_path(_to_abstract(layout.target)) == have:
        return layout
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    details = (
        ([f"not in the checkpoint: {', '.join(missing[:3])}"] if missing else [])
        + ([f"only in the checkpoint: {', '.join(extra[:3])}"] if extra else [])
        + [f"{k}: saved {have[k]}, expected {want[k]}" for k in differ[:3]]
    )
    tried = "".join(f", nor as {layout.name}" for layout in other_layouts)
    raise CheckpointMismatchError(
        f"checkpoint step {step} at {self.step_path(step)} does not fit this run's model/optimizer ("
        f"{'; '.join(details)}{tried}); use the config it was written with, or another workdir"
    )

  def move_aside(self, step: int) -> epath.Path:
    """Renames step `step` to `<step>.damaged[-i]` (kept for inspection, never listed, restored or deleted).

    All processes must call it; the primary process renames.
    """
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    src = self.step_path(step)
    dst = src.parent / f"{src.name}{DAMAGED_SUFFIX}"
    i = 1
    while dst.exists():  # the same step damaged again after a fallback re-reached it
      dst, i = src.parent / f"{src.name}{DAMAGED_SUFFIX}-{i}", i + 1
    if jax.process_index() == 0:
      src.rename(dst)
    multihost_utils.sync_global_devices(f"blt_jax.checkpoint.move_aside:{src}")
    self._manager.reload()
    return dst

  def restore_newest_readable(
      self,
      abstract_state: Any,
      on_damaged: str = "fallback",
      warn: Callable[[str], Any] = log.warning,
      other_layouts: Sequence[OtherLayout] = (),
  ) -> Optional[Tuple[int, Any, DataState, dict]]:
    """(step, state, data state, meta) of the newest step that reads back; None if there is none.

    `on_damaged="fallback"`: each damaged step is moved aside (see `move_aside`) with a warning naming it, and the
    next older one is tried. `"error"`: the first damaged step raises `DamagedCheckpointError`. All processes
    must call it. Each shares what it found for a step (read, damaged, failed) before any acts, so they all act
    alike: a file damaged on one process's side is damage for all; a failure on any process that is neither
    damage nor success raises on all of them (`CheckpointReadError` on those where it read) and moves nothing.
    `other_layouts`: as `restore`'s.
    """
    if on_damaged not in ("fallback", "error"):
      raise ValueError(f"on_damaged={on_damaged!r}: expected 'fallback' or 'error'")
    for step in sorted(self.all_steps(), reverse=True):
      restored, error = None, None
      try:
        restored = self.restore(step, abstract_state, other_layouts)
      except Exception as e:  # pylint: disable=broad-except  (shared with the other processes before it is raised)
        error = e
      outcome = READ if error is None else DAMAGED if isinstance(error, DamagedCheckpointError) else FAILED
      outcomes = _gather_outcomes(outcome)
      failed, damaged = _processes(outcomes, FAILED), _processes(outcomes, DAMAGED)
      if failed:  # whatever the others found: moving a step aside needs every process's word that it is damaged
        if outcome == FAILED:
          raise error
        raise CheckpointReadError(step, self.step_path(step), f"it failed on {failed} (see its log)")
      if damaged:
        error = error or DamagedCheckpointError(step, self.step_path(step), f"damaged on {damaged}")
        if on_damaged == "error":
          raise error
        aside = self.move_aside(step)
        warn(f"{error}; moved it aside to {aside} and trying the next older checkpoint")
        continue
      return (step,) + restored
    return None

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
    raise FileNotFoundError(
        f"{path} has no {CONFIG_FILE}: expected a directory written by "
        f"blt_jax.checkpoint.save_params (params/ + {CONFIG_FILE})"
    )
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
      # Restored onto this process's first device (without a sharding orbax hands back numpy arrays, which every
      # jitted call would then copy to the device again).
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    else:
      target = _to_abstract(_unbox(abstract))
    params = checkpointer.restore(params_dir, target)
  finally:
    checkpointer.close()
  return params, config
