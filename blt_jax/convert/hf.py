"""Hugging Face transformers layout (`BltForCausalLM`): read it into blt_jax, and describe blt_jax models in it.

A transformers BLT directory holds `config.json` (a `BltConfig`: top-level patching and hash fields, nested
`encoder_config` / `decoder_config` / `global_config` / `patcher_config`) and `model.safetensors`, or shards
listed by `model.safetensors.index.json`. The entropy model is inside, as `model.patcher.*` (when
`patch_in_forward` is set). Tensor names: `hf_keys.py`.

Where transformers computes differently from the reference (docs/converting.md, "Hugging Face layout"), `ImportChoices` says
which behaviour an imported model gets; the choice is written into the converted config, so it stays visible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from blt_jax import config as config_lib
from blt_jax import tokenizer
from blt_jax.convert import hf_keys, mapping, reference, safetensors_io

ConversionError = mapping.ConversionError
LoadedModel = reference.LoadedModel
BLT, ENTROPY = reference.BLT, reference.ENTROPY

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# transformers' own defaults for fields a config.json may leave out (BltConfig and its sub-configs, v5).
_TOP_DEFAULTS = dict(
    vocab_size=260,
    max_position_embeddings=4096,
    patch_in_forward=True,
    patch_size=4,
    patching_mode="entropy",
    patching_threshold=1.335442066192627,
    max_patch_length=None,
    local_attention_window_len=512,
    cross_attn_k=2,
    encoder_hash_byte_group_size=None,
    encoder_hash_byte_group_vocab=500002,
    encoder_hash_byte_group_nb_functions=1,
)
_SUB_DEFAULTS = {
    "encoder_config": dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=None,
        num_hidden_layers=1,
        rms_norm_eps=1e-5,
        max_position_embeddings=24576,
        intermediate_size=None,
        cross_attn_all_layers=False,
        cross_attn_k=2,
        hidden_size_global=2048,
        rope_theta=500000.0,
    ),
    "decoder_config": dict(
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=None,
        num_hidden_layers=9,
        rms_norm_eps=1e-5,
        max_position_embeddings=24576,
        intermediate_size=2816,
        cross_attn_all_layers=True,
        cross_attn_k=2,
        hidden_size_global=2048,
        rope_theta=500000.0,
    ),
    "global_config": dict(
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=None,
        num_hidden_layers=25,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        intermediate_size=5632,
        rope_theta=500000.0,
    ),
    "patcher_config": dict(
        vocab_size=260,
        hidden_size=768,
        num_hidden_layers=14,
        num_attention_heads=12,
        num_key_value_heads=None,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        intermediate_size=2048,
        sliding_window=512,
        rope_theta=10000.0,
    ),
}
_DEFAULT_HASH_SIZES = (3, 4, 5, 6, 7, 8)
TRANSFORMERS = "transformers"
REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class ImportChoices:
  """Which behaviour an imported model gets where transformers' port and the reference differ (docs/converting.md table)."""

  # With all-layer encoder cross-attention: "transformers" re-pools the patch queries before every cross-attention
  # (BLTConfig.encoder_repool_patches); "reference" pools once, as the reference does.
  encoder_pooling: str = TRANSFORMERS
  # "transformers": the patcher BltForCausalLM runs (entropy > threshold only; byte patches when it has none);
  # "reference": also honour config.json's reference fields patching_threshold_add / monotonicity.
  patcher: str = TRANSFORMERS

  def __post_init__(self):
    for name in ("encoder_pooling", "patcher"):
      if getattr(self, name) not in (TRANSFORMERS, REFERENCE):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected {TRANSFORMERS!r} or {REFERENCE!r}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Files.


def weight_files(src: pathlib.Path) -> List[pathlib.Path]:
  """The safetensors file(s) of a transformers directory: the shards its index names, or model.safetensors."""
  index = src / INDEX_FILE
  if index.is_file():
    weight_map = reference.read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ConversionError(f"{index}: no 'weight_map' naming the shards")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (src / s).is_file()]
    if missing:
      raise ConversionError(f"{index} names shard(s) that are not in {src}: {', '.join(missing)}")
    return [src / s for s in shards]
  if (src / WEIGHTS_FILE).is_file():
    return [src / WEIGHTS_FILE]
  found = reference._listing(src)  # pylint: disable=protected-access
  hint = " (pytorch_model.bin is not read: save with safe_serialization=True)" if "pytorch_model.bin" in found else ""
  raise ConversionError(f"{src}: no {WEIGHTS_FILE} or {INDEX_FILE} (found {found}){hint}")


def open_weights(src: pathlib.Path) -> Tuple[reference.SafetensorsSource, str, pathlib.Path]:
  """All tensors of the directory's safetensors file(s), by name (headers only), a label for messages and the
  file that names them (model.safetensors or the index)."""
  files = weight_files(src)
  infos: Dict[str, safetensors_io.TensorInfo] = {}
  for path in files:
    try:
      header = safetensors_io.read_header(path)
    except safetensors_io.SafetensorsError as e:
      raise ConversionError(str(e)) from None
    twice = sorted(set(header) & set(infos))
    if twice:
      raise ConversionError(f"{path}: tensor(s) {', '.join(twice[:5])} also in {infos[twice[0]].path}")
    infos.update(header)
  if len(files) == 1 and not (src / INDEX_FILE).is_file():
    return reference.SafetensorsSource(infos), str(files[0]), files[0]
  return reference.SafetensorsSource(infos), f"{src / INDEX_FILE} ({len(files)} shards)", src / INDEX_FILE


def read_config(src: pathlib.Path) -> Dict[str, Any]:
  path = src / CONFIG_FILE
  if not path.is_file():
    raise ConversionError(f"{src}: no {CONFIG_FILE} (found {reference._listing(src)})")  # pylint: disable=protected-access
  raw = reference.read_json(path)
  if "args" in raw and "model_type" not in raw:
    raise ConversionError(f"{path}: a reference-layout config ({{'args': ...}}); convert it with --format reference")
  if raw.get("model_type") != "blt":
    raise ConversionError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'blt' (BltForCausalLM)")
  return raw


# ---------------------------------------------------------------------------------------------------------------
# config.json -> our configs.


def _sub(raw: Mapping[str, Any], name: str, path: pathlib.Path) -> Dict[str, Any]:
  sub = raw.get(name) or {}
  if not isinstance(sub, Mapping):
    raise ConversionError(f"{path}: {name} is a {type(sub).__name__}, expected an object")
  out = dict(_SUB_DEFAULTS[name])
  out.update(
      {
          k: v
          for k, v in sub.items()
          if v is not None or k in ("num_key_value_heads", "sliding_window", "intermediate_size")
      }
  )
  rope = sub.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ConversionError(
        f"{path}: {name}.rope_parameters.rope_type={rope['rope_type']!r} is not supported " f"(BLT uses plain RoPE)"
    )
  out["rope_theta"] = float(rope.get("rope_theta", sub.get("rope_theta", out["rope_theta"])))
  if out.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{path}: {name}.hidden_act={out['hidden_act']!r} is not supported (SwiGLU uses silu)")
  if out["num_key_value_heads"] is None:
    out["num_key_value_heads"] = out["num_attention_heads"]
  if out.get("intermediate_size") is None:
    out["intermediate_size"] = int(8 * out["hidden_size"] / 3)  # transformers' own fallback
  return out


def _explicit_ffn(dim: int, width: int) -> Optional[int]:
  """None when `width` is what the reference derives from `dim` (so configs of released models stay identical)."""
  return None if width == config_lib.ffn_hidden_dim(dim, 256, 1.0) else int(width)


def _same(path: pathlib.Path, what: str, values: Mapping[str, Any]):
  if len(set(values.values())) > 1:
    stated = ", ".join(f"{k}={v}" for k, v in values.items())
    raise ConversionError(f"{path}: blt_jax needs one {what} for the encoder, global and decoder ({stated})")
  return next(iter(values.values()))


def blt_config_from_hf(
    raw: Mapping[str, Any], choices: ImportChoices = ImportChoices(), path: pathlib.Path = pathlib.Path(CONFIG_FILE)
) -> config_lib.BLTConfig:
  """`BLTConfig` of a transformers `BltConfig` dict (its nested sub-configs included)."""
  top = dict(_TOP_DEFAULTS)
  top.update(
      {
          k: v
          for k, v in raw.items()
          if k in _TOP_DEFAULTS
          and (v is not None or k in ("max_patch_length", "local_attention_window_len", "encoder_hash_byte_group_size"))
      }
  )
  enc, dec, glb = (_sub(raw, n, path) for n in ("encoder_config", "decoder_config", "global_config"))
  k = int(top["cross_attn_k"])
  _same(
      path,
      "cross_attn_k",
      {
          "cross_attn_k": k,
          "encoder_config.cross_attn_k": enc["cross_attn_k"],
          "decoder_config.cross_attn_k": dec["cross_attn_k"],
      },
  )
  rope_theta = _same(
      path,
      "rope_theta",
      {
          f"{n}.rope_theta": s["rope_theta"]
          for n, s in (("encoder_config", enc), ("global_config", glb), ("decoder_config", dec))
      },
  )
  norm_eps = _same(
      path,
      "rms_norm_eps",
      {
          f"{n}.rms_norm_eps": s["rms_norm_eps"]
          for n, s in (("encoder_config", enc), ("global_config", glb), ("decoder_config", dec))
      },
  )
  if dec["hidden_size_global"] != glb["hidden_size"]:
    raise ConversionError(
        f"{path}: decoder_config.hidden_size_global={dec['hidden_size_global']} but "
        f"global_config.hidden_size={glb['hidden_size']}"
    )
  enc_kv = None if enc["num_key_value_heads"] == enc["num_attention_heads"] else enc["num_key_value_heads"]
  dec_kv_implied = enc_kv if enc_kv is not None else dec["num_attention_heads"]
  all_layers_enc = bool(enc["cross_attn_all_layers"])
  sizes = top["encoder_hash_byte_group_size"] or _DEFAULT_HASH_SIZES
  try:
    return config_lib.BLTConfig(
        vocab_size=int(top["vocab_size"]),
        dim_local_encoder=enc["hidden_size"],
        n_layers_local_encoder=enc["num_hidden_layers"],
        n_heads_local_encoder=enc["num_attention_heads"],
        dim_global=glb["hidden_size"],
        n_layers_global=glb["num_hidden_layers"],
        n_heads_global=glb["num_attention_heads"],
        n_kv_heads_global=(
            None if glb["num_key_value_heads"] == glb["num_attention_heads"] else glb["num_key_value_heads"]
        ),
        dim_local_decoder=dec["hidden_size"],
        n_layers_local_decoder=dec["num_hidden_layers"],
        n_heads_local_decoder=dec["num_attention_heads"],
        n_kv_heads=enc_kv,
        n_kv_heads_local_decoder=(None if dec["num_key_value_heads"] == dec_kv_implied else dec["num_key_value_heads"]),
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        norm_eps=float(norm_eps),
        rope_theta=float(rope_theta),
        max_seqlen=int(glb["max_position_embeddings"]),
        max_encoder_seq_length=int(min(enc["max_position_embeddings"], dec["max_position_embeddings"])),
        local_attention_window_len=top["local_attention_window_len"],
        cross_attn_k=k,
        # transformers' cross-attention has the heads (and kv heads) of its local stack.
        cross_attn_nheads=enc["num_attention_heads"],
        cross_attn_nheads_decoder=(
            None if dec["num_attention_heads"] == enc["num_attention_heads"] else dec["num_attention_heads"]
        ),
        cross_attn_all_layers_encoder=all_layers_enc,
        cross_attn_all_layers_decoder=bool(dec["cross_attn_all_layers"]),
        downsampling_by_pooling="max",  # transformers' patch_reduce is amax
        encoder_hash_byte_group_size=tuple(int(n) for n in sizes),
        encoder_hash_byte_group_vocab=int(top["encoder_hash_byte_group_vocab"]),
        encoder_hash_byte_group_nb_functions=int(top["encoder_hash_byte_group_nb_functions"]),
        intermediate_size_local_encoder=_explicit_ffn(enc["hidden_size"], enc["intermediate_size"]),
        intermediate_size_global=_explicit_ffn(glb["hidden_size"], glb["intermediate_size"]),
        intermediate_size_local_decoder=_explicit_ffn(dec["hidden_size"], dec["intermediate_size"]),
        encoder_repool_patches=all_layers_enc and choices.encoder_pooling == TRANSFORMERS,
    )
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{path}: invalid BLT config: {e}") from None


def entropy_config_from_hf(
    raw: Mapping[str, Any], path: pathlib.Path = pathlib.Path(CONFIG_FILE)
) -> config_lib.EntropyModelConfig:
  """`EntropyModelConfig` of the `patcher_config` of a transformers `BltConfig` dict."""
  p = _sub(raw, "patcher_config", path)
  try:
    return config_lib.EntropyModelConfig(
        dim=p["hidden_size"],
        n_layers=p["num_hidden_layers"],
        n_heads=p["num_attention_heads"],
        n_kv_heads=None if p["num_key_value_heads"] == p["num_attention_heads"] else p["num_key_value_heads"],
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        norm_eps=float(p["rms_norm_eps"]),
        rope_theta=float(p["rope_theta"]),
        vocab_size=int(p["vocab_size"]),
        max_seqlen=int(p["max_position_embeddings"]),
        sliding_window=p["sliding_window"],
        intermediate_size=_explicit_ffn(p["hidden_size"], p["intermediate_size"]),
    )
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{path}: invalid patcher_config: {e}") from None


def patching_from_hf(
    raw: Mapping[str, Any],
    has_patcher: bool,
    choices: ImportChoices = ImportChoices(),
    path: pathlib.Path = pathlib.Path(CONFIG_FILE),
) -> config_lib.PatchingConfig:
  """The patcher an imported model runs (see ImportChoices.patcher)."""
  top = dict(_TOP_DEFAULTS)
  top.update({k: v for k, v in raw.items() if k in _TOP_DEFAULTS})
  mode = top["patching_mode"] or "entropy"
  if choices.patcher == TRANSFORMERS:
    for key in ("patching_threshold_add", "monotonicity"):
      if raw.get(key) not in (None, False):  # written by transformers' converter; its patcher never reads them
        logging.info(
            "%s: %s=%r is not used by transformers' patcher; ignored (patcher=%r)",
            path,
            key,
            raw.get(key),
            choices.patcher,
        )
    if mode != "entropy" or not has_patcher:
      # Without a patcher, BltForCausalLM falls back to one byte per patch when no patch_lengths are given.
      return config_lib.PatchingConfig(mode="byte", threshold=float(top["patching_threshold"]))
    return config_lib.PatchingConfig(
        mode="entropy", threshold=float(top["patching_threshold"]), max_patch_length=top["max_patch_length"]
    )
  patch_size = raw.get("patch_size")
  try:
    return config_lib.PatchingConfig(
        mode=mode,
        threshold=float(top["patching_threshold"]),
        threshold_add=raw.get("patching_threshold_add"),
        monotonicity=bool(raw.get("monotonicity", False)),
        max_patch_length=top["max_patch_length"],
        patch_size=int(patch_size) if mode == "static" and patch_size is not None else None,
    )
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{path}: patching fields not usable by blt_jax: {e}") from None


def blt_targets(config: config_lib.BLTConfig, shapes: Mapping) -> Dict[str, mapping.Target]:
  """transformers key -> Target for a BLT of `config` (cross-attention kv heads as its local stacks')."""
  dec_heads = config.decoder_cross_attn_nheads
  return hf_keys.blt_targets(
      shapes,
      encoder_kv_repeat=config.cross_attn_nheads // config.encoder_stack().kv_heads,
      decoder_kv_repeat=dec_heads // config.decoder_stack().kv_heads,
      encoder_head_dim=config.dim_local_encoder // config.cross_attn_nheads,
      decoder_head_dim=config.dim_local_decoder // dec_heads,
  )


# ---------------------------------------------------------------------------------------------------------------
# One directory -> the BLT and its entropy model.


def load_models(
    src, entropy_src=None, with_entropy: bool = True, choices: ImportChoices = ImportChoices()
) -> Tuple[LoadedModel, Optional[LoadedModel]]:
  """(BLT, entropy model or None) of a transformers directory; the entropy model is its `model.patcher.*`."""
  if entropy_src is not None:
    raise ConversionError(
        "--entropy-src is for the reference layout: a transformers checkpoint carries its "
        "entropy model inside (model.patcher.*)"
    )
  src = reference._existing_dir(src)  # pylint: disable=protected-access
  raw = read_config(src)
  config_file = src / CONFIG_FILE
  source, label, weights_file = open_weights(src)
  has_patcher = any(k.startswith(hf_keys.PATCHER_PREFIX) for k in source.keys())
  if not has_patcher and not any(k.startswith(hf_keys.BLT_PREFIX) for k in source.keys()):
    raise ConversionError(
        f"{label}: no tensor of the transformers BLT layout (model.local_encoder..., "
        f"lm_head.weight); for the reference layout use --format reference"
    )
  if raw.get("patch_in_forward", True) and not has_patcher:
    logging.warning(
        "%s: patch_in_forward is set but there are no model.patcher.* tensors; no entropy model", config_file
    )

  config = blt_config_from_hf(raw, choices, config_file)
  shapes = mapping.expected_shapes(config)
  targets = blt_targets(config, shapes)
  blt_source = _Filtered(source, lambda k: not k.startswith(hf_keys.PATCHER_PREFIX))
  params = mapping.params_from_source(
      blt_source, targets, shapes, f"{label} (config {CONFIG_FILE})", hf_keys.is_ignored, model_name="BLT"
  )
  patching = patching_from_hf(raw, has_patcher, choices, config_file)
  main = LoadedModel(BLT, config, params, patching, weights_file, config_file, src)

  entropy = None
  if with_entropy and has_patcher:
    ent_config = entropy_config_from_hf(raw, config_file)
    ent_shapes = mapping.expected_shapes(ent_config)
    ent_source = _Filtered(source, lambda k: k.startswith(hf_keys.PATCHER_PREFIX))
    ent_params = mapping.params_from_source(
        ent_source,
        hf_keys.patcher_targets(ent_shapes),
        ent_shapes,
        f"{label} (model.patcher.*, config {CONFIG_FILE})",
        hf_keys.is_ignored,
        model_name="entropy model",
    )
    entropy = LoadedModel(ENTROPY, ent_config, ent_params, None, main.weights_file, config_file, src)
  return main, entropy


class _Filtered:
  """The tensors of a source whose names pass `keep` (the BLT's and the patcher's share one file)."""

  def __init__(self, source, keep):
    self._source = source
    self._keys = [k for k in source.keys() if keep(k)]

  def keys(self):
    return self._keys

  def shape(self, key):
    return self._source.shape(key)

  def read(self, key, rows=None):
    return self._source.read(key, rows)


# ---------------------------------------------------------------------------------------------------------------
# Our configs -> config.json (export).


def hf_config(
    config: config_lib.BLTConfig,
    entropy: Optional[config_lib.EntropyModelConfig],
    patching: Optional[config_lib.PatchingConfig],
    dtype: str,
) -> Tuple[Dict[str, Any], List[str]]:
  """(transformers config.json dict, problems): every way BltForCausalLM would compute differently from blt_jax
  with these configs, or could not hold the weights. An empty list means the export is faithful (docs/converting.md table).
  """
  c = config
  problems = []
  enc, glb, dec = c.encoder_stack(), c.global_stack(), c.decoder_stack()
  if c.cross_attn_nheads != c.n_heads_local_encoder or c.decoder_cross_attn_nheads != c.n_heads_local_decoder:
    problems.append(
        f"cross-attention heads ({c.cross_attn_nheads} encoder, {c.decoder_cross_attn_nheads} decoder) "
        f"differ from the local stacks' heads ({c.n_heads_local_encoder}, {c.n_heads_local_decoder}); "
        f"transformers uses the latter"
    )
  if c.head_dim is not None:
    for s, name in ((enc, "encoder"), (glb, "global"), (dec, "decoder")):
      if s.hd * s.n_heads != s.dim:
        problems.append(f"head_dim={c.head_dim} in the {name} is not dim/heads; transformers derives it")
  if c.cross_attn_window_encoder is not None or c.cross_attn_window_decoder is not None:
    problems.append("cross-attention windows (cross_attn_window_encoder/decoder) do not exist in transformers")
  if c.downsampling_by_pooling != "max":
    problems.append(f"downsampling_by_pooling={c.downsampling_by_pooling!r}: transformers pools with max only")
  if c.ngram_vocab_sizes:
    problems.append("frequency n-gram embeddings (ngram_vocab_sizes) do not exist in transformers")
  if c.cross_attn_all_layers_encoder and c.n_layers_local_encoder > 1 and not c.encoder_repool_patches:
    problems.append(
        "all-layer encoder cross-attention pools the patch queries once here (the reference), but "
        "transformers re-pools them before every layer (encoder_repool_patches=False)"
    )
  if c.vocab_size != tokenizer.VOCAB_SIZE:
    problems.append(f"vocab_size={c.vocab_size}: transformers' BLT tokenizer has {tokenizer.VOCAB_SIZE} ids")
  rope = lambda theta: {"rope_theta": float(theta), "rope_type": "default"}

  def stack(s: config_lib.StackConfig, max_pos: int) -> Dict[str, Any]:
    return {
        "hidden_size": s.dim,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.kv_heads,
        "num_hidden_layers": s.n_layers,
        "intermediate_size": s.ffn_dim,
        "rms_norm_eps": s.norm_eps,
        "max_position_embeddings": max_pos,
        "rope_parameters": rope(s.rope_theta),
        "hidden_act": "silu",
        "dropout": 0.0,
    }

  out: Dict[str, Any] = {
      "architectures": ["BltForCausalLM"],
      "model_type": "blt",
      "dtype": dtype,
      "vocab_size": c.vocab_size,
      "max_position_embeddings": c.max_seqlen,
      "local_attention_window_len": c.local_attention_window_len,
      "cross_attn_k": c.cross_attn_k,
      "encoder_hash_byte_group_size": list(c.encoder_hash_byte_group_size),
      "encoder_hash_byte_group_vocab": c.encoder_hash_byte_group_vocab,
      "encoder_hash_byte_group_nb_functions": c.encoder_hash_byte_group_nb_functions,
      "rope_parameters": rope(c.rope_theta),
      "tie_word_embeddings": False,
      "bos_token_id": tokenizer.BOS_ID,
      "eos_token_id": tokenizer.EOS_ID,
      "pad_token_id": tokenizer.BOE_ID,
      "encoder_config": dict(
          stack(enc, c.max_encoder_seq_length),
          vocab_size=c.vocab_size,
          cross_attn_all_layers=c.cross_attn_all_layers_encoder,
          cross_attn_k=c.cross_attn_k,
          hidden_size_global=c.dim_global,
          sliding_window=c.local_attention_window_len,
      ),
      "decoder_config": dict(
          stack(dec, c.max_encoder_seq_length),
          vocab_size=c.vocab_size,
          cross_attn_all_layers=c.cross_attn_all_layers_decoder,
          cross_attn_k=c.cross_attn_k,
          hidden_size_global=c.dim_global,
      ),
      "global_config": stack(glb, c.max_seqlen),
  }
  # Patching: transformers patches inside forward only with entropies > threshold (and its patcher).
  out["patch_in_forward"] = entropy is not None
  out["patching_mode"] = patching.mode if patching is not None else "entropy"
  out["patching_threshold"] = float(patching.threshold) if patching is not None else _TOP_DEFAULTS["patching_threshold"]
  out["max_patch_length"] = patching.max_patch_length if patching is not None else None
  out["patch_size"] = (
      patching.patch_size if patching is not None and patching.patch_size else _TOP_DEFAULTS["patch_size"]
  )
  out["patching_batch_size"] = 1
  if patching is not None and patching.mode == "entropy":
    if patching.threshold_add is not None or patching.monotonicity:
      problems.append(
          f"patching with threshold_add={patching.threshold_add} / monotonicity={patching.monotonicity}:"
          f" transformers' patcher applies the threshold only"
      )
    if entropy is None:
      problems.append(
          "entropy patching without an entropy model: transformers would patch one byte per patch "
          "unless given patch_lengths"
      )
  elif patching is not None and patching.mode != "byte":
    problems.append(
        f"patching mode {patching.mode!r}: transformers patches inside forward by entropy only (pass "
        f"patch_lengths from blt_jax.patching)"
    )
  if patching is not None and patching.max_patch_length is not None:
    problems.append(
        "max_patch_length: transformers splits the patch lengths without the next-token position, so "
        "the last byte's patch can differ"
    )
  if entropy is not None:
    e = entropy.stack()
    if entropy.head_dim is not None and entropy.head_dim * entropy.n_heads != entropy.dim:
      problems.append("entropy model head_dim is not dim/heads; transformers derives it")
    out["patcher_config"] = dict(
        stack(e, entropy.max_seqlen), vocab_size=entropy.vocab_size, sliding_window=entropy.sliding_window
    )
  return out, problems


def hf_export_targets(
    config: config_lib.BLTConfig, shapes: Mapping, entropy_shapes: Optional[Mapping]
) -> Dict[str, mapping.Target]:
  """Every tensor of the transformers checkpoint of these models -> where it comes from in ours ("model.patcher."
  names read from the entropy model's params)."""
  targets = dict(blt_targets(config, shapes))
  if entropy_shapes is not None:
    targets.update(hf_keys.patcher_targets(entropy_shapes))
  return targets


def dtype_of(name: str) -> np.dtype:
  return np.dtype(safetensors_io.DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[name]])


def index_json(weight_map: Mapping[str, str], total_size: int) -> str:
  return json.dumps(
      {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
  )
