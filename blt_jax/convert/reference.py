"""Read checkpoints in the reference's released directory layouts (spec 14.1).

One model directory holds one weights file and one config json:
  * `params.json` (a full TrainArgs: `model` = BLT args, `entropy_model` = entropy-model args,
    `data.patcher_args`) + `consolidated.pth` (or `consolidated/consolidated.pth`), `torch.save({"model": sd})`;
  * HF-hub style `config.json` = `{"args": {...}}` + `model.safetensors` (+ `train_args.json` for patcher args).
Whether a directory holds a BLT or an entropy model is read from its tensor names (the json of a BLT also
carries an `entropy_model` section). A BLT directory may hold its entropy model in `entropy_model/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import zipfile
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from blt_jax import config as config_lib
from blt_jax.convert import keys
from blt_jax.convert import mapping
from blt_jax.convert import safetensors_io

PathLike = Union[str, os.PathLike]
ModelConfig = Union[config_lib.BLTConfig, config_lib.EntropyModelConfig]

BLT, ENTROPY = "blt", "entropy_model"
# Searched in this order; the first one present is the model's weights. The safetensors file comes first: it needs
# neither pickle nor torch, and a directory holding both carries the same weights twice.
WEIGHT_FILES = ("model.safetensors", "consolidated.pth", "consolidated/consolidated.pth", "consolidated_with_rope.pth")
CONFIG_FILES = ("params.json", "config.json")
TRAIN_ARGS_FILE = "train_args.json"  # HF-hub copy of params.json, read for the patcher args only
ENTROPY_SUBDIR = "entropy_model"

# Fields without which no dimension can be read (the reference's json dumps always contain them).
_REQUIRED = {
    BLT: (
        "dim_local_encoder",
        "n_layers_local_encoder",
        "n_heads_local_encoder",
        "dim_global",
        "n_layers_global",
        "n_heads_global",
        "dim_local_decoder",
        "n_layers_local_decoder",
        "n_heads_local_decoder",
    ),
    ENTROPY: ("dim", "n_layers", "n_heads"),
}
_TRANSFORMERS_PREFIXES = ("model.local_encoder.", "model.encoder_hash_tok_embedding.", "model.patcher.")
_BLT_PREFIXES = (
    "local_encoder.",
    "global_transformer.",
    "local_decoder.",
    "encoder_hash_tok_embedding.",
    "encoder_ngram_embedding.",
)


# One error type for every conversion problem (files, configs, tensors): a ValueError naming file and problem.
ConversionError = mapping.ConversionError


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """One converted model: typed config, float32 numpy params and where they came from."""

  model_type: str  # "blt" | "entropy_model"
  config: ModelConfig
  params: Dict[str, Any]
  patching: Optional[config_lib.PatchingConfig]  # BLT only, when the source states it
  weights_file: pathlib.Path
  config_file: pathlib.Path
  source: Optional[pathlib.Path] = None  # the model's directory


# ---------------------------------------------------------------------------------------------------------------
# Files.


def find_weights(src: PathLike) -> pathlib.Path:
  src = _existing_dir(src)
  for name in WEIGHT_FILES:
    if (src / name).is_file():
      return src / name
  raise ConversionError(f"{src}: no weights file (looked for {', '.join(WEIGHT_FILES)}; found " f"{_listing(src)})")


def find_config(src: PathLike) -> pathlib.Path:
  src = _existing_dir(src)
  for name in CONFIG_FILES:
    if (src / name).is_file():
      return src / name
  raise ConversionError(f"{src}: no config json (looked for {', '.join(CONFIG_FILES)}; found {_listing(src)})")


def entropy_model_dir(src: PathLike) -> Optional[pathlib.Path]:
  """`src/entropy_model/` when it holds weights (a BLT shipped with its entropy model), else None."""
  sub = pathlib.Path(src) / ENTROPY_SUBDIR
  if sub.is_dir() and any((sub / name).is_file() for name in WEIGHT_FILES):
    return sub
  return None


def read_json(path: PathLike) -> Dict[str, Any]:
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: cannot read ({e})") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a JSON object, got a {type(data).__name__}")
  return data


def open_weights(path: pathlib.Path):
  """A tensor source over `path` (keys, shapes, per-tensor reads); nothing is converted up front."""
  if path.suffix == ".safetensors":
    try:
      return SafetensorsSource(safetensors_io.read_header(path))
    except safetensors_io.SafetensorsError as e:
      raise ConversionError(str(e)) from None
  # torch.load memory-maps the state dict; each tensor (or row block) is copied out only when read.
  return mapping.DictSource(_read_torch(path), _torch_to_numpy)


class SafetensorsSource:
  """Tensors of one or more safetensors files, read one at a time in their stored dtype (the mapping widens)."""

  def __init__(self, infos: Mapping[str, safetensors_io.TensorInfo]):
    self.infos = dict(infos)

  def keys(self):
    return self.infos.keys()

  def shape(self, key: str) -> tuple:
    return self.infos[key].shape

  def read(self, key: str, rows=None) -> np.ndarray:
    return safetensors_io.read_tensor(self.infos[key], rows)


def _torch_to_numpy(value) -> np.ndarray:
  """A torch tensor as numpy, floating point as float32 (numpy has no bfloat16)."""
  import torch  # pylint: disable=g-import-not-at-top

  return (value.to(torch.float32) if value.is_floating_point() else value).numpy()


def _read_torch(path: pathlib.Path) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        f"{path}: reading .pth checkpoints needs PyTorch (pip install torch); "
        f"a model.safetensors checkpoint can be read without it"
    ) from None
  try:
    # mmap avoids a second in-memory copy of multi-GB checkpoints; the legacy (non-zip) format cannot be mapped.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError, ...) for bad files
    raise ConversionError(
        f"{path}: cannot load torch checkpoint (corrupt or truncated?): " f"{type(e).__name__}: {e}"
    ) from None
  if isinstance(checkpoint, Mapping) and "model" in checkpoint:
    state_dict = checkpoint["model"]
  elif isinstance(checkpoint, Mapping) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
    state_dict = checkpoint  # a bare state dict
  else:
    found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(f"{path}: expected torch.save({{'model': state_dict}}), found {found}")
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{path}: entry {key!r} of the state dict is a {type(value).__name__}, not a tensor")
  return {key: value.detach() for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# Configs.


def model_type_of(state_dict: Mapping[str, Any]) -> Optional[str]:
  """ "blt" or "entropy_model" from tensor names; None when they say neither."""
  if any(k.startswith(_BLT_PREFIXES) for k in state_dict):
    return BLT
  if any(k == "tok_embeddings.weight" or k.startswith("layers.") for k in state_dict):
    return ENTROPY
  return None


def model_args(config_file: pathlib.Path, raw: Mapping[str, Any], model_type: str) -> Mapping[str, Any]:
  """The section of a config json that describes the `model_type` model."""
  if config_file.name == "config.json":
    section, args = "args", raw.get("args")
  else:  # params.json / train_args.json: a full TrainArgs
    section = "model" if model_type == BLT else "entropy_model"
    args = raw.get(section)
  if not isinstance(args, Mapping):
    raise ConversionError(
        f"{config_file}: no {section!r} section describing the {_NAME[model_type]} " f"(top-level keys: {sorted(raw)})"
    )
  if model_type == ENTROPY and "dim_global" in args:
    raise ConversionError(f"{config_file}: {section!r} describes a BLT, but the weights are an entropy model")
  return args


def model_config(config_file: pathlib.Path, args: Mapping[str, Any], model_type: str) -> ModelConfig:
  missing = [k for k in _REQUIRED[model_type] if args.get(k) is None]
  if missing:
    raise ConversionError(f"{config_file}: {_NAME[model_type]} config is missing field(s) {', '.join(missing)}")
  build = config_lib.blt_config_from_reference if model_type == BLT else config_lib.entropy_config_from_reference
  try:
    return build(args)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{config_file}: invalid {_NAME[model_type]} config: {e}") from None


def patching_config(
    src: pathlib.Path, config_file: pathlib.Path, raw: Mapping[str, Any], blt_args: Mapping[str, Any]
) -> Optional[config_lib.PatchingConfig]:
  """The patcher the BLT was trained with: `data.patcher_args`, else the BLT args' own patching fields."""
  patcher_args = _patcher_args(raw)
  if patcher_args is None and (src / TRAIN_ARGS_FILE).is_file():
    patcher_args = _patcher_args(read_json(src / TRAIN_ARGS_FILE))
  if patcher_args is None and "patching_mode" in blt_args:
    patcher_args = {
        "patching_mode": blt_args["patching_mode"],
        "threshold": blt_args.get("patching_threshold"),
        "threshold_add": blt_args.get("patching_threshold_add"),
        "monotonicity": blt_args.get("monotonicity", False),
        "max_patch_length": blt_args.get("max_patch_length"),
        "patch_size": blt_args.get("patch_size"),
    }
  if patcher_args is None:
    return None
  if patcher_args.get("patching_mode", "entropy") == "entropy" and patcher_args.get("threshold", 0.0) is None:
    # threshold=None is the reference's broken top-k mode (spec 3.3, Q15).
    logging.warning(
        "%s: entropy patching without a threshold is not supported; no patching config written", config_file
    )
    return None
  try:
    return config_lib.patching_config_from_reference(patcher_args)
  except (TypeError, ValueError) as e:
    # The weights are still usable with patch lengths from elsewhere; say why there is no patching config.
    logging.warning("%s: patcher args not usable by blt_jax (%s); no patching config written", config_file, e)
    return None


def _patcher_args(raw: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
  data = raw.get("data")
  if isinstance(data, Mapping) and isinstance(data.get("patcher_args"), Mapping):
    return data["patcher_args"]
  return None


# ---------------------------------------------------------------------------------------------------------------
# One directory -> one model.


def load_model(src: PathLike, parent: Optional[PathLike] = None) -> LoadedModel:
  """Converts the one model in `src` (a BLT or an entropy model) to our params.

  `parent`: the BLT directory that `src` (its `entropy_model/` subdir) belongs to; a subdir shipped without a
  config json takes the `entropy_model` section of the parent's params.json or train_args.json.
  """
  src = _existing_dir(src)
  weights_file = find_weights(src)
  config_file = _config_or_parents(src, parent)
  raw = read_json(config_file)
  source = open_weights(weights_file)
  if any(k.startswith(_TRANSFORMERS_PREFIXES) for k in source.keys()):
    raise ConversionError(
        f"{weights_file}: tensor names of the Hugging Face transformers layout "
        f"(model.local_encoder..., lm_head.weight); convert it with --format hf"
    )
  model_type = model_type_of(source.keys()) or _model_type_from_json(config_file, raw)
  args = model_args(config_file, raw, model_type)
  config = model_config(config_file, args, model_type)
  shapes = mapping.expected_shapes(config)
  params = mapping.params_from_source(
      source,
      mapping.reference_targets(shapes, "blt" if model_type == BLT else "entropy"),
      shapes,
      f"{weights_file} (config {config_file.name})",
      keys.is_ignored,
      model_name=_NAME[model_type],
  )
  patching = patching_config(src, config_file, raw, args) if model_type == BLT else None
  return LoadedModel(model_type, config, params, patching, weights_file, config_file, src)


def load_models(
    src: PathLike, entropy_src: Optional[PathLike] = None, with_entropy: bool = True
) -> "tuple[LoadedModel, Optional[LoadedModel]]":
  """(model in `src`, its entropy model or None): `entropy_src`, else `src/entropy_model/` when it has weights."""
  main = load_model(src)
  if main.model_type != BLT:
    if entropy_src is not None:
      raise ConversionError(f"{src} is itself an entropy model; entropy_src is only for a BLT source")
    return main, None
  entropy_dir = pathlib.Path(entropy_src) if entropy_src is not None else entropy_model_dir(src)
  if not with_entropy or entropy_dir is None:
    return main, None
  entropy = load_model(entropy_dir, parent=src if entropy_src is None else None)
  if entropy.model_type != ENTROPY:
    raise ConversionError(f"{entropy.weights_file}: expected the entropy model, found a {entropy.model_type}")
  return main, entropy


def _config_or_parents(src: pathlib.Path, parent: Optional[PathLike]) -> pathlib.Path:
  try:
    return find_config(src)
  except ConversionError:
    if parent is None:
      raise
    for name in ("params.json", TRAIN_ARGS_FILE):  # TrainArgs files; a parent config.json holds only BLT args
      if (pathlib.Path(parent) / name).is_file():
        return pathlib.Path(parent) / name
    raise


def _model_type_from_json(config_file: pathlib.Path, raw: Mapping[str, Any]) -> str:
  """Fallback when the tensor names are unrecognisable: the mapping then reports them all as unexpected."""
  if config_file.name == "config.json":
    args = raw.get("args")
    return BLT if isinstance(args, Mapping) and "dim_global" in args else ENTROPY
  return ENTROPY if raw.get("train_entropy_model") or not raw.get("model") else BLT


_NAME = {BLT: "BLT", ENTROPY: "entropy model"}


def _existing_dir(src: PathLike) -> pathlib.Path:
  src = pathlib.Path(src)
  if not src.exists():
    raise ConversionError(f"{src}: source directory does not exist")
  if not src.is_dir():
    raise ConversionError(f"{src}: not a directory (pass the directory that holds the weights and config json)")
  return src


def _listing(src: pathlib.Path, limit: int = 12) -> str:
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in src.iterdir())
  if not names:
    return "an empty directory"
  return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
