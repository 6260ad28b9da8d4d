"""Load a BLT for inference (scoring, generation) from any checkpoint the package writes.

`load(path)` accepts:
  * a converted checkpoint (`python -m blt_jax.convert` output: `config.json` + `params/` [+ `entropy_model/`]);
  * a training run's export (`WORKDIR/export`, written at the end of `python -m blt_jax.train`) or the WORKDIR itself.
The model's own patcher comes along: its patching settings, and for entropy patching its entropy model
(`<ckpt>/entropy_model`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from blt_jax import checkpoint, paths
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig

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


# A pytree: params are leaves (traced under jit), configs are static, so a jitted function can take the model whole.
jax.tree_util.register_pytree_node(
    LoadedModel,
    lambda m: ((m.params, m.entropy_params), (m.config, m.patching, m.entropy_config, m.path)),
    lambda aux, leaves: LoadedModel(aux[0], leaves[0], aux[1], aux[2], leaves[1], aux[3]))


def find_params_dir(path: paths.PathLike) -> paths.epath.Path:
  """The directory holding `config.json` + `params/`: `path` itself or its `export/`."""
  root = paths.resolve(path)
  if not root.exists():
    raise CheckpointError(f"checkpoint {root} does not exist")
  for candidate in (root, root / "export"):
    if (candidate / checkpoint.CONFIG_FILE).is_file():
      return candidate
  if (root / "checkpoints").is_dir():
    raise CheckpointError(f"{root} is a training workdir without an export/ (the run writes it when it finishes); "
                          f"finish or resume the run first")
  raise CheckpointError(f"{root}: no {checkpoint.CONFIG_FILE} here or in {root / 'export'}; expected a converted "
                        f"checkpoint (python -m blt_jax.convert) or a training workdir/export")


def _read(directory) -> tuple:
  meta = checkpoint.read_params_config(directory)
  if meta.get("format") != "blt_jax" or meta.get("model_type") not in ("blt", "entropy_model"):
    raise CheckpointError(f"{directory / checkpoint.CONFIG_FILE}: not a blt_jax checkpoint (format="
                          f"{meta.get('format')!r}, model_type={meta.get('model_type')!r})")
  try:
    params, _ = checkpoint.load_params(directory)
  except Exception as e:  # pylint: disable=broad-except  (orbax's errors name internals, not the checkpoint)
    raise CheckpointError(f"{directory}: cannot read params ({type(e).__name__}: {e})") from None
  return meta, params


def load(path: paths.PathLike) -> LoadedModel:
  """A BLT with its patcher, params on the default device (see the module docstring for accepted paths)."""
  directory = find_params_dir(path)
  meta, params = _read(directory)
  if meta["model_type"] != "blt":
    raise CheckpointError(f"{directory}: this is an entropy model; scoring and generation need a BLT checkpoint")
  config = BLTConfig.from_dict(meta["model"])
  entropy_dir = directory / ENTROPY_SUBDIR
  has_entropy = (entropy_dir / checkpoint.CONFIG_FILE).is_file()
  if meta.get("patching"):
    patching = PatchingConfig.from_dict(meta["patching"])
  elif has_entropy:  # a converted source that states no patcher: the reference's default, entropy
    patching = PatchingConfig()
  else:
    raise CheckpointError(f"{directory / checkpoint.CONFIG_FILE} names no patching mode and there is no "
                          f"{ENTROPY_SUBDIR}/ beside it")
  entropy_config = entropy_params = None
  if patching.mode == "entropy":
    if not has_entropy:
      raise CheckpointError(f"{directory}: entropy patching needs the entropy model, expected in {entropy_dir}")
    ent_meta, entropy_params = _read(entropy_dir)
    if ent_meta["model_type"] != "entropy_model":
      raise CheckpointError(f"{entropy_dir}: expected an entropy model, found a {ent_meta['model_type']}")
    entropy_config = EntropyModelConfig.from_dict(ent_meta["model"])
  return LoadedModel(config, params, patching, entropy_config, entropy_params, str(directory))
