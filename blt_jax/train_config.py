"""The training config schema: every field with its default and one comment. Files in `configs/` override it.

`python -m blt_jax.train --config configs/tiny.py --config.optimizer.lr=1e-3` loads `get_config()` from the file;
ml_collections rejects overrides of unknown keys, and `validate` rejects bad values before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import typing
from typing import Any, List, Mapping, Optional, Tuple

import ml_collections
from ml_collections import config_dict

from blt_jax import data as data_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import sharding
from blt_jax.data import patch_rows
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig


def _overridable(d: dict, none_types: Mapping[str, type]) -> ml_collections.ConfigDict:
  """ConfigDict of `d` that command-line flags can override: lists become tuples (flags cannot parse a list field)
  and a None value becomes a typed placeholder from `none_types` (flags cannot parse a field of type NoneType)."""
  out = ml_collections.ConfigDict()
  for k, v in d.items():
    if v is None:
      v = config_dict.placeholder(none_types[k])
    out[k] = tuple(v) if isinstance(v, list) else v
  return out


def _optional_type(hint: Any) -> type:
  """`int` for Optional[int], `tuple` for Optional[Tuple[int, ...]]: the type a flag parses the field's value as."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return typing.get_origin(args[0]) or args[0]


def _dataclass_config(instance) -> ml_collections.ConfigDict:
  d, hints = dataclasses.asdict(instance), typing.get_type_hints(type(instance))
  return _overridable(d, {k: _optional_type(hints[k]) for k, v in d.items() if v is None})


# The types of the fields that default to None outside the model dataclasses.
_DATA_NONE_TYPES = {"shuffle_seed": int, "max_eval_batches": int}
_MESH_NONE_TYPES = {"coordinator_address": str, "num_processes": int, "process_id": int, "logical_axis_rules": tuple}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_type = "blt"  # "blt" or "entropy_model": which model this run trains
  c.model = _dataclass_config(BLTConfig())  # BLTConfig fields (model_type=blt)
  c.entropy_model = _dataclass_config(EntropyModelConfig())  # EntropyModelConfig fields (model_type=entropy_model)
  # Converted or trained entropy model dir (`convert` output, or a training workdir's `export/`), used when
  # model_type=blt and patching.mode=entropy.
  c.entropy_checkpoint = ""
  c.patching = _dataclass_config(PatchingConfig())  # PatchingConfig fields (ignored for model_type=entropy_model)
  c.patching.max_patches = 0  # patches per row (P_max); 0 = seq_len + 1, which can never overflow
  c.patching.on_overflow = "count"  # "count": merge the tail into the last patch and log; "error": stop the run
  # What fills a row. "bytes": seq_len bytes, patched inside the step (a dense row can need more than max_patches:
  # overflow). "patches": the loader patches (the same rule, on the host) and ends each row after max_patches patches
  # or seq_len bytes, whichever comes first, so the global stack's slots hold real patches and nothing overflows
  # (`blt_jax/data/patch_rows.py`); entropy patching then needs data.entropy_store.
  c.patching.rows = "bytes"
  # > 0: the mean patch length entropy patching aims at. The threshold is calibrated for it at start-up on rows from
  # the start of the training stream (`blt_jax.calibrate`), replaces patching.threshold and is stored with the run
  # (checkpoints, export), so a resume, the scorer and generation reuse it. 0: patching.threshold as given.
  c.patching.target_bytes_per_patch = 0.0
  # With target_bytes_per_patch: rows calibrated on, spread over the stream's first 8 MiB (calibrate.sample_rows)
  c.patching.calibration_rows = 256
  # documents, split, loaders, on_bad_record ("error" stops on a record without text; "skip" counts and logs it):
  # each field's meaning is in blt_jax/data/pipeline.py's default_data_config
  c.data = _overridable(data_lib.default_data_config().to_dict(), _DATA_NONE_TYPES)
  c.seq_len = 4096  # bytes per training row
  c.global_batch_size = 8  # rows per optimizer step across all hosts (per micro-step with grad accumulation)
  c.grad_accum_steps = 1  # micro-batches summed per optimizer step
  c.optimizer = optimizer_lib.default_optimizer_config()  # AdamW + schedule (spec 13.1)
  c.num_steps = 1000  # optimizer steps; also the cosine schedule length
  c.param_dtype = "float32"  # master weights
  c.compute_dtype = "bfloat16"  # activations and matmuls
  c.remat = False  # rematerialise every transformer block in the backward pass
  c.remat_policy = (
      "full"  # with remat, what is kept (config.REMAT_POLICIES): full (recompute all), dots, save_qkv_proj...
  )
  c.scan_layers = False  # deep stacks (global, entropy model) as one lax.scan: compile time flat in depth
  c.attention_impl = "auto"  # self-attention kernel: auto (splash on TPU, cuDNN on GPU where it can), dense, blocked
  # data/fsdp/tensor sizes (one may be -1), logical rules (on the command line a tuple of pairs:
  # '(("batch", "data"), ("embed", None))'), multi-host
  c.mesh = _overridable(sharding.default_mesh_config().to_dict(), _MESH_NONE_TYPES)
  c.seed = 0  # params init and data order
  c.log_every = 10  # steps between metric lines / TensorBoard points
  c.eval_every = 100  # steps between validation passes (0 = only at the end)
  c.eval_batches = 8  # validation batches per pass (0 = the whole validation split)
  c.checkpoint_every = 100  # steps between checkpoints (the final step is always saved)
  c.keep_checkpoints = 3  # newest checkpoints kept (>= 1; 0 is an error: orbax would keep none, not all)
  c.async_checkpointing = True  # write checkpoints in the background
  # A checkpoint that no longer reads back (truncated/deleted files, bad json): "fallback" moves it aside to
  # `<step>.damaged` with a warning and resumes from the newest readable one; "error" stops, naming it.
  c.checkpoint_on_damaged = "fallback"
  # Fine-tune from a `python -m blt_jax.convert` output dir or another run's workdir (or its export/): its model,
  # patching and entropy model replace this config's; params are loaded, optimizer and step start fresh. A
  # checkpoint in --workdir wins over it (the run resumes). "" = train from a random init.
  c.init_from = ""
  # (start, stop): write a jax.profiler trace of steps start <= s < stop to WORKDIR/profile (TensorBoard's
  # profile tab, or Perfetto); () = off. Steps count from 1; start 2 or later leaves out the first step's compile.
  c.profile_steps = ()
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs may build on each other through this)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(cfg: ml_collections.ConfigDict):
  """The typed model config of the run (compute dtype and remat folded in)."""
  extra = dict(
      dtype=cfg.compute_dtype,
      remat=cfg.remat,
      scan_layers=cfg.get("scan_layers", False),
      attention_impl=cfg.get("attention_impl", "auto"),
      remat_policy=cfg.get("remat_policy", "full"),
  )
  if cfg.model_type == "blt":
    return BLTConfig.from_dict({**cfg.model.to_dict(), **extra})
  if cfg.model_type == "entropy_model":
    return EntropyModelConfig.from_dict({**cfg.entropy_model.to_dict(), **extra})
  raise ValueError(f"config.model_type={cfg.model_type!r}: expected 'blt' or 'entropy_model'")


def patching_config(cfg: ml_collections.ConfigDict) -> PatchingConfig:
  d = cfg.patching.to_dict()
  d.pop("max_patches")
  d.pop("on_overflow")
  d.pop("target_bytes_per_patch", None)
  d.pop("calibration_rows", None)
  d.pop("rows", None)
  return PatchingConfig.from_dict(d)


def max_patches(cfg: ml_collections.ConfigDict) -> int:
  return cfg.patching.max_patches or cfg.seq_len + 1


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Fail at start-up, naming the field, on values that would otherwise fail deep inside a jitted step."""
  model_config(cfg)
  if cfg.model_type == "blt":
    pc = patching_config(cfg)
    if pc.mode == "entropy" and not cfg.entropy_checkpoint and not cfg.data.entropy_store:
      raise ValueError(
          "config.patching.mode='entropy' needs config.entropy_checkpoint (a converted or trained "
          "entropy model dir) or config.data.entropy_store (precomputed entropies); or pick "
          "patching.mode in space/static/byte"
      )
    rows = cfg.patching.get("rows", "bytes")
    if rows not in patch_rows.ROW_MODES:
      raise ValueError(f"config.patching.rows={rows!r}: expected one of {patch_rows.ROW_MODES}")
    if rows == "patches" and pc.mode == "entropy" and not cfg.data.entropy_store:
      raise ValueError(
          "config.patching.rows='patches' with entropy patching needs config.data.entropy_store: the loader "
          "patches each row from stored entropies (scripts/precompute_entropies.py)"
      )
    if rows == "patches" and cfg.patching.max_patches == 1:
      raise ValueError("config.patching.rows='patches' needs config.patching.max_patches >= 2 (0: seq_len + 1)")
    if cfg.patching.on_overflow not in ("count", "error"):
      raise ValueError(f"config.patching.on_overflow={cfg.patching.on_overflow!r}: expected 'count' or 'error'")
    target = cfg.patching.get("target_bytes_per_patch", 0.0)
    if target and pc.mode != "entropy":
      raise ValueError(
          f"config.patching.target_bytes_per_patch={target} calibrates an entropy threshold: it needs "
          f"patching.mode='entropy' (got {pc.mode!r}); set it to 0 for other modes"
      )
    if target and not 1.0 <= target <= cfg.seq_len:
      raise ValueError(
          f"config.patching.target_bytes_per_patch={target}: a mean patch length lies between 1 and the "
          f"row length (seq_len={cfg.seq_len}); 0 uses patching.threshold"
      )
    if target and cfg.patching.calibration_rows < 1:
      raise ValueError(f"config.patching.calibration_rows must be >= 1, got {cfg.patching.calibration_rows}")
    if cfg.patching.max_patches < 0:
      raise ValueError(f"config.patching.max_patches must be >= 0, got {cfg.patching.max_patches}")
    if cfg.seq_len > cfg.model.max_encoder_seq_length:
      raise ValueError(
          f"config.seq_len={cfg.seq_len} exceeds model.max_encoder_seq_length="
          f"{cfg.model.max_encoder_seq_length} (the RoPE table bound, Q17)"
      )
    if max_patches(cfg) > cfg.model.max_seqlen:
      raise ValueError(
          f"config.patching.max_patches={max_patches(cfg)} (0 means seq_len + 1) exceeds "
          f"model.max_seqlen={cfg.model.max_seqlen} patches (the global RoPE table bound, Q17)"
      )
  elif cfg.seq_len > cfg.entropy_model.max_seqlen:
    raise ValueError(f"config.seq_len={cfg.seq_len} exceeds entropy_model.max_seqlen={cfg.entropy_model.max_seqlen}")
  for name in ("seq_len", "global_batch_size", "grad_accum_steps", "num_steps", "log_every", "checkpoint_every"):
    if int(cfg[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1, got {cfg[name]}")
  if cfg.keep_checkpoints < 1:  # unlike eval_batches=0, 0 cannot mean "all": orbax would delete every checkpoint
    raise ValueError(
        f"config.keep_checkpoints={cfg.keep_checkpoints}: must be >= 1 (how many of the newest "
        f"checkpoints to keep; 0 would keep none)"
    )
  if cfg.data.on_bad_record not in ("error", "skip"):
    raise ValueError(f"config.data.on_bad_record={cfg.data.on_bad_record!r}: expected 'error' or 'skip'")
  if cfg.checkpoint_on_damaged not in ("fallback", "error"):
    raise ValueError(f"config.checkpoint_on_damaged={cfg.checkpoint_on_damaged!r}: expected 'fallback' or 'error'")
  profile = tuple(cfg.profile_steps or ())
  if profile and (
      len(profile) != 2 or not all(isinstance(s, int) for s in profile) or not 1 <= profile[0] < profile[1]
  ):
    raise ValueError(f"config.profile_steps={cfg.profile_steps!r}: expected () or (start, stop) with 1 <= start < stop")
  # Params are always created in float32; accepting another value would silently ignore it.
  if cfg.param_dtype != "float32":
    raise ValueError(f"config.param_dtype={cfg.param_dtype!r}: only 'float32' master weights are supported")
  if cfg.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype={cfg.compute_dtype!r}: expected 'float32' or 'bfloat16'")


# Fields of a checkpoint's model dict that are run settings here (compute_dtype, remat and its policy, scan_layers,
# attention_impl), not its architecture.
_RUN_SETTINGS = ("dtype", "remat", "scan_layers", "attention_impl", "remat_policy")


def patching_entropy_model_config(cfg: ml_collections.ConfigDict, model: Mapping[str, Any]) -> EntropyModelConfig:
  """The in-graph entropy model of BLT run `cfg`: the architecture in `model` (an entropy model's config.json
  "model", or its config section), the run settings of `cfg`, as `init_from` does.

  Entropies are float32 whatever the model was trained in (patch boundaries compare them with a threshold), nothing
  is rematerialised (no gradient flows into it), and the kernel and scan follow this run's platform choices.
  """
  architecture = {k: v for k, v in model.items() if k not in _RUN_SETTINGS}
  return EntropyModelConfig.from_dict(
      {
          **architecture,
          "dtype": "float32",
          "remat": False,
          "scan_layers": cfg.get("scan_layers", False),
          "attention_impl": cfg.get("attention_impl", "auto"),
      }
  )


def apply_checkpoint_config(
    cfg: ml_collections.ConfigDict, meta: dict, entropy_checkpoint: Optional[str] = None
) -> List[Tuple[str, Any, Any]]:
  """Makes `cfg` describe the model in a checkpoint's config.json (`init_from`); returns (field, old, new) changes.

  The model section (`model` or `entropy_model`, by the checkpoint's model_type), its patching settings and, when
  given, its entropy model dir replace the config's; everything about the run (data, optimizer, mesh, seq_len,
  patching.max_patches, dtypes) stays as configured.
  """
  changes = []

  def assign(node, prefix: str, key: str, value: Any) -> None:
    if key not in node:
      raise ValueError(
          f"init_from: the checkpoint's config has field {prefix}{key}, which this version of blt_jax " f"does not know"
      )
    value = tuple(value) if isinstance(value, list) else value
    old = node[key]
    if (tuple(old) if isinstance(old, list) else old) != value:
      try:
        node[key] = value
      except TypeError as e:  # a typed field (placeholder) given a value of another type
        raise ValueError(f"init_from: the checkpoint's {prefix}{key}={value!r} does not fit its field ({e})") from None
      changes.append((prefix + key, old, value))

  model_type = meta.get("model_type")
  if model_type not in ("blt", "entropy_model"):
    raise ValueError(f"init_from: checkpoint model_type={model_type!r}, expected 'blt' or 'entropy_model'")
  assign(cfg, "", "model_type", model_type)
  section = "model" if model_type == "blt" else "entropy_model"
  for key, value in meta.get("model", {}).items():
    if key not in _RUN_SETTINGS:
      assign(cfg[section], section + ".", key, value)
  if model_type == "blt":
    for key, value in (meta.get("patching") or {}).items():
      assign(cfg.patching, "patching.", key, value)
    if meta.get("patching") and cfg.patching.get("target_bytes_per_patch"):  # its threshold is the one it learnt with
      assign(cfg.patching, "patching.", "target_bytes_per_patch", 0.0)
  if entropy_checkpoint:
    assign(cfg, "", "entropy_checkpoint", entropy_checkpoint)
  return changes


def config_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """Every dotted key of `cfg`, sections included ("optimizer", "optimizer.lr", ...)."""
  keys = []
  for name, value in cfg.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(config_keys(value, prefix + name + "."))
  return keys


def unknown_key_error(cfg: ml_collections.ConfigDict, key: str) -> Optional[str]:
  """None when `key` (dotted) is a field of `cfg`; else a one-line error naming it and the closest valid key."""
  known = config_keys(cfg)
  if key in known:
    return None
  section, _, leaf = key.rpartition(".")
  # Likeliest slips first: the right name in the wrong section (`lr` for `optimizer.lr`), a misspelt name in the
  # right section (`patching.treshold`), a misspelt section (`modle.dim_global`).
  guesses = [k for k in known if k.rpartition(".")[2] == leaf]
  if not guesses and (section in known or not section):
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    guesses = [siblings[g] for g in difflib.get_close_matches(leaf, list(siblings), n=1)]
  elif not guesses:
    guesses = difflib.get_close_matches(key, known, n=1)
  hint = f"; did you mean {guesses[0]!r}?" if guesses else ""
  return f"unknown config key {key!r}{hint} (every field is listed in blt_jax/train_config.py)"
