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
  # The threshold is calibrated at start-up for this mean patch length on rows of the training stream, and stored with
  # the run (a fixed threshold such as 2.0 gave ~1.3 bytes per patch with this entropy model: issue 24).
  c.patching.target_bytes_per_patch = 4.5
  c.patching.max_patch_length = 16
  c.entropy_checkpoint = "runs/entropy_tiny"
  # Evaluate on the whole validation split (about 35 batches): its first 8 batches are 16 KB of three files, too few
  # to measure a mean patch length (one table-like file in them put it 22% below the target; issue 24).
  c.eval_batches = 0
  return c
