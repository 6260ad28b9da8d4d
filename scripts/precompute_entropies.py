"""Score a corpus with an entropy model once and store per-token entropies (tensorstore zarr).

  python scripts/precompute_entropies.py --config configs/tiny_entropy.py --out runs/entropies_stdlib \
      [--entropy_checkpoint runs/entropy_tiny]

`--out` may be relative, absolute or a URL (`gs://bucket/stores/stdlib`); so may the config's data sources.

Scores the train and validation documents of the config's data section (the whole corpus), then training with
`--config.data.entropy_store=runs/entropies_stdlib` patches from the stored values instead of running the entropy
model inside every step (see BENCHMARKS.md for which is faster).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from blt_jax import entropy_store, layer_stacking, paths  # noqa: E402
from blt_jax.train import load_entropy_model  # noqa: E402
from blt_jax.train_config import load_config_file  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a configs/*.py file (its data section names the corpus)")
  parser.add_argument("--out", required=True, help="store directory to write (local or a gs:// URL)")
  parser.add_argument("--entropy_checkpoint", default=None, help="defaults to the config's entropy_checkpoint")
  args = parser.parse_args()
  cfg = load_config_file(args.config)
  # The run's settings (float32 entropies), as its in-graph entropy model would use: the same patches either way.
  ent_cfg, params = load_entropy_model(args.entropy_checkpoint or cfg.entropy_checkpoint, run=cfg)
  params = layer_stacking.to_run_layout(params, ent_cfg)
  out = paths.resolve(args.out)
  t0 = time.perf_counter()
  report = lambda done, total: print(f"\r{done}/{total} documents", end="", flush=True)
  summary = entropy_store.write_corpus_store(out, cfg.data, params, ent_cfg, progress=report)
  dt = time.perf_counter() - t0
  print(
      f"\nwrote {summary['tokens']} entropies of {summary['documents']} documents to {out} in {dt:.1f}s "
      f"({summary['tokens'] / dt:.0f} tokens/s)"
  )


if __name__ == "__main__":
  main()
