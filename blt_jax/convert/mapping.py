"""Source tensors <-> params tree of ours, checked against the shapes the config implies.

A layout (the reference's, transformers') is described by its *targets*: every tensor name the layout must hold for
a config, with where it goes in our tree and how it is stored there. Conversion checks names and shapes first (from
the file headers, before any data is read), then reads tensor by tensor, so a checkpoint never sits in memory twice:
each tensor is cast to float32 straight into the params, and the hash tables are filled in row blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from blt_jax.config import BLTConfig, EntropyModelConfig
from blt_jax.convert import keys as K

HASH_PATH = ("hash_embeddings", "embedding")
_BLOCK_BYTES = 64 * 1024 * 1024  # hash tables are copied in row blocks of about this size


class ConversionError(ValueError):
  """A checkpoint does not match the model its config describes."""


class Target(NamedTuple):
  """Where one source tensor goes in our params, and how it is stored there."""

  path: K.Path
  kind: str  # "linear" (torch [out, in], ours transposed) | "norm" | "embedding" | "hash"
  table: Optional[int] = None  # hash: this table of our [M, V, dE] stack; None: all M tables fused as [M*V, dE]
  kv_repeat: int = 1  # linear: the source holds each kv head once, ours repeats it kv_repeat times (GQA -> MHA)
  head_dim: int = 0  # rows per head, for kv_repeat


def expected_shapes(config: Union[BLTConfig, EntropyModelConfig]) -> Dict[K.Path, tuple]:
  """Every param path of the model `config` builds -> its shape (no weights materialised)."""
  if isinstance(config, BLTConfig):
    from blt_jax.model import init_blt as init
  else:
    from blt_jax.entropy_model import init_entropy_model as init
  abstract = nn.meta.unbox(jax.eval_shape(lambda: init(jax.random.PRNGKey(0), config)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}


def source_shape(target: Target, our_shape: tuple) -> tuple:
  """The shape `target`'s tensor has in the source layout, given the shape of our param."""
  if target.kind == "hash":
    return tuple(our_shape[1:]) if target.table is not None else (our_shape[0] * our_shape[1], our_shape[2])
  if target.kind == "linear":
    return (our_shape[1] // target.kv_repeat, our_shape[0])
  return tuple(our_shape)


def to_ours(target: Target, array: np.ndarray, dtype=np.float32) -> np.ndarray:
  """A source tensor (not a hash table) -> our layout, as one new array of `dtype`."""
  if target.kind != "linear":
    return np.array(array, dtype=dtype)
  if target.kv_repeat > 1:  # [Hkv*hd, d] -> [Hkv*r*hd, d]: kv head j serves query heads j*r .. j*r+r-1 (spec 5.2)
    array = np.repeat(array.reshape(-1, target.head_dim, array.shape[-1]), target.kv_repeat, axis=0)
    array = array.reshape(-1, array.shape[-1])
  return np.ascontiguousarray(array.T, dtype=dtype)


def from_ours(target: Target, leaf: np.ndarray) -> np.ndarray:
  """Our param -> the source tensor of `target` (a view where possible); raises if GQA heads were not repeats."""
  if target.kind == "hash":
    return leaf[target.table] if target.table is not None else leaf.reshape(-1, leaf.shape[-1])
  if target.kind != "linear":
    return leaf
  w = leaf.T
  if target.kv_repeat > 1:
    heads = w.reshape(-1, target.kv_repeat, target.head_dim, w.shape[-1])
    if not np.array_equal(heads, np.broadcast_to(heads[:, :1], heads.shape)):
      raise ConversionError(
          f"{'/'.join(target.path)}: {target.kv_repeat} query heads share each kv head in the "
          f"target layout, but these weights differ between them"
      )
    w = heads[:, 0].reshape(-1, w.shape[-1])
  return w


class DictSource:
  """Tensors in a mapping (numpy arrays, or torch tensors), each turned into numpy by `to_numpy` only when read."""

  def __init__(self, tensors: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray] = np.asarray):
    self._tensors = tensors
    self._to_numpy = to_numpy

  def keys(self):
    return self._tensors.keys()

  def shape(self, key: str) -> tuple:
    return tuple(np.shape(self._tensors[key]))

  def read(self, key: str, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
    value = self._tensors[key]
    return self._to_numpy(value if rows is None else value[rows[0] : rows[1]])


def params_from_source(
    source,
    targets: Mapping[str, Target],
    shapes: Mapping[K.Path, tuple],
    where: str,
    is_ignored: Callable[[str], bool] = lambda key: False,
    dtype=np.float32,
    model_name: str = "model",
) -> Dict:
  """Reads every target of `source` into a params tree; raises `ConversionError` naming every bad tensor first."""
  present = set(source.keys())
  missing = sorted(key for key in targets if key not in present)
  extra, misshaped = [], []
  for key in present:
    if key in targets:
      want = source_shape(targets[key], shapes[targets[key].path])
      got = source.shape(key)
      if got != want:
        misshaped.append(f"{key}: got {got}, expected {want}")
    elif not is_ignored(key):
      extra.append(key)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
  if extra:
    problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(sorted(extra))}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped tensor(s): {'; '.join(misshaped)}")
  if problems:
    raise ConversionError(f"{where} does not match its config ({model_name}): " + " | ".join(problems))

  flat: Dict[K.Path, np.ndarray] = {}
  for key, target in targets.items():
    if target.kind == "hash":
      if target.path not in flat:
        flat[target.path] = np.empty(shapes[target.path], dtype)
      table = flat[target.path]
      dest = table[target.table] if target.table is not None else table.reshape(-1, table.shape[-1])
      for start, stop in _row_blocks(dest):
        dest[start:stop] = source.read(key, (start, stop))
    else:
      flat[target.path] = to_ours(target, source.read(key), dtype)
  return traverse_util.unflatten_dict(flat)


def _row_blocks(array: np.ndarray) -> Iterator[Tuple[int, int]]:
  rows = max(1, _BLOCK_BYTES // max(1, array[0].nbytes)) if len(array) else 1
  for start in range(0, len(array), rows):
    yield start, min(start + rows, len(array))


# ---------------------------------------------------------------------------------------------------------------
# The reference layout (spec 14.2).


def reference_targets(shapes: Mapping[K.Path, tuple], model: str) -> Dict[str, Target]:
  """Reference state-dict key -> Target for every param of the model with these param shapes."""
  return {
      key: Target(path, kind, table)
      for key, (path, kind, table) in K.reference_keys_for_shapes(dict(shapes), model).items()
  }


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    config: Union[BLTConfig, EntropyModelConfig],
    source: str = "checkpoint",
    dtype=np.float32,
) -> Dict:
  """Map a reference state dict onto our params; raise `ConversionError` naming every bad tensor."""
  is_blt = isinstance(config, BLTConfig)
  shapes = expected_shapes(config)
  return params_from_source(
      DictSource(state_dict),
      reference_targets(shapes, "blt" if is_blt else "entropy"),
      shapes,
      source,
      K.is_ignored,
      dtype,
      "BLT" if is_blt else "entropy model",
  )


def state_dict_from_params(params: Mapping, model: str) -> Dict[str, np.ndarray]:
  """Our params -> reference state dict (for export and round-trip tests)."""
  out = {}
  for key, (path, kind, table) in K.reference_keys_for(params, model).items():
    leaf = params
    for p in path:
      leaf = leaf[p]
    out[key] = np.ascontiguousarray(from_ours(Target(path, kind, table), np.asarray(leaf)))
  return out
