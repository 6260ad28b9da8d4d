"""Load a BLT for inference (scoring, generation) from any checkpoint the package writes.

`load(path)` accepts:
  * a converted checkpoint (`python -m blt_jax.convert` output: `config.json` + `params/` [+ `entropy_model/`]);
  * a training run's export (`WORKDIR/export`, written at the end of `python -m blt_jax.train`) or the WORKDIR itself.
The model's own patcher comes along: its patching settings, and for entropy patching its entropy model
(`<ckpt>/entropy_model`). `dtype` and `mesh` say how the params are stored and laid out (`blt_jax.placement`):
each array is restored cast and sharded in place, so no process reads more of the model than its devices hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
from jax.sharding import Mesh

from blt_jax import checkpoint, paths, placement
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import init_entropy_model
from blt_jax.model import init_blt

ENTROPY_SUBDIR = "entropy_model"


class CheckpointError(ValueError):
  """The path is not a loadable BLT checkpoint; the message says what was looked for."""


@dataclasses.dataclass
class LoadedModel:
  config: BLTConfig
  params: Any
  patching: PatchingConfig
  entropy_config: Optional[EntropyModelConfig]  # None unless patching.mode == "entropy"
  entropy_params: Any
  path: str
  mesh: Optional[Mesh] = None  # the mesh the params are sharded over (None: one device, or replicated by the user)

  @property
  def dtype(self) -> str:
    return self.config.dtype


# A pytree: params are leaves (traced under jit), configs are static, so a jitted function can take the model whole.
jax.tree_util.register_pytree_node(
    LoadedModel,
    lambda m: ((m.params, m.entropy_params), (m.config, m.patching, m.entropy_config, m.path, m.mesh)),
    lambda aux, leaves: LoadedModel(aux[0], leaves[0], aux[1], aux[2], leaves[1], aux[3], aux[4]),
)


def find_params_dir(path: paths.PathLike) -> paths.epath.Path:
  """The directory holding `config.json` + `params/`: `path` itself or its `export/`."""
  root = paths.resolve(path)
  if not root.exists():
    raise CheckpointError(f"checkpoint {root} does not exist")
  for candidate in (root, root / "export"):
    if (candidate / checkpoint.CONFIG_FILE).is_file():
      return candidate
  if (root / "checkpoints").is_dir():
    raise CheckpointError(
        f"{root} is a training workdir without an export/ (the run writes it when it finishes); "
        f"finish or resume the run first"
    )
  raise CheckpointError(
      f"{root}: no {checkpoint.CONFIG_FILE} here or in {root / 'export'}; expected a converted "
      f"checkpoint (python -m blt_jax.convert) or a training workdir/export"
  )


def _read_meta(directory) -> dict:
  meta = checkpoint.read_params_config(directory)
  if meta.get("format") != "blt_jax" or meta.get("model_type") not in ("blt", "entropy_model"):
    raise CheckpointError(
        f"{directory / checkpoint.CONFIG_FILE}: not a blt_jax checkpoint (format="
        f"{meta.get('format')!r}, model_type={meta.get('model_type')!r})"
    )
  return meta


def _read_params(directory, target) -> Any:
  try:
    params, _ = checkpoint.load_params(directory, target)
  except Exception as e:  # pylint: disable=broad-except  (orbax's errors name internals, not the checkpoint)
    raise CheckpointError(f"{directory}: cannot read params ({type(e).__name__}: {e})") from None
  return params


def abstract_params(config) -> Any:
  """The boxed (logically named) shapes of a model's params in the per-layer layout checkpoints hold."""
  config = dataclasses.replace(config, scan_layers=False)
  if isinstance(config, EntropyModelConfig):
    return jax.eval_shape(lambda: init_entropy_model(jax.random.PRNGKey(0), config))
  return jax.eval_shape(lambda: init_blt(jax.random.PRNGKey(0), config))


def inference_config(config, dtype: str):
  """`config` running in `dtype` (its compute dtype; the float32 statistics stay float32 in the model code)."""
  return dataclasses.replace(config, dtype=placement.check_dtype(dtype))


def place_model(m: LoadedModel, dtype: str = "float32", mesh: Optional[Mesh] = None) -> LoadedModel:
  """An in-memory model (params anywhere) cast to `dtype` and laid out on `mesh` as `load` would restore it."""
  config = inference_config(m.config, dtype)
  target = placement.targets(abstract_params(config), dtype, mesh)
  entropy_config, entropy_target = m.entropy_config, None
  if entropy_config is not None:
    entropy_config = inference_config(entropy_config, dtype)
    entropy_target = placement.targets(abstract_params(entropy_config), dtype, mesh)
  placement.check_fits((target, entropy_target), "the model")
  params = placement.place(m.params, target)
  entropy_params = None if entropy_target is None else placement.place(m.entropy_params, entropy_target)
  return LoadedModel(config, params, m.patching, entropy_config, entropy_params, m.path, mesh)


def load(path: paths.PathLike, dtype: str = "float32", mesh: Optional[Mesh] = None) -> LoadedModel:
  """A BLT with its patcher (see the module docstring for accepted paths).

  Params are restored in `dtype` ("float32" or "bfloat16", which also becomes the model's compute dtype) onto this
  process's first device, or sharded by the training logical rules over `mesh` (`blt_jax.placement`). A model
  whose params cannot fit the devices stops before anything is read, saying what would fit.
  """
  placement.check_dtype(dtype)
  directory = find_params_dir(path)
  meta = _read_meta(directory)
  if meta["model_type"] != "blt":
    raise CheckpointError(f"{directory}: this is an entropy model; scoring and generation need a BLT checkpoint")
  config = inference_config(BLTConfig.from_dict(meta["model"]), dtype)
  entropy_dir = directory / ENTROPY_SUBDIR
  has_entropy = (entropy_dir / checkpoint.CONFIG_FILE).is_file()
  if meta.get("patching"):
    patching = PatchingConfig.from_dict(meta["patching"])
  elif has_entropy:  # a converted source that states no patcher: the reference's default, entropy
    patching = PatchingConfig()
  else:
    raise CheckpointError(
        f"{directory / checkpoint.CONFIG_FILE} names no patching mode and there is no " f"{ENTROPY_SUBDIR}/ beside it"
    )
  entropy_config = entropy_target = entropy_params = None
  if patching.mode == "entropy":
    if not has_entropy:
      raise CheckpointError(f"{directory}: entropy patching needs the entropy model, expected in {entropy_dir}")
    ent_meta = _read_meta(entropy_dir)
    if ent_meta["model_type"] != "entropy_model":
      raise CheckpointError(f"{entropy_dir}: expected an entropy model, found a {ent_meta['model_type']}")
    entropy_config = inference_config(EntropyModelConfig.from_dict(ent_meta["model"]), dtype)
    entropy_target = placement.targets(abstract_params(entropy_config), dtype, mesh)
  target = placement.targets(abstract_params(config), dtype, mesh)
  placement.check_fits((target, entropy_target), f"{directory}")
  params = _read_params(directory, target)
  if entropy_target is not None:
    entropy_params = _read_params(entropy_dir, entropy_target)
  return LoadedModel(config, params, patching, entropy_config, entropy_params, str(directory), mesh)


def as_model(
    checkpoint: Union[paths.PathLike, LoadedModel], dtype: Optional[str] = None, mesh: Optional[Mesh] = None
) -> LoadedModel:
  """What the inference entry points take: a path (loaded in `dtype`, default float32, onto `mesh`) or a
  LoadedModel (kept as it is unless a `dtype` or `mesh` is asked for, then placed accordingly)."""
  if not isinstance(checkpoint, LoadedModel):
    return load(checkpoint, dtype or "float32", mesh)
  if dtype is None and mesh is None:
    return checkpoint
  return place_model(checkpoint, dtype or checkpoint.dtype, mesh)
