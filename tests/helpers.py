"""Helpers several test files share: a tiny random BLT checkpoint, damage to a saved train state."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import checkpoint, tokenizer
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import compute_entropies, init_entropy_model
from blt_jax.model import init_blt


def _unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def tiny_entropy_blt(max_seqlen: int) -> dict:
  """A random tiny BLT and entropy model; entropy patching at the median entropy of a sample, so patches vary.

  Returns dict(blt_cfg, blt_params, ent_cfg, ent_params, patch_cfg): `save_checkpoint`'s keyword arguments.
  """
  blt_cfg = BLTConfig(
      dim_local_encoder=32,
      n_layers_local_encoder=1,
      n_heads_local_encoder=4,
      dim_global=64,
      n_layers_global=2,
      n_heads_global=4,
      dim_local_decoder=32,
      n_layers_local_decoder=1,
      n_heads_local_decoder=4,
      cross_attn_k=2,
      cross_attn_nheads=4,
      encoder_hash_byte_group_size=(3, 4),
      encoder_hash_byte_group_vocab=211,
      encoder_hash_byte_group_nb_functions=1,
      local_attention_window_len=16,
      max_seqlen=max_seqlen,
      max_encoder_seq_length=128,
  )
  ent_cfg = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=16, max_seqlen=48)
  blt_params = _unbox(init_blt(jax.random.PRNGKey(0), blt_cfg))
  ent_params = _unbox(init_entropy_model(jax.random.PRNGKey(1), ent_cfg))
  sample = jnp.asarray([tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)])
  threshold = float(np.median(np.asarray(compute_entropies(ent_params, sample, ent_cfg))))
  return dict(
      blt_cfg=blt_cfg,
      blt_params=blt_params,
      ent_cfg=ent_cfg,
      ent_params=ent_params,
      patch_cfg=PatchingConfig(mode="entropy", threshold=threshold),
  )


def save_checkpoint(path, blt_cfg, blt_params, patch_cfg, ent_cfg=None, ent_params=None) -> str:
  """Saves a BLT (and its entropy model in `path/entropy_model`) as `loading.load` reads it; returns the path."""
  checkpoint.save_params(
      path,
      blt_params,
      {"format": "blt_jax", "model_type": "blt", "model": blt_cfg.to_dict(), "patching": patch_cfg.to_dict()},
  )
  if ent_cfg is not None:
    checkpoint.save_params(
        pathlib.Path(path) / "entropy_model",
        ent_params,
        {"format": "blt_jax", "model_type": "entropy_model", "model": ent_cfg.to_dict()},
    )
  return str(path)


def state_array_files(step_dir: pathlib.Path) -> list:
  """The array data files of a saved train state step (orbax keeps them in `d/` folders)."""
  return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def largest_state_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The biggest array data file of a saved train state step (one file lost or cut short, as a failed copy leaves it)."""
  return max(state_array_files(step_dir), key=lambda p: p.stat().st_size)


def truncate_state_arrays(step_dir: pathlib.Path) -> None:
  """Cuts every array data file of a saved train state step to half its size."""
  files = state_array_files(step_dir)
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
