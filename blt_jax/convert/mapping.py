"""Reference state dict <-> params tree of ours, checked against the shapes the config implies."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Union

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from blt_jax.config import BLTConfig, EntropyModelConfig
from blt_jax.convert import keys as K


class ConversionError(ValueError):
  """A checkpoint does not match the model its config describes."""


def expected_shapes(config: Union[BLTConfig, EntropyModelConfig]) -> Dict[K.Path, tuple]:
  """Every param path of the model `config` builds -> its shape (no weights materialised)."""
  if isinstance(config, BLTConfig):
    from blt_jax.model import init_blt as init
  else:
    from blt_jax.entropy_model import init_entropy_model as init
  abstract = nn.meta.unbox(jax.eval_shape(lambda: init(jax.random.PRNGKey(0), config)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}


def params_from_state_dict(state_dict: Mapping[str, Any], config: Union[BLTConfig, EntropyModelConfig],
                           source: str = "checkpoint", dtype=np.float32) -> Dict:
  """Map a reference state dict onto our params; raise `ConversionError` naming every bad tensor."""
  is_blt = isinstance(config, BLTConfig)
  to_path = K.blt_key_to_path if is_blt else K.entropy_key_to_path
  shapes = expected_shapes(config)
  flat: Dict[K.Path, np.ndarray] = {}
  hash_parts: Dict[int, np.ndarray] = {}
  extra, misshaped = [], []
  for key, value in state_dict.items():
    if K.is_ignored(key):
      continue
    mapped = to_path(key)
    if mapped is None or mapped[0] not in shapes:
      extra.append(key)
      continue
    path, kind, table = mapped
    array = np.asarray(value)
    if kind == "hash":
      want = shapes[path][1:]
      if array.shape != want or table >= shapes[path][0]:
        misshaped.append(f"{key}: got {array.shape}, expected {want} (table index < {shapes[path][0]})")
      else:
        hash_parts[table] = array
      continue
    converted = K.to_ours(kind, array)
    if converted.shape != shapes[path]:
      want = shapes[path][::-1] if kind == "linear" else shapes[path]
      misshaped.append(f"{key}: got {array.shape}, expected {want}")
      continue
    flat[path] = converted
  for path, shape in shapes.items():
    if path == ("hash_embeddings", "embedding"):
      if len(hash_parts) == shape[0] and not misshaped:
        flat[path] = np.stack([hash_parts[m] for m in range(shape[0])])
  missing = []
  for path, shape in shapes.items():
    if path in flat:
      continue
    if path == ("hash_embeddings", "embedding"):
      missing += [f"encoder_hash_tok_embedding.{m}.weight" for m in range(shape[0]) if m not in hash_parts]
    else:
      missing.append(_reference_name(path, is_blt))
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {', '.join(sorted(missing))}")
  if extra:
    problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(sorted(extra))}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped tensor(s): {'; '.join(misshaped)}")
  if problems:
    raise ConversionError(f"{source} does not match its config ({'BLT' if is_blt else 'entropy model'}): "
                          + " | ".join(problems))
  params: Dict = {}
  for path, array in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(array, dtype=dtype)
  return params


def _reference_name(path: K.Path, is_blt: bool) -> str:
  return K._path_to_key(path, "blt" if is_blt else "entropy")


def state_dict_from_params(params: Mapping, model: str) -> Dict[str, np.ndarray]:
  """Our params -> reference state dict (for export and round-trip tests)."""
  out = {}
  for key, (path, kind, table) in K.reference_keys_for(params, model).items():
    leaf = params
    for p in path:
      leaf = leaf[p]
    leaf = np.asarray(leaf)
    out[key] = leaf[table] if kind == "hash" else K.to_reference(kind, leaf)
  return out
