"""Patching fitted to the data: the entropy threshold for a target mean patch length, and the patch slots rows need.

  python -m blt_jax.calibrate --checkpoint ENTROPY_OR_BLT --input 'data/*.jsonl' --bytes-per-patch 4.5 \
      --seq-len 14336 [--overflow 1e-3] [--max-rows N] [--multiple-of 128] [--json OUT]

Rows are the trainer's (`data.make_train_iterator`: packed rows of `seq_len` bytes, documents split at EOS), their
entropies are computed once, and every candidate threshold is tried with the trainer's own patcher
(`steps.make_patches`), so windows, context resets, `max_patch_length` and monotonic mode count exactly as in
training. Bytes per patch are counted as the trainer's `mean_patch_length` counts them: (seq_len + 1) positions
per row over the patches made. The trainer calls `calibrate` at start-up for `patching.target_bytes_per_patch`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from blt_jax import data as data_lib
from blt_jax import patching as patching_lib
from blt_jax import steps
from blt_jax.config import EntropyModelConfig, PatchingConfig
from blt_jax.data import patch_rows
from blt_jax.entropy_model import compute_entropies_jit

QUANTILES = (0.5, 0.9, 0.99, 0.999)
SAMPLE_SPAN_BYTES = 8 << 20  # rows are sampled across this much of the training stream (`sample_rows`)
CONFIDENCE = 0.95  # max_patches bounds the overflow rate at this confidence (distribution-free, see `slots_for`)
_ROWS_PER_CALL = 16  # rows per entropy-model call (one compiled shape)
_MAX_ITERATIONS = 48  # bisection steps; float32 thresholds are exhausted well before


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What `calibrate` measured on a sample of rows; `to_json` holds the same numbers."""

  threshold: float  # float32-exact; the threshold patching compares entropies with
  target_bytes_per_patch: float
  bytes_per_patch: float  # measured with `threshold` on the sample
  rows: int
  seq_len: int
  patches_per_row: Dict[str, int]  # p50, p90, p99, p99.9, max
  overflow: float  # asked fraction of rows that may need more than max_patches
  max_patches: int
  overflow_rows: float  # fraction of the sample that needs more than max_patches
  slots_per_patch: float  # padding: slots the global model runs / patches used

  def overrides(self) -> str:
    return f"--config.patching.threshold={self.threshold!r} --config.patching.max_patches={self.max_patches}"

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), overrides=self.overrides())


def check_target(target: float, seq_len: int) -> None:
  """A mean patch length lies between one byte and the row (its seq_len + 1 positions in one patch)."""
  if not 1.0 <= target <= seq_len:
    raise ValueError(
        f"target bytes per patch {target:g} is out of range: a mean patch length lies between 1 and "
        f"the row length ({seq_len} bytes)"
    )


def sample_rows(
    data_cfg, seq_len: int, num_rows: int, seed: int, span_bytes: Optional[int] = None
) -> Dict[str, np.ndarray]:
  """`num_rows` training rows spread evenly over the start of the stream a trainer with `seed` reads.

  Documents are often longer than a few rows, so the very first rows would hold only a handful of them: the rows
  are every k-th of the first `span_bytes` (default `SAMPLE_SPAN_BYTES`), or the first `num_rows` if they hold
  more. Every process reads the same rows (`process_count=1`), so a multi-host run calibrates one threshold.
  Returns {tokens, ...} `[R, seq_len]` arrays (with `entropies` when the data config has an entropy store).
  """
  span_bytes = SAMPLE_SPAN_BYTES if span_bytes is None else span_bytes
  stride = max(1, span_bytes // (num_rows * seq_len))
  data_cfg = copy.deepcopy(data_cfg)
  data_cfg.prefetch = 0  # no background thread left behind
  batch = min(num_rows * stride, 256)
  iterator = data_lib.make_train_iterator(data_cfg, seq_len, batch, seed, process_index=0, process_count=1)
  kept, read = [], 0
  try:
    while read < num_rows * stride:
      rows = next(iterator)
      offset = (-read) % stride  # the first row of this batch that is a multiple of stride in the stream
      kept.append({k: v[offset::stride] for k, v in rows.items()})
      read += batch
  finally:
    getattr(iterator, "close", lambda: None)()
  return {k: np.concatenate([b[k] for b in kept])[:num_rows] for k in kept[0]}


def row_entropies(tokens_RN: np.ndarray, params, config: EntropyModelConfig) -> np.ndarray:
  """float32 `[R, N]` entropies, `_ROWS_PER_CALL` rows per call (the last call padded) so it compiles once."""
  rows = tokens_RN.shape[0]
  step = min(rows, _ROWS_PER_CALL)
  out = []
  for start in range(0, rows, step):
    chunk = tokens_RN[start : start + step]
    padded = np.pad(chunk, ((0, step - chunk.shape[0]), (0, 0)))
    out.append(np.asarray(compute_entropies_jit(params, padded, config))[: chunk.shape[0]])
  return np.concatenate(out).astype(np.float32)


def patches_per_row(
    tokens_RN: np.ndarray, entropies_RN: np.ndarray, patching: PatchingConfig, threshold: float
) -> np.ndarray:
  """int `[R]`: patches each row needs at `threshold`, made by the trainer's `steps.make_patches`.

  The patcher takes its threshold as a static argument, so under jit every candidate would compile anew (about a
  second each); op by op, the same functions run in milliseconds and compare the same values.
  """
  num_positions = tokens_RN.shape[1] + 1
  sc = steps.StepConfig(
      model=None, patching=dataclasses.replace(patching, threshold=float(threshold)), max_patches=num_positions
  )  # as many slots as positions: nothing overflows
  counts = []
  with jax.disable_jit():
    for start in range(0, tokens_RN.shape[0], 256):
      batch = dict(tokens=tokens_RN[start : start + 256], entropies=entropies_RN[start : start + 256])
      counts.append(np.asarray(steps.make_patches(sc, batch, None).num_patches_B))
  return np.concatenate(counts)


def bytes_per_patch(counts_R: np.ndarray, seq_len: int) -> float:
  """The trainer's mean_patch_length: every row's seq_len + 1 positions over the patches they need."""
  return len(counts_R) * (seq_len + 1) / max(int(np.sum(counts_R)), 1)


def fit_threshold(
    tokens_RN: np.ndarray, entropies_RN: np.ndarray, patching: PatchingConfig, target: float
) -> tuple[float, np.ndarray]:
  """(threshold, patches per row) whose mean patch length is the closest to `target` (bisection).

  Fewer positions pass a higher threshold in every mode (plain, monotonic, with threshold_add), and splits by
  max_patch_length never add patches when two merge, so the mean patch length grows with the threshold.
  Thresholds are float32 values, the precision entropies are compared in.
  """
  seq_len = tokens_RN.shape[1]
  check_target(target, seq_len)
  span = float(np.max(np.abs(entropies_RN))) + 1.0  # past every entropy and every difference of two

  def measure(t):
    counts = patches_per_row(tokens_RN, entropies_RN, patching, t)
    return counts, bytes_per_patch(counts, seq_len)

  lo, hi = float(np.float32(-2 * span)), float(np.float32(2 * span))
  (lo_counts, lo_mean), (hi_counts, hi_mean) = measure(lo), measure(hi)
  if not lo_mean <= target <= hi_mean:
    raise ValueError(
        f"target bytes per patch {target:g} is out of reach on these rows: entropy patching gives "
        f"{lo_mean:.3f} (every position starts a patch) to {hi_mean:.3f} (none does; documents, "
        f"max_patch_length={patching.max_patch_length} and the first two positions still split)"
    )
  for _ in range(_MAX_ITERATIONS):
    mid = float(np.float32((lo + hi) / 2))
    if mid in (lo, hi):  # adjacent float32 values: nothing in between to try
      break
    counts, mean = measure(mid)
    if mean < target:
      lo, lo_counts, lo_mean = mid, counts, mean
    else:
      hi, hi_counts, hi_mean = mid, counts, mean
  if target - lo_mean < hi_mean - target:
    return lo, lo_counts
  return hi, hi_counts


def _binomial_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p), in log space (n may be large)."""
  if p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 1.0 if k >= n else 0.0
  log_terms = [
      math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
      for i in range(k + 1)
  ]
  top = max(log_terms)
  return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def slots_for(counts_R: np.ndarray, overflow: float, multiple_of: int = 1) -> int:
  """The fewest patch slots that overflow on at most `overflow` of rows, at `CONFIDENCE` (rounded up to
  `multiple_of`).

  The sample's k-th largest count bounds the (1 - overflow) quantile of all rows when at most k - 1 of R rows
  would lie above that quantile with probability <= 1 - CONFIDENCE (binomial). The largest such k is taken; a
  sample too small to bound the rate (R < log(1 - CONFIDENCE) / log(1 - overflow)) gives its maximum.
  """
  ordered = np.sort(np.asarray(counts_R))[::-1]
  rows, allowed = len(ordered), 0
  while allowed + 1 < rows and _binomial_cdf(allowed + 1, rows, overflow) <= 1.0 - CONFIDENCE:
    allowed += 1
  slots = int(ordered[allowed])
  return -(-slots // multiple_of) * multiple_of


def calibrate(
    rows: Dict[str, np.ndarray],
    patching: PatchingConfig,
    target: float,
    *,
    entropy_params=None,
    entropy_config: Optional[EntropyModelConfig] = None,
    overflow: float = 1e-3,
    multiple_of: int = 1,
) -> Calibration:
  """Fits the entropy threshold and max_patches to `rows` (`sample_rows`: stored entropies or the model's)."""
  tokens = np.asarray(rows["tokens"])
  seq_len = tokens.shape[1]
  check_target(target, seq_len)
  if not 0.0 <= overflow < 1.0:
    raise ValueError(f"overflow {overflow:g}: expected a fraction of rows in [0, 1)")
  if multiple_of < 1:
    raise ValueError(f"multiple_of {multiple_of}: expected >= 1")
  if "entropies" in rows:  # precomputed (data.entropy_store), as the train step takes them
    entropies = np.asarray(rows["entropies"], np.float32)
  elif entropy_params is None or entropy_config is None:
    raise ValueError("calibrating entropy patching needs an entropy model or rows with stored entropies")
  else:
    entropies = row_entropies(tokens, entropy_params, entropy_config)
  patching = dataclasses.replace(patching, mode="entropy")
  threshold, counts = fit_threshold(tokens, entropies, patching, target)
  max_patches = slots_for(counts, overflow, multiple_of)
  return Calibration(
      threshold=threshold,
      target_bytes_per_patch=float(target),
      bytes_per_patch=bytes_per_patch(counts, seq_len),
      rows=len(counts),
      seq_len=seq_len,
      patches_per_row={
          **{f"p{100 * q:g}": int(np.ceil(np.quantile(counts, q))) for q in QUANTILES},
          "max": int(np.max(counts)),
      },
      overflow=float(overflow),
      max_patches=max_patches,
      overflow_rows=float(np.mean(counts > max_patches)),
      slots_per_patch=max_patches / float(np.mean(np.minimum(counts, max_patches))),
  )


@dataclasses.dataclass(frozen=True)
class RowBudget:
  """Rows cut to a patch budget (`patching.rows="patches"`), fitted by `fit_row_budget`: the max_patches that makes
  the fewest FLOPs per byte learnt, set against rows of `seq_len` bytes with `Calibration.max_patches` slots."""

  max_patches: int
  row_fill: float  # bytes per row / seq_len (the local models' positions that hold a byte)
  slot_fill: float  # patches per row / max_patches (the global stack's slots that hold a patch)
  cost_per_byte: float  # training FLOPs per byte learnt (flops.py over every position and slot the step runs)
  byte_rows_cost_per_byte: float  # the same for rows of seq_len bytes with Calibration.max_patches slots
  model_cost_per_byte: float  # flops.py's model FLOPs per byte at the measured bytes per patch (no padding)

  def overrides(self) -> str:
    return f"--config.patching.rows=patches --config.patching.max_patches={self.max_patches}"

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), overrides=self.overrides())


def row_starts(tokens_RN: np.ndarray, entropies_RN: np.ndarray, patching: PatchingConfig) -> np.ndarray:
  """bool `[R, N + 1]`: the patch starts of rows that begin where the rows do (the step's rule, op by op)."""
  out = []
  with jax.disable_jit():
    for start in range(0, tokens_RN.shape[0], 256):
      rows = tokens_RN[start : start + 256], entropies_RN[start : start + 256]
      out.append(np.asarray(patching_lib.starts(*rows, include_next_token=True, **patching.patch_kwargs())))
  return np.concatenate(out)


def fit_row_budget(starts_RT: np.ndarray, model_config, byte_rows_max_patches: int, multiple_of: int = 1) -> RowBudget:
  """The `max_patches` (a multiple of `multiple_of`) whose rows cost the fewest training FLOPs per byte learnt.

  A row's cost is what the step runs whatever it holds, flops.py's FLOPs for `seq_len` bytes in `max_patches`
  patches; rows cut to a budget learn the bytes `patch_rows.row_lengths` gives. Rows of `seq_len` bytes learn them all
  but run `byte_rows_max_patches` slots (and merge the patches of the rows that need more).

  The sampled rows start at evenly spaced stream positions; a packed stream cuts more rows where rows are short,
  k(x) bytes at position x take 1 / k(x) rows per byte, so rows per byte learnt are the mean of 1 / k (and the
  bytes a row holds its harmonic mean), and the slots' fill is averaged with the same weights.
  """
  from blt_jax import flops  # pylint: disable=g-import-not-at-top

  seq_len = starts_RT.shape[1] - 1
  row_cost = lambda slots: flops.blt_train_flops_per_byte(model_config, seq_len, seq_len / slots) * seq_len
  patches_R = starts_RT.sum(axis=1)
  best = None
  first = -(-2 // multiple_of) * multiple_of  # a row's first two positions are two patches
  for slots in range(first, max(first, int(patches_R.max())) + 1, multiple_of):
    lengths = patch_rows.row_lengths(starts_RT, slots)
    cost = row_cost(slots) * float(np.mean(1.0 / lengths))
    if best is None or cost < best[1]:
      best = (slots, cost, lengths)
  slots, cost, lengths = best
  cum_RT = np.cumsum(starts_RT, axis=1)
  used = cum_RT[np.arange(len(lengths)), lengths]  # starts at positions 0..k
  weights = (1.0 / lengths) / np.sum(1.0 / lengths)  # each sampled start's share of the packed stream's rows
  mean_patch = float(starts_RT.shape[1]) / float(np.mean(patches_R))  # (seq_len + 1) / patches per row
  return RowBudget(
      max_patches=int(slots),
      row_fill=1.0 / (float(np.mean(1.0 / lengths)) * seq_len),
      slot_fill=float(np.sum(weights * used)) / slots,
      cost_per_byte=cost,
      byte_rows_cost_per_byte=row_cost(byte_rows_max_patches) / seq_len,
      model_cost_per_byte=flops.blt_train_flops_per_byte(model_config, seq_len, mean_patch),
  )


def budget_report(b: RowBudget) -> str:
  """The lines the command prints for `--rows patches`."""
  return "\n".join(
      [
          f"rows cut to a patch budget: max_patches {b.max_patches} fills {b.slot_fill:.1%} of the slots and "
          f"{b.row_fill:.1%} of the bytes",
          f"training FLOPs per byte learnt: {b.cost_per_byte:.4g} ({b.cost_per_byte / b.model_cost_per_byte:.3f}x "
          f"flops.py's model); rows of seq_len bytes: {b.byte_rows_cost_per_byte:.4g} "
          f"({b.byte_rows_cost_per_byte / b.model_cost_per_byte:.3f}x)",
          f"overrides: {b.overrides()}",
      ]
  )


def report(c: Calibration) -> str:
  """The lines the command prints."""
  dist = "  ".join(f"{k} {v}" for k, v in c.patches_per_row.items())
  full = c.seq_len + 1
  return "\n".join(
      [
          f"threshold {c.threshold!r}: {c.bytes_per_patch:.3f} bytes per patch on {c.rows} rows of {c.seq_len} bytes "
          f"(target {c.target_bytes_per_patch:g})",
          f"patches per row: {dist}",
          f"max_patches {c.max_patches}: {100 * c.overflow_rows:.3g}% of these rows overflow (asked: at most "
          f"{100 * c.overflow:g}% of all rows, at {CONFIDENCE:.0%} confidence)",
          f"padding: {c.slots_per_patch:.3f} slots run per patch used ({full} slots, seq_len + 1, would be "
          f"{c.slots_per_patch * full / c.max_patches:.3f})",
          f"overrides: {c.overrides()}",
      ]
  )


def write_json(path: str, c: Calibration, budget: Optional[RowBudget] = None) -> None:
  """Writes `c.to_json()` (and `budget`'s as "row_budget") atomically (a reader sees the old file or the whole
  new one)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".calibration-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(dict(c.to_json(), **({"row_budget": budget.to_json()} if budget else {})), f, indent=2)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _checkpoint_patching(path: str) -> PatchingConfig:
  """A BLT checkpoint's own patching settings (so its max_patch_length, monotonicity... count); else defaults."""
  from blt_jax import checkpoint, paths  # pylint: disable=g-import-not-at-top

  root = paths.resolve(path)
  for candidate in (root, root / "export"):
    if (candidate / checkpoint.CONFIG_FILE).is_file():
      meta = checkpoint.read_params_config(candidate)
      if meta.get("model_type") == "blt" and meta.get("patching"):
        return dataclasses.replace(PatchingConfig.from_dict(meta["patching"]), mode="entropy")
      break
  return PatchingConfig(mode="entropy")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m blt_jax.calibrate", description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--checkpoint",
      required=True,
      help="entropy model dir, or a BLT checkpoint/export/workdir "
      "with entropy_model/ (its patching settings are used)",
  )
  p.add_argument(
      "--input",
      action="append",
      default=[],
      help="data.sources pattern (repeatable); none: the " "standard library corpus",
  )
  p.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
  p.add_argument("--bytes-per-patch", type=float, required=True, help="target mean patch length")
  p.add_argument("--seq-len", type=int, required=True, help="bytes per training row")
  p.add_argument("--overflow", type=float, default=1e-3, help="fraction of rows that may overflow max_patches")
  p.add_argument(
      "--max-rows",
      type=int,
      default=1024,
      help="rows sampled, evenly over the first 8 MiB of the "
      "training stream (or its first rows, when they hold more)",
  )
  p.add_argument("--multiple-of", type=int, default=1, help="round max_patches up to a multiple (128 for TPU)")
  p.add_argument(
      "--max-patch-length",
      type=int,
      default=None,
      help="patching.max_patch_length (default: the " "checkpoint's, else none)",
  )
  p.add_argument("--monotonicity", action="store_true", default=None, help="patching.monotonicity")
  p.add_argument("--seed", type=int, default=0, help="the training run's seed (its shuffle of documents)")
  p.add_argument(
      "--rows",
      choices=("bytes", "patches"),
      default="bytes",
      help="patches: also fit max_patches for rows cut to a patch budget (patching.rows=patches), by FLOPs per byte "
      "learnt; needs --config",
  )
  p.add_argument("--config", default=None, help="the BLT config trained (configs/*.py): its model prices the rows")
  p.add_argument("--json", default=None, help="also write the numbers here (atomically)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = _parser().parse_args(argv)
  from blt_jax import train, train_config  # pylint: disable=g-import-not-at-top  (train imports this module)

  try:
    check_target(args.bytes_per_patch, args.seq_len)
    if args.max_rows < 1:
      raise ValueError(f"--max-rows {args.max_rows}: expected >= 1")
    if args.rows == "patches" and not args.config:
      raise ValueError("--rows patches needs --config (a BLT config: its model prices rows and patch slots)")
    model_config = None
    if args.config:
      blt_cfg = train_config.load_config_file(args.config)
      if blt_cfg.model_type != "blt":
        raise ValueError(f"--config {args.config}: model_type={blt_cfg.model_type!r}, expected a BLT config")
      model_config = train_config.model_config(blt_cfg)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  patching = _checkpoint_patching(args.checkpoint)
  if args.max_patch_length is not None:
    patching = dataclasses.replace(patching, max_patch_length=args.max_patch_length or None)
  if args.monotonicity:
    patching = dataclasses.replace(patching, monotonicity=True)
  try:
    # As the trainer runs it: float32 entropies, no remat, this platform's kernel.
    entropy_config, params = train.load_entropy_model(args.checkpoint, run=train_config.base_config())
  except FileNotFoundError:
    raise SystemExit(
        f"error: --checkpoint {args.checkpoint}: no entropy model there (an entropy model dir, or a "
        f"BLT checkpoint with entropy_model/, is needed for entropy patching)"
    ) from None
  data_cfg = data_lib.default_data_config()
  data_cfg.sources = list(args.input)
  data_cfg.text_field = args.text_field
  try:
    rows = sample_rows(data_cfg, args.seq_len, args.max_rows, args.seed)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: --input {' '.join(args.input) or '(stdlib)'}: {e}") from None
  try:
    result = calibrate(
        rows,
        patching,
        args.bytes_per_patch,
        entropy_params=params,
        entropy_config=entropy_config,
        overflow=args.overflow,
        multiple_of=args.multiple_of,
    )
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(report(result), flush=True)
  budget = None
  if args.rows == "patches":
    tokens = np.asarray(rows["tokens"])
    entropies = rows.get("entropies")
    if entropies is None:
      entropies = row_entropies(tokens, params, entropy_config)
    fitted = dataclasses.replace(patching, mode="entropy", threshold=result.threshold)
    starts = row_starts(tokens, np.asarray(entropies, np.float32), fitted)
    budget = fit_row_budget(starts, model_config, result.max_patches, args.multiple_of)
    print(budget_report(budget), flush=True)
  if args.json:
    write_json(args.json, result, budget)


if __name__ == "__main__":
  main(sys.argv[1:])
