"""Reference state-dict key <-> blt_jax param path mapping (spec 14.2): the one table for the reference layout.

Torch `Linear.weight` is `[out, in]`; our `kernel` is `[in, out]`, so linear weights are transposed. The BLT's
per-table hash embeddings `encoder_hash_tok_embedding.{m}` are stacked into one `[M, V_hash, dE]` param.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import numpy as np
from flax import traverse_util

Path = Tuple[str, ...]

# Reference keys that hold no weights our model uses (non-persistent or dead in the reference).
IGNORED_KEYS = (
    re.compile(r"(^|\.)rope_embeddings\.freqs_cis$"),  # `consolidated_with_rope.pth` (issue #133)
    re.compile(r"^local_encoder\.token_embedding_projection\.weight$"),  # created, never applied (spec 7)
)

_HASH = re.compile(r"^encoder_hash_tok_embedding\.(\d+)\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.weight$")
_LAYER_NORM = re.compile(r"^layers\.(\d+)\.(attention_norm|ffn_norm)\.weight$")
_CROSS = re.compile(r"^cross_attn_layers\.(\d+)\.(wq|wk|wv|wo)\.weight$")
_CROSS_NORM = re.compile(r"^cross_attn_layers\.(\d+)\.(cross_attn_norm_q|cross_attn_norm_kv)\.weight$")
_NGRAM = re.compile(r"^encoder_ngram_embedding\.(\d+)\.weight$")


def _stack_key(rest: str) -> Optional[Tuple[Path, str]]:
  """Keys inside one transformer stack (relative to its prefix) -> (path, kind)."""
  if m := _LAYER.match(rest):
    return (f"layers_{m[1]}", m[2], m[3], "kernel"), "linear"
  if m := _LAYER_NORM.match(rest):
    return (f"layers_{m[1]}", m[2], "scale"), "norm"
  if m := _CROSS.match(rest):
    return (f"cross_attn_layers_{m[1]}", m[2], "kernel"), "linear"
  if m := _CROSS_NORM.match(rest):
    return (f"cross_attn_layers_{m[1]}", m[2], "scale"), "norm"
  if rest in ("patch_embedding_projection.weight", "token_embedding_projection.weight", "output.weight"):
    return (rest.split(".")[0], "kernel"), "linear"
  if rest == "norm.weight":
    return ("norm", "scale"), "norm"
  return None


def blt_key_to_path(key: str) -> Optional[Tuple[Path, str, Optional[int]]]:
  """BLT reference key -> (path, kind, hash table index or None); None when the key is not ours."""
  if m := _HASH.match(key):
    return ("hash_embeddings", "embedding"), "hash", int(m[1])
  if m := _NGRAM.match(key):
    return (f"ngram_embeddings_{m[1]}", "embedding"), "embedding", None
  if key == "local_encoder.tok_embeddings.weight":
    return ("tok_embeddings", "embedding"), "embedding", None
  for module in ("local_encoder", "global_transformer", "local_decoder"):
    if key.startswith(module + "."):
      found = _stack_key(key[len(module) + 1 :])
      if found is not None:
        return (module,) + found[0], found[1], None
  return None


def entropy_key_to_path(key: str) -> Optional[Tuple[Path, str, Optional[int]]]:
  """Entropy-model (LMTransformer) reference key -> (path, kind, None)."""
  if key == "tok_embeddings.weight":
    return ("tok_embeddings", "embedding"), "embedding", None
  found = _stack_key(key)
  if found is None or found[0][0].startswith("cross_attn") or found[0][0].endswith("projection"):
    return None
  return found[0], found[1], None


def to_ours(kind: str, array: np.ndarray) -> np.ndarray:
  """Reference tensor -> our layout (transpose linears)."""
  return np.ascontiguousarray(array.T) if kind == "linear" else array


# A transpose is its own inverse: the same conversion maps back.
to_reference = to_ours


def is_ignored(key: str) -> bool:
  return any(p.search(key) for p in IGNORED_KEYS)


def reference_keys_for(params: Dict, model: str) -> Dict[str, Tuple[Path, str, Optional[int]]]:
  """Inverse map (export, tests): reference key -> (path, kind, table) for every leaf of a params tree of ours."""
  flat = traverse_util.flatten_dict(params)
  return reference_keys_for_shapes({path: tuple(leaf.shape) for path, leaf in flat.items()}, model)


def reference_keys_for_shapes(shapes: Dict[Path, tuple], model: str) -> Dict[str, Tuple[Path, str, Optional[int]]]:
  """Reference key -> (path, kind, table) for every param path (with its shape) of one of our models."""
  keys = {}
  for path, shape in shapes.items():
    if path == ("hash_embeddings", "embedding"):
      for m in range(shape[0]):
        keys[f"encoder_hash_tok_embedding.{m}.weight"] = (path, "hash", m)
      continue
    keys[_path_to_key(path, model)] = (path, kind_of(path), None)
  return keys


def kind_of(path: Path) -> str:
  """How a param of ours is stored in torch: "norm" and "embedding" as they are, "linear" transposed."""
  return {"scale": "norm", "embedding": "embedding"}.get(path[-1], "linear")


def _path_to_key(path: Path, model: str) -> str:
  if path == ("tok_embeddings", "embedding"):
    return "local_encoder.tok_embeddings.weight" if model == "blt" else "tok_embeddings.weight"
  parts = []
  for p in path:
    if p in ("kernel", "scale", "embedding"):
      parts.append("weight")
    elif m := re.match(r"^(layers|cross_attn_layers|ngram_embeddings)_(\d+)$", p):
      parts += ["encoder_ngram_embedding" if m[1] == "ngram_embeddings" else m[1], m[2]]
    else:
      parts.append(p)
  return ".".join(parts)
