"""The paper's central comparison at CPU scale: BPE vs byte vs BLT transformers at equal training FLOPs.

  python scripts/flop_matched_study.py --budget-minutes 50 --out runs/study
  python scripts/flop_matched_study.py --smoke --out /tmp/study_smoke     # every variant a few steps
  # Round two, each part on its own against the same OUT (finished stages and runs are reused):
  python scripts/flop_matched_study.py --out runs/study --seeds 0,1 --noise all          # a second seed, noise
  python scripts/flop_matched_study.py --out runs/study --budget-scale 3 --variants bpe,blt_space --noise none

Trains, on the same training bytes and the same training-FLOP budget: a BPE-token transformer, a byte-level
transformer, and BLTs with static (4 bytes), space and entropy patching (two thresholds; a small entropy model is
trained first and its cost reported on its own). Writes OUT/study.json, OUT/study.md and OUT/study.png: held-out
bits per byte against training FLOPs, inference FLOPs per byte, mean patch lengths, and gzip/bzip2/xz on the same
held-out text, and each finished run's bits per byte on the held-out text under five noise types
(blt_jax/study/noise.py). Running the same command again reuses every finished stage in OUT (see
blt_jax/study/runner.py); the report covers every finished run in OUT, whatever the flags of this invocation.
The Debian packages python3.11-doc and debian-handbook are read from --debs (fetched there with `apt-get
download` when absent); everything else is offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blt_jax.study import noise, runner, variants  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="study directory (outputs, and every stage for resuming)")
  p.add_argument("--budget-minutes", type=float, default=50.0, help="wall time the whole study may take")
  p.add_argument("--smoke", action="store_true", help="tiny models and data, every variant a few steps")
  p.add_argument("--debs", default="", help="dir with (or for) the .deb files; default OUT/debs")
  p.add_argument(
      "--seeds",
      default="0",
      help="run seeds, comma-separated: seed K inits the params with K and "
      "orders the training documents with --data-seed + K; each seed's runs go to their own directory",
  )
  p.add_argument(
      "--data-seed",
      type=int,
      default=0,
      help="corpus selection, training document order (plus the run seed), held-out noise",
  )
  p.add_argument(
      "--variants",
      default="all",
      help="'all' or comma-separated variant names to run: " + ",".join(v.name for v in variants.VARIANTS),
  )
  p.add_argument(
      "--noise",
      default="all",
      help="'all', 'none' or comma-separated noise types to score every "
      "selected run under: " + ",".join(n.name for n in noise.NOISES),
  )
  p.add_argument(
      "--budget-scale",
      type=float,
      default=1.0,
      help="train the selected runs at this multiple of the plan's training FLOPs (e.g. 3)",
  )
  p.add_argument("--bpe-merges", type=int, default=None, help="BPE merges (default 4000; smoke 200)")
  return p.parse_args(argv)


def _seeds(spec: str) -> tuple:
  try:
    seeds = tuple(dict.fromkeys(int(x) for x in spec.split(",") if x.strip()))
  except ValueError:
    raise ValueError(f"--seeds {spec!r}: expected comma-separated integers such as 0,1") from None
  if not seeds or min(seeds) < 0:
    raise ValueError(f"--seeds {spec!r}: expected one or more non-negative integers")
  return seeds


def _variants(spec: str) -> tuple:
  if spec.strip() == "all":
    return ()
  try:
    return tuple(variants.variant(x.strip()).name for x in spec.split(",") if x.strip())
  except KeyError as e:
    raise ValueError(f"--variants: {e.args[0]}") from None


def settings(args: argparse.Namespace) -> runner.Settings:
  if args.smoke:
    s = runner.smoke_settings(args.out, args.budget_minutes, args.debs)
  else:
    s = runner.Settings(out=args.out, budget_minutes=args.budget_minutes, debs_dir=args.debs)
  extra = dict(
      seeds=_seeds(args.seeds),
      data_seed=args.data_seed,
      budget_scale=args.budget_scale,
      noise=tuple(n.name for n in noise.parse(args.noise)),
      variants=_variants(args.variants),
  )
  if args.bpe_merges is not None:
    extra["bpe_merges"] = args.bpe_merges
  return dataclasses.replace(s, **extra)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.budget_scale <= 0:
      raise ValueError(f"--budget-scale must be positive, got {args.budget_scale}")
    runner.Study(settings(args)).run()
  except (RuntimeError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
