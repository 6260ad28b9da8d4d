"""The paper's central comparison at CPU scale: BPE vs byte vs BLT transformers at equal training FLOPs.

  python scripts/flop_matched_study.py --budget-minutes 50 --out runs/study
  python scripts/flop_matched_study.py --smoke --out /tmp/study_smoke     # every variant a few steps

Trains, on the same training bytes and the same training-FLOP budget: a BPE-token transformer, a byte-level
transformer, and BLTs with static (4 bytes), space and entropy patching (two thresholds; a small entropy model is
trained first and its cost reported on its own). Writes OUT/study.json, OUT/study.md and OUT/study.png: held-out
bits per byte against training FLOPs, inference FLOPs per byte, mean patch lengths, and gzip/bzip2/xz on the same
held-out text. Running the same command again reuses every finished stage in OUT (see blt_jax/study/runner.py).
The Debian packages python3.11-doc and debian-handbook are read from --debs (fetched there with `apt-get
download` when absent); everything else is offline.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blt_jax.study import runner  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="study directory (outputs, and every stage for resuming)")
  p.add_argument("--budget-minutes", type=float, default=50.0, help="wall time the whole study may take")
  p.add_argument("--smoke", action="store_true", help="tiny models and data, every variant a few steps")
  p.add_argument("--debs", default="", help="dir with (or for) the .deb files; default OUT/debs")
  p.add_argument("--seed", type=int, default=0, help="params init of every model")
  p.add_argument("--data-seed", type=int, default=0, help="corpus selection and training document order")
  p.add_argument("--bpe-merges", type=int, default=None, help="BPE merges (default 4000; smoke 200)")
  return p.parse_args(argv)


def settings(args: argparse.Namespace) -> runner.Settings:
  if args.smoke:
    s = runner.smoke_settings(args.out, args.budget_minutes, args.debs)
  else:
    s = runner.Settings(out=args.out, budget_minutes=args.budget_minutes, debs_dir=args.debs)
  extra = dict(seed=args.seed, data_seed=args.data_seed)
  if args.bpe_merges is not None:
    extra["bpe_merges"] = args.bpe_merges
  return dataclasses.replace(s, **extra)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    runner.Study(settings(args)).run()
  except (RuntimeError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
