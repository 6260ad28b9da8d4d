"""Device mesh, logical axis rules and sharded initialisation: the one place that maps names onto devices.

The mesh has three axes:
  * "data":   pure data parallelism (params replicated along it);
  * "fsdp":   data parallelism with params/optimizer state sharded along it (ZeRO-3 style);
  * "tensor": Megatron-style tensor parallelism of the matmul hidden dims.

Model code never names mesh axes. It annotates params with logical names (`nn.with_logical_partitioning`) and this
module turns them into `NamedSharding`s through an ordered list of `(logical, mesh axes)` rules, exactly flax's
semantics: rules are tried in order and a mesh axis is used at most once per array, so *the order of the rules is
a priority*. After that, `fit_spec_to_shape` drops mesh axes that do not divide a dimension (jit rejects uneven
shardings) and moves them to another dimension where they fit, so odd sizes (260 bytes, 500002 hash rows) never
crash and large tables stay sharded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

logger = logging.getLogger(__name__)
_logged: set = set()


def _log_once(msg: str, level: int = logging.WARNING) -> None:
  if msg not in _logged:
    _logged.add(msg)
    logger.log(level, msg)


# ---------------------------------------------------------------------------------------------------------------
# Mesh.


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """Field of a ConfigDict / dict / object, or `default` when absent."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled in so that the product is `num_devices`."""
  sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
  desc = f"mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor})"
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"{desc}: at most one axis may be -1 (fill the remaining devices), got {fill}")
  bad = [k for k, v in sizes.items() if v != -1 and v < 1]
  if bad:
    raise ValueError(f"{desc}: sizes must be positive or -1, got invalid {bad}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"{desc}: the fixed sizes multiply to {known}, which does not divide the " f"{num_devices} available devices"
      )
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"{desc}: the product {known} must equal the number of devices ({num_devices}); "
        f"set one axis to -1 to fill the remaining devices"
    )
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _auto_axis_types(n: int) -> Optional[tuple]:
  """`(AxisType.Auto,) * n`, or None on a jax without axis types (where every mesh is Auto)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    return None
  return (axis_type.Auto,) * n


def _num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: Any, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over all (or the given) devices.

  Sizes come from `mesh_cfg.data`, `.fsdp`, `.tensor` (missing fields count as 1); one may be -1. The device order
  comes from `jax.make_mesh` (topology-aware: ICI rings on TPU, NVLink locality on GPU, process-major across hosts,
  so that the "tensor" axis, the innermost, stays inside a host). With several TPU slices the "data" axis spans the
  slices (DCN) and the other axes stay inside one.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(
      _cfg_get(mesh_cfg, "data", 1), _cfg_get(mesh_cfg, "fsdp", 1), _cfg_get(mesh_cfg, "tensor", 1), len(devices)
  )
  axis_types = _auto_axis_types(len(MESH_AXES))
  # Explicit Auto: jax.make_mesh defaults to Explicit axes on newer jax, while flax's logical constraints and our
  # jit in/out shardings assume GSPMD-style Auto propagation.
  kwargs = {} if axis_types is None else {"axis_types": axis_types}

  slices = _num_slices(devices)
  if slices > 1:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

    if shape[0] % slices:
      raise ValueError(
          f"mesh data={shape[0]} must be a multiple of the number of slices ({slices}): the data axis " f"spans slices"
      )
    ici = (shape[0] // slices, shape[1], shape[2])
    device_array = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(device_array, MESH_AXES, **kwargs)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  try:
    try:
      return jax.make_mesh(shape, MESH_AXES, devices=devices, **kwargs)
    except TypeError:  # older jax without the `devices` / `axis_types` keywords
      return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES, **kwargs)
  except NotImplementedError as e:
    # An axis that is no product of the slice's torus dimensions (tensor=4 on a 16 x 16 v6e): lay it on consecutive
    # chips of one ring instead, split into segments. Its collectives then run over part of a ring; slower than a
    # whole ring, but the config runs on every slice its chip count allows.
    try:
      device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):
      raise e from None
    _log_once(
        f"mesh data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}: sizes that are not products of this slice's "
        f"torus dimensions; an axis is laid on segments of a physical ring (allow_split_physical_axes)"
    )
    return Mesh(device_array, MESH_AXES, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Logical axis rules.


def default_logical_axis_rules() -> Rules:
  """(logical name, mesh axes) pairs, highest priority first.

  "hash_vocab" comes before "embed": a hash table is ("hash_tables", "hash_vocab", "embed") and should put both
  fsdp and tensor on its rows (3B params at 1B scale), whereas the first rule that claims "fsdp" wins.
  """
  return (
      # Params.
      ("layers", None),  # the leading layer axis of a scan_layers stack's stacked params: each layer shards alike
      ("hash_vocab", ("fsdp", "tensor")),
      ("hash_tables", None),
      ("vocab", None),  # 260 rows: too small to be worth splitting
      ("norm", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      # Activations (used by `nn.with_logical_constraint` in the model, if any).
      ("activation_batch", BATCH_AXES),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", "tensor"),
      ("activation_mlp", "tensor"),
      ("activation_vocab", None),
  )


def _as_axes_tuple(entry: MeshAxes) -> Tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def parse_logical_axis_rules(rules: Optional[Iterable[Any]], mesh_axis_names: Sequence[str] = MESH_AXES) -> Rules:
  """Validated rules from config (a list of [logical, None | axis | [axes]]); None or empty -> the defaults."""
  if rules is None:
    return default_logical_axis_rules()
  rules = list(rules)
  if not rules:
    return default_logical_axis_rules()
  out = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (str, bytes)) or len(rule) != 2:
      raise ValueError(f"logical axis rule #{i} {rule!r}: expected a pair [logical_name, mesh_axes]")
    logical, physical = rule
    if not isinstance(logical, str):
      raise ValueError(f"logical axis rule #{i} {rule!r}: the logical name must be a string")
    if physical is None or isinstance(physical, str):
      axes = physical
    else:
      axes = tuple(physical)
      if not all(isinstance(a, str) for a in axes):
        raise ValueError(f"logical axis rule #{i} {rule!r}: mesh axes must be strings")
      if len(axes) == 1:
        axes = axes[0]
      elif not axes:
        axes = None
    unknown = [a for a in _as_axes_tuple(axes) if a not in mesh_axis_names]
    if unknown:
      raise ValueError(
          f"logical axis rule #{i} ({logical!r} -> {physical!r}) names unknown mesh axes {unknown}; "
          f"the mesh axes are {tuple(mesh_axis_names)}"
      )
    if len(set(_as_axes_tuple(axes))) != len(_as_axes_tuple(axes)):
      raise ValueError(f"logical axis rule #{i} ({logical!r} -> {physical!r}) repeats a mesh axis")
    out.append((logical, axes))
  return tuple(out)


def logical_axis_rules_from_config(mesh_cfg: Any, mesh: Optional[Mesh] = None) -> Rules:
  """`mesh_cfg.logical_axis_rules` validated against the mesh axes (defaults when unset)."""
  names = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
  return parse_logical_axis_rules(_cfg_get(mesh_cfg, "logical_axis_rules", None), names)


# ---------------------------------------------------------------------------------------------------------------
# Logical names -> shardings.


def fit_spec_to_shape(
    spec: PartitionSpec,
    shape: Sequence[int],
    mesh: Mesh,
    relocate: bool = True,
    name: str = "",
    keep_whole: Sequence[int] = (),
) -> PartitionSpec:
  """`spec` with mesh axes that do not divide their dimension removed (replicated there).

  Per dimension, mesh axes are kept in order while the running product still divides the size. With `relocate`,
  each dropped axis moves to the largest dimension left unsharded that it divides, so e.g. a
  [6, 500002, 1024] hash table (500002 = 2 * 53^2 * 89) that cannot take fsdp=8 on its rows takes it on its
  width instead of being replicated 8 times. Dims in `keep_whole` (the layer axis of stacked params) never take
  a moved axis, so a stacked param is sharded as each of its layers alone. Changes are logged once per (name,
  shape, spec).
  """
  shape = tuple(int(s) for s in shape)
  entries = list(spec)
  if len(entries) > len(shape):
    raise ValueError(f"{name or 'array'}: partition spec {spec} has more entries than the shape {shape}")
  entries += [None] * (len(shape) - len(entries))
  sizes = dict(mesh.shape)

  unknown = [a for e in entries for a in _as_axes_tuple(e) if a not in sizes]
  if unknown:
    raise ValueError(
        f"{name or 'array'}: partition spec {spec} names mesh axes {unknown} that are not in the "
        f"mesh {tuple(sizes)}"
    )
  kept, dropped = [], []
  for dim, entry in zip(shape, entries):
    axes, prod = [], 1
    for a in _as_axes_tuple(entry):
      if dim % (prod * sizes[a]) == 0:
        axes.append(a)
        prod *= sizes[a]
      else:
        dropped.append(a)
    kept.append(axes)

  if dropped and relocate:
    open_dims = [i for i, axes in enumerate(kept) if not axes and i not in keep_whole]
    # Largest dims first: they hold the most memory and are the most likely to be divisible.
    open_dims.sort(key=lambda i: -shape[i])
    still_dropped = []
    for a in dropped:
      for i in open_dims:
        if shape[i] % (math.prod(sizes[b] for b in kept[i]) * sizes[a]) == 0:
          kept[i].append(a)
          break
      else:
        still_dropped.append(a)
    dropped = still_dropped

  def entry_of(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))

  fitted = PartitionSpec(*[entry_of(axes) for axes in kept])
  if fitted != PartitionSpec(*entries):
    what = f"replicated over {dropped}" if dropped else "axes moved, none replicated"
    _log_once(
        f"sharding of {name or 'array'} {shape}: {PartitionSpec(*entries)} does not divide the mesh "
        f"{sizes}; using {fitted} ({what})"
    )
  return fitted


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def logical_to_shardings(
    abstract_boxed_tree: Any, mesh: Mesh, rules: Optional[Rules] = None, relocate: bool = True
) -> Any:
  """NamedSharding tree (structure of the unboxed tree) for a tree of possibly boxed abstract arrays.

  Boxed leaves (`nn.LogicallyPartitioned`) map their logical names through `rules`; plain leaves (e.g. optax
  step counts) are replicated. Every spec then goes through `fit_spec_to_shape`.
  """
  rules = parse_logical_axis_rules(rules, tuple(mesh.axis_names))
  known = {logical for logical, _ in rules}
  if "layers" not in known:  # rules from a config written before stacked params: the layer axis stays whole
    rules, known = (("layers", None),) + tuple(rules), known | {"layers"}

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if _is_box(leaf):
      logical = tuple(leaf.names)
      unknown = [n for n in logical if isinstance(n, str) and n not in known]
      if unknown:
        _log_once(f"{name}: logical axes {unknown} have no rule; replicating them")
      spec = nn.logical_to_mesh_axes(logical, rules)
      shape = leaf.value.shape
      whole = tuple(i for i, n in enumerate(logical) if n == "layers")
    else:
      spec = PartitionSpec()
      shape = getattr(leaf, "shape", ())
      whole = ()
    return NamedSharding(mesh, fit_spec_to_shape(spec, shape, mesh, relocate=relocate, name=name, keep_whole=whole))

  return jax.tree_util.tree_map_with_path(one, abstract_boxed_tree, is_leaf=_is_box)


def init_sharded(
    init_fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Optional[Rules] = None, relocate: bool = True
) -> Tuple[Any, Any]:
  """Runs `init_fn(*args)` under jit with sharded outputs: (unboxed tree, its NamedSharding tree).

  `init_fn` may return boxed params (`model.init(...)["params"]`) or a whole train state whose optimizer state
  was built from boxed params (optax keeps the boxes), so moments get the params' shardings. Nothing is ever
  materialised on a single device: the shapes come from `jax.eval_shape`, and XLA creates each shard in place.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(abstract, mesh, rules, relocate=relocate)

  def unboxed_init(*a):
    return nn.meta.unbox(init_fn(*a))

  out = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return out, shardings


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (restore targets for checkpoints)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(tree), shardings
  )


def axis_rules_context(rules: Optional[Rules] = None):
  """Context that makes `nn.with_logical_constraint` in the model use `rules`.

  Enter it together with `jax.set_mesh(mesh)` (or pass `mesh=` to the constraints) around tracing of the step.
  """
  return nn.logical_axis_rules(default_logical_axis_rules() if rules is None else rules)


def mesh_while_tracing(mesh: Optional[Mesh], rules: Optional[Rules] = None):
  """Context for tracing a model on `mesh`: its logical activation constraints (`layers.batch_sharded`) bind to
  the mesh's batch axes by `rules`. A no-op context when `mesh` is None."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
  stack.enter_context(axis_rules_context(rules))
  return stack


def rows_over_every_device(x_B: jax.Array) -> jax.Array:
  """Pins the rows of `x_B` `[B, ...]` over every device of the mesh being traced for (data x fsdp x tensor).

  For work with replicated weights (the in-graph entropy model): over the batch axes alone, the chips of one
  tensor group would each repeat the same rows. A no-op without a mesh, or when B does not divide evenly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or x_B.shape[0] % mesh.size:
    return x_B
  return jax.lax.with_sharding_constraint(x_B, PartitionSpec(tuple(mesh.axis_names)))


def positions_over_tensor(x_BND: jax.Array) -> jax.Array:
  """Pins `[B, N, ...]` to the batch axes and its positions N over "tensor".

  For a per-position matmul whose weights are not split over "tensor" (the decoder's 260-way output): with the
  positions split, each chip of a tensor group computes its own share instead of all of them repeating every row.
  A no-op without a mesh, without a tensor axis, or when the sizes do not divide evenly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("tensor", 1) == 1 or x_BND.shape[1] % mesh.shape["tensor"]:
    return x_BND
  batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
  if x_BND.shape[0] % math.prod(mesh.shape[a] for a in batch):
    return x_BND
  spec = PartitionSpec(batch, "tensor", *([None] * (x_BND.ndim - 2)))
  return jax.lax.with_sharding_constraint(x_BND, spec)


def rows_over_batch_axes(x_BN: jax.Array) -> jax.Array:
  """Pins `[B, N]` rows back to the batch axes (the model's layout; `rows_over_every_device`'s inverse)."""
  return nn.with_logical_constraint(x_BN, ("activation_batch", "activation_length"))


# ---------------------------------------------------------------------------------------------------------------
# Batches.


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _local_batch_shards(mesh: Mesh) -> list:
  """Sorted distinct batch-shard indices held by this process's devices."""
  names = list(mesh.axis_names)
  strides = [mesh.shape[a] for a in BATCH_AXES]
  local = set(d.id for d in mesh.local_devices)
  shards = set()
  for idx in np.ndindex(mesh.devices.shape):
    if mesh.devices[idx].id in local:
      i, j = idx[names.index(BATCH_AXES[0])], idx[names.index(BATCH_AXES[1])]
      shards.add(i * strides[1] + j)
  return sorted(shards)


def process_data_shard(mesh: Mesh) -> Tuple[int, int]:
  """(index, count) of the slice of the global batch this process must load.

  Processes whose devices hold the same batch shards (e.g. a tensor axis across hosts) get the same index and
  must load the same rows.
  """
  local = _local_batch_shards(mesh)
  n = len(local)
  total = num_batch_shards(mesh)
  if local != list(range(local[0], local[0] + n)) or local[0] % n:
    raise ValueError(f"this process holds non-contiguous batch shards {local} of {total}; reorder the mesh devices")
  return local[0] // n, total // n


def host_local_batch_to_global(batch: Mapping[str, Any], mesh: Mesh) -> Dict[str, jax.Array]:
  """Global jax.Arrays, batch-sharded, from this process's rows (numpy, leading dim = local batch).

  Each process passes only the rows of its `process_data_shard(mesh)` slice; the global batch is the
  concatenation over slices, so global batch = local batch * slice count.
  """
  sharding = data_sharding(mesh)
  local_shards = len(_local_batch_shards(mesh))
  _, count = process_data_shard(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch entry needs a leading batch dimension")
    local_b = value.shape[0]
    global_b = local_b * count
    if local_b % local_shards:
      raise ValueError(
          f"batch[{key!r}]: global batch {global_b} (local {local_b} x {count} process slices) is not "
          f"divisible by the {num_batch_shards(mesh)} data shards (data*fsdp = "
          f"{mesh.shape['data']}*{mesh.shape['fsdp']})"
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value, (global_b,) + value.shape[1:])
  return out


# ---------------------------------------------------------------------------------------------------------------
# Multi-process start-up.


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  try:
    return int(value) if value not in (None, "") else None
  except ValueError:
    return None


def _cluster_detected() -> Optional[str]:
  """Name of a multi-process launcher found in the environment (one jax can auto-configure from), or None."""
  # Inside `srun` the step's task count is what matters; a batch script of a multi-task job is a single process.
  tasks = _env_int("SLURM_STEP_NUM_TASKS")
  tasks = _env_int("SLURM_NTASKS") if tasks is None else tasks
  if (tasks or 1) > 1 and "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
    return "slurm"
  if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "openmpi"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def _distributed_is_initialized() -> bool:
  fn = getattr(jax.distributed, "is_initialized", None)
  if fn is not None:
    return bool(fn())
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return distributed.global_state.client is not None


def maybe_initialize_distributed(cfg: Any = None) -> bool:
  """Calls `jax.distributed.initialize` when this is one of several processes; returns whether it did.

  Triggers, first match wins: `cfg.coordinator_address` (with `cfg.num_processes`, `cfg.process_id`, optional
  `cfg.local_device_ids`); env JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID if set);
  a multi-task SLURM / Open MPI job or a multi-host TPU pod (jax auto-detects the rest). A single local process,
  or a process already initialised, is left alone. Must run before any other jax call touches the devices.
  """
  if _distributed_is_initialized():
    return False
  address = _cfg_get(cfg, "coordinator_address", None)
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=_cfg_get(cfg, "num_processes", None),
        process_id=_cfg_get(cfg, "process_id", None),
        local_device_ids=_cfg_get(cfg, "local_device_ids", None),
    )
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=_env_int("JAX_NUM_PROCESSES"),
        process_id=_env_int("JAX_PROCESS_ID"),
    )
    return True
  if (_cfg_get(cfg, "num_processes", None) or 1) > 1 or _cluster_detected():
    jax.distributed.initialize()
    return True
  return False


def default_mesh_config():
  """ConfigDict of the mesh and of the logical rules (None = `default_logical_axis_rules()`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict()
  cfg.data = 1  # pure data parallel replicas
  cfg.fsdp = -1  # -1: all remaining devices; params and optimizer state are sharded along it
  cfg.tensor = 1  # tensor parallelism of FFN/attention hidden dims
  # Override as a list of [logical, mesh_axis | [mesh_axes] | None]; order is priority (first match wins).
  cfg.logical_axis_rules = None
  # Multi-process: leave unset to auto-detect (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS).
  cfg.coordinator_address = None
  cfg.num_processes = None
  cfg.process_id = None
  return cfg
