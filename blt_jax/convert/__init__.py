"""Convert released checkpoints into blt_jax params, and load converted checkpoints.

  config, params = convert("hf-weights/blt_1b")                 # one model dir -> (BLTConfig, numpy params)
  convert_dir("hf-weights/blt_1b", "ckpt/blt_1b")               # -> ckpt/blt_1b[/entropy_model] on disk
  convert_dir("blt-1b-hf", "ckpt/blt_1b", format="hf")         # transformers' BltForCausalLM layout
  config, params, patching = load_converted("ckpt/blt_1b")      # -> typed config, params (jax arrays)

Output layout of `convert_dir` (each model dir is a `checkpoint.save_params` dir: `params/` + `config.json`):
  out/config.json                {"format": "blt_jax", "model_type": "blt" | "entropy_model", "model": {...},
                                  "patching": {...} (BLT, when the source states it), "source": src, ...}
  out/params/                    orbax PyTree of float32 params
  out/entropy_model/{config.json,params/}   the BLT's entropy model, when the source ships one
When `src` is itself an entropy model, `out/` is that model.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from types import ModuleType
from typing import Any, Dict, Optional, Tuple, Union

import jax
import numpy as np

from blt_jax import config as config_lib
from blt_jax import paths
from blt_jax.convert import hf, reference
from blt_jax.convert.hf import ImportChoices
from blt_jax.convert.mapping import ConversionError

PathLike = Union[str, os.PathLike]
ModelConfig = Union[config_lib.BLTConfig, config_lib.EntropyModelConfig]

OUTPUT_FORMAT = "blt_jax"
BLT, ENTROPY = reference.BLT, reference.ENTROPY

# Source format -> reader module with `load_models(src, entropy_src=None, with_entropy=True, ...)` returning
# (model in src, its entropy model or None).
_FORMATS: Dict[str, ModuleType] = {"reference": reference, "hf": hf}
SUPPORTED_FORMATS = tuple(_FORMATS)

__all__ = [
    "ConversionError",
    "ImportChoices",
    "SUPPORTED_FORMATS",
    "convert",
    "convert_dir",
    "load_converted",
    "param_count",
]


# pylint: disable=redefined-builtin  (`format=` is the public argument name, as in the CLI's --format)


def convert(
    src: PathLike, format: str = "reference", choices: Optional[ImportChoices] = None
) -> Tuple[ModelConfig, Dict[str, Any]]:
  """(config, float32 numpy params) of the one model in directory `src` (a BLT or an entropy model).

  `choices`: format "hf" only, which behaviour the model gets where transformers and the reference differ.
  """
  main, _ = _load(format, src, None, False, choices)
  return main.config, main.params


def convert_dir(
    src: PathLike,
    out: PathLike,
    format: str = "reference",
    entropy_src: Optional[PathLike] = None,
    overwrite: bool = False,
    choices: Optional[ImportChoices] = None,
    dtype: str = "float32",
) -> Dict[str, Any]:
  """Converts `src` (and its entropy model) into the output layout at `out`; returns a summary dict.

  `dtype` "bfloat16" stores the floating-point params in bfloat16 (half the size, for inference only: loading
  such a checkpoint in float32 gives the bfloat16 values exactly, not the source's).

  `entropy_src` names the BLT's entropy model dir when it is not `src/entropy_model/` (e.g. the sibling
  `hf-weights/entropy_model/`; reference layout only). `out` appears only once everything is written (staged,
  then renamed).
  """
  _reader(format)
  if dtype not in ("float32", "bfloat16"):
    raise ConversionError(f"dtype {dtype!r}: expected float32 or bfloat16")
  src, out = pathlib.Path(os.path.abspath(src)), paths.resolve(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
  if entropy_src is not None and not pathlib.Path(entropy_src).is_dir():  # fail before loading a large BLT
    raise ConversionError(f"{entropy_src}: entropy model directory does not exist")
  main, entropy = _load(format, src, entropy_src, True, choices)
  entropy_dir = entropy.source if entropy is not None else None
  choices_dict = (choices or ImportChoices()).to_dict() if format == "hf" else None

  with paths.staged_dir(out, "converting") as staging:
    _write_params(
        staging,
        _cast_in_place(main.params, dtype),
        _config_json(main, src, format, entropy is not None, choices_dict, dtype),
    )
    if entropy is not None:
      _write_params(
          staging / reference.ENTROPY_SUBDIR,
          _cast_in_place(entropy.params, dtype),
          _config_json(entropy, entropy_dir, format, False, choices_dict, dtype),
      )

  models = [_summary(main, out)]
  if entropy is not None:
    models.append(_summary(entropy, out / reference.ENTROPY_SUBDIR))
  return {
      "out": str(out),
      "source": str(src),
      "format": format,
      "models": models,
      "patching": main.patching.to_dict() if main.patching else None,
      "choices": choices_dict,
  }


def load_converted(
    path: PathLike, abstract: Any = None, shardings: Any = None
) -> Tuple[ModelConfig, Any, Optional[config_lib.PatchingConfig]]:
  """(typed config, params, PatchingConfig or None) of a `convert_dir` output dir (or its entropy_model/).

  `abstract`: a tree of `jax.ShapeDtypeStruct`s with shardings to restore onto; `shardings`: a tree of
  shardings matching the params (the abstract tree is then built from the config). Neither: default device.
  """
  from blt_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: only when reading)

  meta = checkpoint.read_params_config(path)
  if meta.get("format") != OUTPUT_FORMAT or meta.get("model_type") not in (BLT, ENTROPY):
    raise ConversionError(
        f"{pathlib.Path(path) / 'config.json'}: not a blt_jax converted checkpoint "
        f"(format={meta.get('format')!r}, model_type={meta.get('model_type')!r})"
    )
  cls = config_lib.BLTConfig if meta["model_type"] == BLT else config_lib.EntropyModelConfig
  config = cls.from_dict(meta["model"])
  patching = config_lib.PatchingConfig.from_dict(meta["patching"]) if meta.get("patching") else None
  if abstract is None and shardings is not None:
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params(config), shardings
    )
  params, _ = checkpoint.load_params(path, abstract)
  return config, params, patching


def abstract_params(config: ModelConfig) -> Any:
  """ShapeDtypeStructs of the params `config` builds (nothing is materialised): `loading.abstract_params`, unboxed."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from blt_jax import loading  # pylint: disable=g-import-not-at-top  (orbax and the model: only when needed)

  return nn.meta.unbox(loading.abstract_params(config))


def param_count(params: Any) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def _write_params(path: pathlib.Path, params: Dict[str, Any], meta: Dict[str, Any]) -> None:
  """`checkpoint.save_params`' layout (`params/` + `config.json`, read by `checkpoint.load_params`), written with
  little memory beyond the numpy params: orbax's default numpy handler deep-copies every array and OCDBT buffers
  the whole hash table before it lands (peak about 3x the params, scripts/convert_memory.py); here arrays are
  written in place, in chunks of at most 64 MiB, as plain zarr. Single process: conversion runs on one host."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (orbax: only when writing)
  from blt_jax import checkpoint  # pylint: disable=g-import-not-at-top

  config_json = json.dumps(meta, indent=2, sort_keys=True)
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()),
  )
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
  path.mkdir(parents=True, exist_ok=True)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that it skips the OCDBT merge it was told not to do
  try:
    with ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(path / checkpoint.PARAMS_DIR, args=ocp.args.PyTreeSave(params, save_args=save_args))
  finally:
    absl_logger.setLevel(level)
  (path / checkpoint.CONFIG_FILE).write_text(config_json)


_CHUNK_BYTES = 64 * 1024 * 1024


def _reader(format: str) -> ModuleType:
  if format not in _FORMATS:
    raise ValueError(f"unknown checkpoint format {format!r}; supported formats: {', '.join(SUPPORTED_FORMATS)}")
  return _FORMATS[format]


def _load(format: str, src, entropy_src, with_entropy: bool, choices: Optional[ImportChoices]):
  reader = _reader(format)
  if format == "hf":
    return reader.load_models(src, entropy_src, with_entropy, choices or ImportChoices())
  if choices is not None:
    raise ValueError(f"import choices are for format 'hf' (transformers' port), not {format!r}")
  return reader.load_models(src, entropy_src, with_entropy)


def _cast_in_place(params: Dict[str, Any], dtype: str) -> Dict[str, Any]:
  """`params` (nested dicts of numpy arrays) with floating leaves in `dtype`, replaced one leaf at a time so the
  peak is the params plus one cast leaf, not two copies of the model."""
  if dtype == "float32":
    return params
  target = np.dtype(jax.numpy.dtype(dtype))
  for key, value in params.items():
    if isinstance(value, dict):
      _cast_in_place(value, dtype)
    elif np.issubdtype(np.asarray(value).dtype, np.floating):
      params[key] = np.asarray(value).astype(target)
  return params


def _config_json(
    loaded: reference.LoadedModel,
    src: pathlib.Path,
    format: str,
    has_entropy_model: bool,
    choices: Optional[Dict[str, str]] = None,
    dtype: str = "float32",
) -> Dict[str, Any]:
  meta = {
      "format": OUTPUT_FORMAT,
      "model_type": loaded.model_type,
      "model": loaded.config.to_dict(),
      "source": str(src),
      "source_format": format,
      "weights_file": str(loaded.weights_file),
      "params_dtype": dtype,
  }
  if choices is not None:
    meta["import_choices"] = (
        choices  # where transformers and the reference differ (docs/converting.md, Hugging Face layout)
    )
  if loaded.patching is not None:
    meta["patching"] = loaded.patching.to_dict()
  if has_entropy_model:
    meta["entropy_model"] = reference.ENTROPY_SUBDIR  # relative to this dir
  return meta


def _summary(loaded: reference.LoadedModel, path: pathlib.Path) -> Dict[str, Any]:
  c = loaded.config
  if loaded.model_type == BLT:
    dims = {
        "dim_local_encoder": c.dim_local_encoder,
        "dim_global": c.dim_global,
        "dim_local_decoder": c.dim_local_decoder,
        "n_layers_local_encoder": c.n_layers_local_encoder,
        "n_layers_global": c.n_layers_global,
        "n_layers_local_decoder": c.n_layers_local_decoder,
        "cross_attn_k": c.cross_attn_k,
        "hash_tables": c.num_hash_tables,
        "hash_vocab": c.encoder_hash_byte_group_vocab,
    }
  else:
    dims = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "vocab_size": c.vocab_size}
  return {
      "model_type": loaded.model_type,
      "path": str(path),
      "params": param_count(loaded.params),
      "dims": dims,
      "weights_file": str(loaded.weights_file),
      "config_file": str(loaded.config_file),
  }
