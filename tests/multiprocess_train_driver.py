"""One process of a small multi-process training run (used by tests/test_train.py; also handy by hand).

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/multiprocess_train_driver.py WORKDIR '{"mesh.process_id": 0, ...}'

Loads configs/tiny.py, applies the json dict of dotted-key overrides (the mesh's coordinator_address, num_processes
and process_id among them), trains, and prints one json line: {"process": i, "data_shard": [index, count],
"start_step": ..., "final_step": ..., "preempted": bool, "losses": {step: loss}, "evals": {step: {...}}}.
SIGTERM stops the run at a step every process agrees on (see `blt_jax.train.StopRequest`); the line is printed then
too, with "preempted": true.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
if ROOT not in sys.path:  # run as a script, only tests/ is on the path
  sys.path.insert(0, ROOT)


def load_config(name: str):
  """`get_config()` of configs/<name>.py."""
  from blt_jax.train_config import load_config_file  # pylint: disable=g-import-not-at-top

  return load_config_file(os.path.join(CONFIGS, f"{name}.py"))


def apply_overrides(cfg, overrides: dict):
  """Sets each dotted key (e.g. "model.dim_global") of `cfg`; unknown keys raise like the command line does."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r}")
    node[leaf] = value
  return cfg


def main(workdir: str, overrides_json: str) -> None:
  # Imported here so that the environment (JAX_PLATFORMS, XLA_FLAGS) is read first.
  from blt_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  cfg = apply_overrides(load_config("tiny"), json.loads(overrides_json))
  trainer = train.Trainer(cfg, workdir)
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  losses = {str(step): m["loss"] for step, m in summary["history"] if "loss" in m}
  evals = {str(step): m for step, m in summary["history"] if "val_loss" in m}
  print(
      json.dumps(
          dict(
              process=jax.process_index(),
              process_count=jax.process_count(),
              device_count=jax.device_count(),
              data_shard=[trainer.data_index, trainer.data_count],
              start_step=summary["start_step"],
              final_step=summary["final_step"],
              preempted=summary["preempted"],
              losses=losses,
              evals=evals,
          )
      ),
      flush=True,
  )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
