"""The two layouts of a transformer stack's params, and the one pair of functions that converts between them.

* **per-layer**: one subtree per block, `layers_0 ... layers_{n-1}` (the reference's names). Checkpoints on disk
  (converted weights, a training run's `export/`), the converters, `blt_jax.generate`'s cached decoder and runs
  without `scan_layers` use it.
* **stacked**: one subtree `layers` whose leaves carry a leading `[n]` layer axis (logical axis name "layers",
  never sharded, so each layer's slice shards as its per-layer version). A `scan_layers` run keeps its scanned
  stacks in this layout in its train state, params and, mirroring them, the optimizer's moments: the step's
  `lax.scan` reads them as they are, and the optimizer updates one leaf per weight of the stack instead of one per
  weight per layer, so the compiled step does not grow with depth.

`stack_layers` / `unstack_layers` are the single definition of the layouts; everything else here applies them
where a model config says a scanned stack lives. `layers.run_blocks` runs either layout; the trainer converts at
its boundaries (`init_from` and the export: per-layer; its own checkpoints hold the train state in the run's
layout, and one written in the other layout is converted when restored).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from blt_jax.config import BLTConfig, EntropyModelConfig

LAYER_AXIS = "layers"  # logical name of the leading axis of stacked params (sharding.py never shards it)
PREFIX = "layers_"


def stacked_name(prefix: str = PREFIX) -> str:
  """The key of the stacked subtree that replaces `{prefix}0 ... {prefix}{n-1}` (`layers` for `layers_`)."""
  return prefix.rstrip("_") or LAYER_AXIS


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def layer_keys(tree: Mapping[str, Any], prefix: str = PREFIX) -> Tuple[str, ...]:
  """`{prefix}0 ... {prefix}{n-1}` as found in `tree`, in layer order; a gap in the numbering is an error."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)$")
  found = sorted(int(m.group(1)) for m in (pattern.match(str(k)) for k in tree) if m)
  if found != list(range(len(found))):
    raise ValueError(
        f"per-layer params {prefix}i: expected {prefix}0 ... {prefix}{len(found) - 1}, found layers " f"{found}"
    )
  return tuple(f"{prefix}{i}" for i in found)


def _boxed(fn):
  """`fn` on plain leaves, lifted to flax `LogicallyPartitioned` boxes (whose names gain a leading "layers")."""

  def stack(*leaves):
    first = leaves[0]
    if _is_box(first):
      return first.replace(value=fn(*[leaf.value for leaf in leaves]), names=(LAYER_AXIS,) + tuple(first.names))
    return fn(*leaves)

  return stack


def _boxed_split(fn):
  def split(x, n):
    if _is_box(x):
      names = tuple(x.names)
      if not names or names[0] != LAYER_AXIS:
        raise ValueError(f"stacked param with logical axes {names}: expected {LAYER_AXIS!r} first")
      return [x.replace(value=v, names=names[1:]) for v in fn(x.value, n)]
    return fn(x, n)

  return split


def _stack(*leaves):
  return jnp.stack(leaves)


def _split(x, n: int):
  return [x[i] for i in range(n)]


def num_layers(stacked: Any) -> int:
  """The leading (layer) size shared by every leaf of a stacked subtree."""
  leaves = jax.tree_util.tree_leaves(stacked)
  sizes = {int(leaf.shape[0]) if getattr(leaf, "ndim", 0) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"stacked params: every leaf needs the same leading layer axis, found leading sizes {sizes}")
  return sizes.pop()


def stack_layers(tree: Mapping[str, Any], prefix: str = PREFIX, stack: Callable[..., Any] = _stack) -> dict:
  """`tree` with its `{prefix}i` subtrees replaced by one `stacked_name(prefix)` subtree of `[n, ...]` leaves.

  Leaves may be arrays, tracers or flax `LogicallyPartitioned` boxes (whose logical names gain a leading
  "layers"); other keys pass through. A tree without `{prefix}i` subtrees comes back unchanged. `stack(*leaves)`
  makes one stacked leaf (default `jnp.stack`; the trainer passes one that places and frees arrays leaf by leaf).
  """
  keys = layer_keys(tree, prefix)
  if not keys:
    return dict(tree)
  name = stacked_name(prefix)
  if name in tree:
    raise ValueError(f"params hold both {name!r} (stacked) and {keys[0]!r} (per-layer) subtrees")
  stacked = jax.tree_util.tree_map(_boxed(stack), *[tree[k] for k in keys], is_leaf=_is_box)
  out = {k: v for k, v in tree.items() if k not in keys}
  out[name] = stacked
  return out


def unstack_layers(tree: Mapping[str, Any], prefix: str = PREFIX, split: Callable[[Any, int], Any] = _split) -> dict:
  """The inverse of `stack_layers`: the `stacked_name(prefix)` subtree back into `{prefix}0 ... {prefix}{n-1}`.

  `split(leaf, n)` gives a stacked leaf's n layer slices (default: indexing).
  """
  name = stacked_name(prefix)
  if name not in tree:
    return dict(tree)
  if layer_keys(tree, prefix):
    raise ValueError(f"params hold both {name!r} (stacked) and {prefix}i (per-layer) subtrees")
  stacked = tree[name]
  n = num_layers(stacked)
  leaves, treedef = jax.tree_util.tree_flatten(stacked, is_leaf=_is_box)
  slices = [_boxed_split(split)(leaf, n) for leaf in leaves]
  out = {k: v for k, v in tree.items() if k != name}
  for i in range(n):
    out[f"{prefix}{i}"] = jax.tree_util.tree_unflatten(treedef, [leaf_slices[i] for leaf_slices in slices])
  return out


# ---------------------------------------------------------------------------------------------------------------
# Where a model's scannable stacks live.


def stackable(config: Any) -> Tuple[Tuple[Tuple[str, ...], str], ...]:
  """(path of the module that owns the blocks, their prefix) of every stack `scan_layers` runs as a `lax.scan`.

  The BLT scans its global stack only (the local encoder and decoder interleave cross-attention with their blocks);
  the entropy model scans its one stack.
  """
  if isinstance(config, BLTConfig):
    return ((("global_transformer",), PREFIX),)
  if isinstance(config, EntropyModelConfig):
    return (((), PREFIX),)
  raise TypeError(f"no stack layout for a {type(config).__name__}")


def uses_stacked_layout(config: Any) -> bool:
  """Whether a run of `config` keeps its scanned stacks stacked in the train state (`scan_layers`)."""
  return bool(getattr(config, "scan_layers", False))


def _map_at(tree: Mapping[str, Any], path: Tuple[str, ...], fn: Callable[[Mapping[str, Any]], dict]) -> dict:
  if not path:
    return fn(tree)
  if path[0] not in tree:
    return dict(tree)
  out = dict(tree)
  out[path[0]] = _map_at(tree[path[0]], path[1:], fn)
  return out


def stack_params(params: Mapping[str, Any], config: Any, stack: Callable[..., Any] = _stack) -> dict:
  """Model params with every scannable stack of `config` stacked (unchanged where already stacked)."""
  for path, prefix in stackable(config):
    params = _map_at(params, path, lambda t, prefix=prefix: stack_layers(t, prefix, stack))
  return dict(params)


def unstack_params(params: Mapping[str, Any], config: Any, split: Callable[[Any, int], Any] = _split) -> dict:
  """Model params in the per-layer layout, the one on disk (unchanged where already per-layer)."""
  for path, prefix in stackable(config):
    params = _map_at(params, path, lambda t, prefix=prefix: unstack_layers(t, prefix, split))
  return dict(params)


def is_stacked(params: Mapping[str, Any], config: Any) -> bool:
  """Whether any scannable stack of `config` is stacked in `params`."""
  for path, prefix in stackable(config):
    node = params
    for key in path:
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if isinstance(node, Mapping) and stacked_name(prefix) in node:
      return True
  return False


def to_run_layout(params: Mapping[str, Any], config: Any) -> dict:
  """Params in the layout a run of `config` keeps in its train state (stacked with `scan_layers`)."""
  return stack_params(params, config) if uses_stacked_layout(config) else unstack_params(params, config)


def restack(
    tree: Any,
    params_like: Any,
    config: Any,
    stacked: bool,
    stack: Callable[..., Any] = _stack,
    split: Callable[[Any, int], Any] = _split,
) -> Any:
  """`tree` with every subtree shaped like `params_like` converted to the stacked (or per-layer) layout.

  `tree` is a train state or an optimizer state: its params and the optax moments that mirror them (same tree
  structure as the params) are converted; everything else (step counts, schedule state) passes through. An
  optimizer state whose moments do not mirror the params (optax masks drop leaves) is not recognised: callers
  compare the result with the layout they expect. `stack` / `split`: as `stack_layers`' / `unstack_layers'`.
  """
  like = jax.tree_util.tree_structure(params_like, is_leaf=_is_box)

  def convert(params, config):
    return stack_params(params, config, stack) if stacked else unstack_params(params, config, split)

  def is_params(x):
    return isinstance(x, Mapping) and jax.tree_util.tree_structure(x, is_leaf=_is_box) == like

  return jax.tree_util.tree_map(lambda x: convert(x, config) if is_params(x) else x, tree, is_leaf=is_params)
