"""The study's models: one training config per variant, all built from the repository's tiny configs.

Every matched variant shares the data, its order (`data_seed`), the init seed, the batch, the row length in bytes
and the optimizer; only the model and its patching differ. The BLTs are `configs/tiny.py` (global transformer:
2 layers of width 128) with their patching; the byte and BPE transformers are the package's causal transformer at
the global transformer's size (2 layers, width 128), the BPE one with a vocabulary-sized head and rows of about the
same bytes; the entropy model is `configs/entropy_tiny.py`. `--smoke` shrinks every width.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Tuple

import ml_collections

import blt_jax
from blt_jax import train_config
from blt_jax.config import EntropyModelConfig

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(blt_jax.__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class Scale:
  """Sizes shared by every variant."""

  seq_len: int  # bytes per training row (and per scoring row)
  batch_size: int  # rows per step
  lm_dim: int  # byte / BPE transformer width (= the BLT global width)
  lm_layers: int
  lm_heads: int
  entropy_steps: int  # entropy model training steps (its cost is reported on its own)
  smoke: bool = False
  lr: float = 2e-3  # configs/tiny.py's
  warmup_fraction: float = 0.1  # of each run's steps


REAL = Scale(seq_len=256, batch_size=8, lm_dim=128, lm_layers=2, lm_heads=4, entropy_steps=400)
SMOKE = Scale(seq_len=64, batch_size=8, lm_dim=32, lm_layers=1, lm_heads=2, entropy_steps=3, smoke=True)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  kind: str  # "bpe", "byte" or "blt"
  label: str
  mode: Optional[str] = None  # BLT patching mode
  patch_size: Optional[int] = None  # static mode
  target_patch_length: Optional[float] = None  # entropy mode: the threshold is chosen to give this on training text


MAX_ENTROPY_PATCH = 16  # configs/tiny_entropy.py's max_patch_length

VARIANTS: Tuple[Variant, ...] = (
    Variant("bpe", "bpe", "BPE-token transformer"),
    Variant("byte", "byte", "byte-level transformer"),
    Variant("blt_static4", "blt", "BLT, static patches of 4", mode="static", patch_size=4),
    Variant("blt_space", "blt", "BLT, space patching", mode="space"),
    Variant(
        "blt_entropy_short", "blt", "BLT, entropy patching (short patches)", mode="entropy", target_patch_length=3.0
    ),
    Variant("blt_entropy_long", "blt", "BLT, entropy patching (long patches)", mode="entropy", target_patch_length=6.0),
)


def variant(name: str) -> Variant:
  for v in VARIANTS:
    if v.name == name:
      return v
  raise KeyError(f"unknown variant {name!r}; known: {[v.name for v in VARIANTS]}")


def _repo_config(name: str) -> ml_collections.ConfigDict:
  path = os.path.join(CONFIGS_DIR, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the study builds on {path}; run it from a checkout of the repository")
  return train_config.load_config_file(path)


def _run_settings(
    c: ml_collections.ConfigDict, scale: Scale, data: dict, num_steps: int, seed: int, data_seed: int, evals: int
) -> ml_collections.ConfigDict:
  """What every trainer-run variant shares: data, order, seeds, batch, schedule, logging."""
  c.data.sources = (data["train"],)
  c.data.validation_sources = (data["heldout"],)  # unused: the study scores held-out text itself
  c.data.text_field = "text"
  c.data.shuffle_seed = data_seed
  c.data.num_threads = 2
  c.seed = seed
  c.seq_len = scale.seq_len
  c.global_batch_size = scale.batch_size
  c.num_steps = num_steps
  c.optimizer.lr = scale.lr
  c.optimizer.warmup = max(1, math.ceil(scale.warmup_fraction * num_steps))
  c.compute_dtype = "float32"
  c.log_every = max(1, num_steps // 10)
  c.eval_every = max(1, math.ceil(num_steps / evals))
  c.checkpoint_every = c.eval_every
  c.keep_checkpoints = 1
  return c


def blt_config(
    v: Variant,
    scale: Scale,
    data: dict,
    *,
    num_steps: int,
    seed: int,
    data_seed: int,
    evals: int,
    threshold: Optional[float] = None,
    max_patches: int = 0,
    entropy_checkpoint: str = "",
) -> ml_collections.ConfigDict:
  c = _run_settings(_repo_config("tiny.py"), scale, data, num_steps, seed, data_seed, evals)
  if scale.smoke:
    m = c.model
    m.dim_local_encoder = m.dim_local_decoder = 32
    m.dim_global = 64
    m.n_layers_global = m.n_layers_local_decoder = 1  # the same code paths as 2 layers, compiled faster
    m.n_heads_local_encoder = m.n_heads_local_decoder = m.n_heads_global = m.cross_attn_nheads = 2
    m.encoder_hash_byte_group_size = (3, 4)
    m.encoder_hash_byte_group_vocab = 512
  c.patching.mode = v.mode
  c.patching.max_patches = max_patches
  if v.mode == "static":
    c.patching.patch_size = v.patch_size
  if v.mode == "entropy":
    if threshold is None or not entropy_checkpoint:
      raise ValueError(f"variant {v.name}: entropy patching needs a threshold and the entropy model's dir")
    c.patching.threshold = float(threshold)
    c.patching.max_patch_length = MAX_ENTROPY_PATCH
    c.entropy_checkpoint = entropy_checkpoint
  return c


def _lm_section(c: ml_collections.ConfigDict, scale: Scale, dim: int, layers: int, heads: int, window) -> None:
  e = c.entropy_model
  e.dim, e.n_layers, e.n_heads = dim, layers, heads
  e.sliding_window = window
  e.max_seqlen = max(e.max_seqlen, 2 * scale.seq_len)


def entropy_model_config(scale: Scale, data: dict, *, seed: int, data_seed: int) -> ml_collections.ConfigDict:
  c = _run_settings(_repo_config("entropy_tiny.py"), scale, data, scale.entropy_steps, seed, data_seed, evals=1)
  if scale.smoke:
    _lm_section(c, scale, 32, 1, 2, c.entropy_model.sliding_window)
  return c


def byte_lm_config(
    scale: Scale, data: dict, *, num_steps: int, seed: int, data_seed: int, evals: int
) -> ml_collections.ConfigDict:
  """The byte-level transformer: the entropy-model stack (a plain causal byte LM) at the LM size, full causal."""
  c = _run_settings(_repo_config("entropy_tiny.py"), scale, data, num_steps, seed, data_seed, evals)
  _lm_section(c, scale, scale.lm_dim, scale.lm_layers, scale.lm_heads, None)
  return c


def bpe_model_config(scale: Scale, vocab_size: int) -> EntropyModelConfig:
  """The BPE transformer: the byte transformer's stack with a `vocab_size` head."""
  c = byte_lm_config(scale, dict(train="", heldout=""), num_steps=1, seed=0, data_seed=0, evals=1)
  c.entropy_model.vocab_size = vocab_size
  return train_config.model_config(c)


def bpe_seq_len(scale: Scale, bytes_per_token: float) -> int:
  """Tokens per BPE row: about the byte models' row in bytes."""
  return max(8, int(round(scale.seq_len / bytes_per_token)))


def optimizer_config(scale: Scale, num_steps: int) -> ml_collections.ConfigDict:
  """The optimizer section every variant trains with (the BPE loop reads it directly)."""
  return byte_lm_config(scale, dict(train="", heldout=""), num_steps=num_steps, seed=0, data_seed=0, evals=1).optimizer
