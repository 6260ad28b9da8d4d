"""configs/tiny.py with entropy patching from a trained entropy model (spec 3.3).

  python -m blt_jax.train --config configs/entropy_tiny.py --workdir runs/entropy_tiny
  python -m blt_jax.train --config configs/tiny_entropy.py --workdir runs/tiny_entropy \
      --config.entropy_checkpoint=runs/entropy_tiny
"""
import os

from blt_jax.train_config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(__file__), "tiny.py"))
  c.patching.mode = "entropy"
  c.patching.threshold = 2.0  # pick for a target mean patch length on your data (issue #106)
  c.patching.max_patch_length = 16
  c.entropy_checkpoint = "runs/entropy_tiny"
  return c
