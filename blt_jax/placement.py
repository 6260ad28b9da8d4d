"""Where an inference model's params live: their dtype, the mesh they are sharded over, and whether they fit.

Scoring, generation and the lm-eval model share one option pair, `--dtype` and `--mesh`:

* `dtype` ("float32" | "bfloat16"): the params are stored on device in it and the model's matmuls run in it. RoPE
  tables, softmax statistics, the NLL, the entropies and the patcher's threshold comparisons stay float32 (the
  model code keeps them so whatever the compute dtype, as in the training step). float32 is the default: it is the
  precision that matches the reference to 1e-4.
* `mesh` ("data=D,fsdp=F,tensor=T", one size may be -1; missing axes are 1): a mesh over this process's devices.
  Params are laid out by the training logical axis rules (`sharding.default_logical_axis_rules`) and restored shard
  by shard onto it, so no process holds the whole model; a batch's rows go over `data` x `fsdp`. Without it every
  local device is on `data` and holds a replica of the params (the mode for models that fit one device).

The sizes of the params are known before anything is allocated, so a model that cannot fit the devices stops with
one line saying what it needs per device and which `--dtype` / `--mesh` would fit (`check_fits`).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from blt_jax import sharding

DTYPES = ("float32", "bfloat16")
GIB = 2**30
# Room left on a device for activations, caches and the compiled program when judging whether params fit.
HEADROOM = 0.9


class PlacementError(ValueError):
  """A dtype, mesh or memory problem, said in one line before anything is loaded."""


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise PlacementError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
  return dtype


def parse_mesh(text: Optional[str]) -> Optional[Dict[str, int]]:
  """`"fsdp=4,tensor=2"` -> {"data": 1, "fsdp": 4, "tensor": 2}; None or "" -> None (the replicated default).

  `fsdp:4+tensor:2` says the same without `=` and `,`, which lm-eval's `--model_args` reserve.
  """
  if text is None or not str(text).strip():
    return None
  sizes: Dict[str, int] = {}
  for part in re.split(r"[,+]", str(text)):
    match = re.fullmatch(r"\s*(\w+)\s*[=:]\s*(-?\d+)\s*", part)
    if not match:
      raise PlacementError(
          f"mesh {text!r}: expected axis=size pairs separated by commas, e.g. fsdp=4,tensor=2; "
          f"could not read {part.strip()!r}"
      )
    axis, size = match.group(1), int(match.group(2))
    if axis not in sharding.MESH_AXES:
      raise PlacementError(f"mesh {text!r}: unknown axis {axis!r}; the axes are {', '.join(sharding.MESH_AXES)}")
    if axis in sizes:
      raise PlacementError(f"mesh {text!r}: axis {axis!r} is given twice")
    sizes[axis] = size
  return {axis: sizes.get(axis, 1) for axis in sharding.MESH_AXES}


def make_mesh(
    spec: Optional[Mapping[str, int]], devices: Optional[Sequence[Any]] = None, across_processes: bool = False
) -> Mesh:
  """The inference mesh over `devices` (default: this process's devices, or every process's with
  `across_processes`); `spec` None puts them all on `data`."""
  if devices is None:
    devices = jax.devices() if across_processes else jax.local_devices()
  devices = list(devices)
  spec = dict(spec) if spec else {"data": -1, "fsdp": 1, "tensor": 1}
  try:
    return sharding.make_mesh(spec, devices)
  except ValueError as e:
    raise PlacementError(f"mesh {format_mesh(spec)} over {len(devices)} devices: {e}") from None


def format_mesh(spec: Mapping[str, int]) -> str:
  return ",".join(f"{axis}={spec.get(axis, 1)}" for axis in sharding.MESH_AXES)


def describe(mesh: Optional[Mesh]) -> str:
  if mesh is None:
    return "one device"
  shape = dict(mesh.shape)
  if shape.get("fsdp", 1) == 1 and shape.get("tensor", 1) == 1:
    return f"replicated on {mesh.size} device{'s' if mesh.size > 1 else ''}"
  return f"sharded over mesh {format_mesh(shape)}"


# ---------------------------------------------------------------------------------------------------------------
# Restore targets.


def cast_dtype(leaf_dtype: Any, dtype: str) -> Any:
  """The stored dtype of a param in an inference run of `dtype`: floats take it, integers keep theirs."""
  return jnp.dtype(dtype) if jnp.issubdtype(leaf_dtype, jnp.floating) else leaf_dtype


def targets(abstract_boxed: Any, dtype: str, mesh: Optional[Mesh], rules=None) -> Any:
  """ShapeDtypeStructs to restore `abstract_boxed` (the boxed `jax.eval_shape` of a model's init) into: cast to
  `dtype`, sharded by the logical rules over `mesh`, or on this process's first device when `mesh` is None."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(abstract_boxed))
  else:
    shardings = sharding.logical_to_shardings(abstract_boxed, mesh, rules)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, cast_dtype(x.dtype, dtype), sharding=s),
      nn.meta.unbox(abstract_boxed),
      shardings,
  )


def place(params: Any, target: Any) -> Any:
  """`params` (arrays anywhere) cast and laid out as `target` (ShapeDtypeStructs with shardings).

  Laid out first, then cast shard by shard: casting first would build each whole array on one device.
  """
  return jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding).astype(t.dtype), params, target)


# ---------------------------------------------------------------------------------------------------------------
# Memory.


def bytes_per_device(target: Any) -> int:
  """The largest number of param bytes any one device holds under `target` (ShapeDtypeStructs with shardings)."""
  per_device: Dict[Any, int] = {}
  for leaf in jax.tree_util.tree_leaves(target):
    itemsize = jnp.dtype(leaf.dtype).itemsize
    shard = leaf.sharding.shard_shape(leaf.shape)
    for device in leaf.sharding.device_set:
      per_device[device] = per_device.get(device, 0) + math.prod(shard) * itemsize
  return max(per_device.values(), default=0)


def device_memory(device: Any) -> Optional[int]:
  """Bytes of memory `device` offers (HBM on GPU/TPU), or None where the platform does not say (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (platforms without the query raise various errors)
    return None
  if not stats:
    return None
  limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
  return int(limit) if limit else None


def _total_bytes(target: Any, dtype: str) -> int:
  return sum(
      math.prod(x.shape) * jnp.dtype(cast_dtype(x.dtype, dtype)).itemsize for x in jax.tree_util.tree_leaves(target)
  )


def suggestion(target: Any, num_devices: int, limit: int) -> str:
  """The cheapest change of `--dtype` / `--mesh` whose params fit `limit` bytes per device (an estimate: an even
  split over fsdp), or what it would take."""
  usable = limit * HEADROOM
  for dtype in DTYPES:
    if _total_bytes(target, dtype) <= usable:
      return f"--dtype {dtype} with params replicated"
  for dtype in DTYPES:
    for n in range(2, num_devices + 1):
      if num_devices % n == 0 and _total_bytes(target, dtype) / n <= usable:
        return f"--dtype {dtype} --mesh fsdp={n}"
  need = _total_bytes(target, "bfloat16") / usable
  return f"more devices: even in bfloat16 the params need {math.ceil(need)} devices of this size"


def check_fits(target: Any, what: str = "the model") -> None:
  """Stops with one line when the params of `target` cannot fit the memory of the devices they are placed on."""
  leaves = jax.tree_util.tree_leaves(target)
  if not leaves:
    return
  devices = sorted({d for leaf in leaves for d in leaf.sharding.device_set}, key=lambda d: d.id)
  limits = [device_memory(d) for d in devices]
  if any(limit is None for limit in limits):
    return
  limit = min(limits)
  need = bytes_per_device(target)
  if need > limit * HEADROOM:
    dtype = jnp.dtype(leaves[0].dtype).name
    raise PlacementError(
        f"{what} needs {need / GIB:.1f} GiB of params per device in {dtype} as placed, the devices hold "
        f"{limit / GIB:.1f} GiB each ({int(HEADROOM * 100)}% usable); try {suggestion(target, len(devices), limit)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# The shared command-line options.


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--dtype",
      default="float32",
      choices=DTYPES,
      help="params on device and matmuls in this dtype; entropies, softmax statistics and the NLL "
      "stay float32 (default float32, the one that matches the reference to 1e-4)",
  )
  parser.add_argument(
      "--mesh",
      default=None,
      metavar="AXIS=SIZE,...",
      help="shard the params over a mesh of this process's devices by the training rules, e.g. "
      "fsdp=8 or fsdp=4,tensor=2 (one size may be -1); default: every device holds a replica",
  )


def startup_line(dtype: str, mesh: Optional[Mesh]) -> str:
  return f"params in {dtype}, {describe(mesh)}"
