"""Peak memory of `python -m blt_jax.convert --format hf` (and of the export back) against the checkpoint's size.

Writes a transformers-layout BLT with random weights (its hash tables `tables x hash_vocab x dim`, 500002 rows as
in the released models; small stacks), converts it in a child process and reads that process's peak RSS from
`wait4`, then exports the result back and measures that too. Not part of the test suite (it writes gigabytes):

  python scripts/convert_memory.py --dim 256 --dtype bfloat16 --workdir /tmp/convert_memory
  python scripts/convert_memory.py --dim 1024 --dtype bfloat16   # the 1B's hash tables: about 6 GB on disk

The checkpoint is generated tensor by tensor in row blocks, so the generator itself stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blt_jax import config as config_lib  # noqa: E402
from blt_jax.convert import hf, mapping, safetensors_io  # noqa: E402


def write_random_checkpoint(out: pathlib.Path, dim: int, tables: int, hash_vocab: int, dtype: str) -> int:
  """A transformers-layout BLT (+ patcher) with random weights; returns the bytes written."""
  config = config_lib.BLTConfig(
      dim_local_encoder=dim,
      n_layers_local_encoder=1,
      n_heads_local_encoder=max(1, dim // 64),
      dim_global=2 * dim,
      n_layers_global=2,
      n_heads_global=max(1, dim // 32),
      dim_local_decoder=dim,
      n_layers_local_decoder=2,
      n_heads_local_decoder=max(1, dim // 64),
      cross_attn_nheads=max(1, dim // 64),
      encoder_hash_byte_group_size=tuple(range(3, 3 + tables)),
      encoder_hash_byte_group_vocab=hash_vocab,
  )
  entropy = config_lib.EntropyModelConfig(dim=128, n_layers=2, n_heads=2)
  shapes, ent_shapes = mapping.expected_shapes(config), mapping.expected_shapes(entropy)
  targets = hf.hf_export_targets(config, shapes, ent_shapes)
  np_dtype = hf.dtype_of(dtype)
  rng = np.random.default_rng(0)

  def random_chunks(shape):
    def produce():
      rows = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * 4))
      for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start),) + tuple(shape[1:])
        yield (rng.standard_normal(block, np.float32) * 0.02).astype(np_dtype)

    return produce

  specs = {}
  for key, target in targets.items():
    ours = (ent_shapes if key.startswith("model.patcher.") else shapes)[target.path]
    shape = mapping.source_shape(target, ours)
    specs[key] = (np_dtype, shape, random_chunks(shape))
  out.mkdir(parents=True, exist_ok=True)
  size = safetensors_io.write_safetensors_streaming(out / hf.WEIGHTS_FILE, specs, {"format": "pt"})
  config_json, _ = hf.hf_config(config, entropy, config_lib.PatchingConfig(), dtype)
  (out / hf.CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
  return size


def peak_rss(cmd) -> tuple:
  """(peak RSS in bytes, seconds, exit status) of one child process."""
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
  _, status, usage = os.wait4(proc.pid, 0)
  return usage.ru_maxrss * 1024, time.time() - start, os.waitstatus_to_exitcode(status)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=256, help="encoder width dE (hash table width); the 1B has 1024")
  p.add_argument("--tables", type=int, default=6, help="hash tables (the released models have 6)")
  p.add_argument("--hash-vocab", type=int, default=500002, help="rows per hash table (released: 500002)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--workdir", default="/tmp/convert_memory")
  p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
  args = p.parse_args()
  work = pathlib.Path(args.workdir)
  if work.exists():
    shutil.rmtree(work)
  gib = lambda n: f"{n / 2 ** 30:.2f} GiB"

  t = time.time()
  size = write_random_checkpoint(work / "hf", args.dim, args.tables, args.hash_vocab, args.dtype)
  f32 = size * (4 // np.dtype(hf.dtype_of(args.dtype)).itemsize)
  print(
      f"checkpoint: {args.tables} x {args.hash_vocab} x {args.dim} hash tables, {args.dtype}: {gib(size)} on disk "
      f"({gib(f32)} as float32 params), written in {time.time() - t:.0f}s"
  )
  base, _, _ = peak_rss([sys.executable, "-c", "import blt_jax.convert, blt_jax.checkpoint, jax; jax.devices()"])
  print(f"baseline (python + jax + orbax imported): peak RSS {gib(base)}")

  rss, secs, code = peak_rss(
      [
          sys.executable,
          "-m",
          "blt_jax.convert",
          "--format",
          "hf",
          "--src",
          str(work / "hf"),
          "--out",
          str(work / "ckpt"),
      ]
  )
  assert code == 0, f"convert failed ({code})"
  print(
      f"convert --format hf: peak RSS {gib(rss)} in {secs:.0f}s = {rss / size:.2f} x the checkpoint on disk, "
      f"{rss / f32:.2f} x its float32 params; above the baseline {gib(rss - base)} = {(rss - base) / f32:.2f} x"
  )
  rss, secs, code = peak_rss(
      [
          sys.executable,
          "-m",
          "blt_jax.export",
          "--format",
          "hf",
          "--checkpoint",
          str(work / "ckpt"),
          "--out",
          str(work / "export"),
          "--dtype",
          args.dtype,
      ]
  )
  assert code == 0, f"export failed ({code})"
  print(
      f"export --format hf --dtype {args.dtype}: peak RSS {gib(rss)} in {secs:.0f}s = {rss / size:.2f} x the "
      f"file it writes, {rss / f32:.2f} x the float32 params it loads; above the baseline {gib(rss - base)}"
  )
  if not args.keep:
    shutil.rmtree(work)
  return 0


if __name__ == "__main__":
  sys.exit(main())
