"""Export a blt_jax checkpoint to the Hugging Face transformers layout, loadable by `BltForCausalLM.from_pretrained`.

  python -m blt_jax.export --format hf --checkpoint CKPT --out DIR [--dtype bfloat16] [--max-shard-size 5GB]

CKPT is anything `blt_jax.loading.load` reads: a converted checkpoint, a training run's `export/` or its workdir.
DIR gets `config.json` and `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`); the entropy model goes inside as `model.patcher.*`. Tensors are written one at a
time and cast in row blocks, so the export needs little memory beyond the loaded params. Where transformers would
compute differently from blt_jax (docs/converting.md, "Hugging Face layout"), the export stops and names every difference;
`--force` writes it anyway.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

FORMATS = ("hf",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB"
_BLOCK_BYTES = 64 * 1024 * 1024


class ExportError(ValueError):
  """The checkpoint cannot be written faithfully in the target layout; the message lists why."""


def export_hf(
    checkpoint: Any,
    out: Any,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    overwrite: bool = False,
) -> Dict[str, Any]:
  """Writes `checkpoint` (a path or a `loading.LoadedModel`) to `out` in transformers' layout; returns a summary."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from blt_jax import loading, paths  # pylint: disable=g-import-not-at-top
  from blt_jax.convert import hf, mapping, safetensors_io  # pylint: disable=g-import-not-at-top

  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
  out = paths.resolve(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
  model = checkpoint if isinstance(checkpoint, loading.LoadedModel) else loading.load(checkpoint)
  config_json, problems = hf.hf_config(model.config, model.entropy_config, model.patching, dtype)
  if problems and not force:
    raise ExportError(
        f"{model.path}: transformers' BltForCausalLM would compute differently from blt_jax: "
        + "; ".join(problems)
        + " (force=True / --force writes it anyway)"
    )

  flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(_unbox(model.params)).items()}
  ent_flat = None
  if model.entropy_params is not None:
    ent_flat = {
        path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(_unbox(model.entropy_params)).items()
    }
  targets = hf.hf_export_targets(
      model.config,
      {p: a.shape for p, a in flat.items()},
      None if ent_flat is None else {p: a.shape for p, a in ent_flat.items()},
  )
  want = hf.dtype_of(dtype)
  tensors: Dict[str, Tuple[np.ndarray, Any]] = {}
  for key, target in targets.items():
    leaves = ent_flat if key.startswith("model.patcher.") else flat
    try:
      tensors[key] = mapping.from_ours(target, leaves[target.path])
    except mapping.ConversionError as e:
      raise ExportError(f"{model.path}: {e}") from None

  shards = _plan_shards({k: a.size * want.itemsize for k, a in tensors.items()}, max_shard_bytes)
  with paths.staged_dir(out, "exporting") as staging:
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
      name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      specs = {k: (want, tensors[k].shape, _chunks(tensors[k], want)) for k in names}
      total += safetensors_io.write_safetensors_streaming(staging / name, specs, {"format": "pt"})
      weight_map.update({k: name for k in names})
    if len(shards) > 1:
      (staging / hf.INDEX_FILE).write_text(hf.index_json(weight_map, total))
    (staging / hf.CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True))
  return {
      "out": str(out),
      "checkpoint": str(model.path),
      "dtype": dtype,
      "tensors": len(tensors),
      "bytes": total,
      "shards": len(shards),
      "patcher": ent_flat is not None,
      "problems": problems,
  }


def _unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  return nn.meta.unbox(tree)


def _chunks(array: np.ndarray, dtype: np.dtype):
  """Row blocks of `array` cast to `dtype` (a large table is never held whole in the new dtype)."""

  def produce():
    if array.ndim == 0 or array.nbytes <= _BLOCK_BYTES:
      yield np.ascontiguousarray(array, dtype=dtype)
      return
    rows = max(1, _BLOCK_BYTES // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
      yield np.ascontiguousarray(array[start : start + rows], dtype=dtype)

  return produce


def _plan_shards(sizes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
  """Tensors in name order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
  shards: List[List[str]] = [[]]
  used = 0
  for name in sorted(sizes):
    if shards[-1] and used + sizes[name] > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += sizes[name]
  return shards


def parse_size(text: str) -> int:
  """ "5GB", "500MB", "64KiB" or a plain number of bytes."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 1048576)")
  base = 1024 if m[3] or m[2] == "" else 1000
  return int(float(m[1]) * base ** " KMGT".index(m[2].upper() or " "))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m blt_jax.export", description="Write a blt_jax checkpoint in another library's layout."
  )
  p.add_argument(
      "--format",
      default="hf",
      choices=FORMATS,
      help="target layout: hf (transformers' BltForCausalLM: config.json + model.safetensors)",
  )
  p.add_argument("--checkpoint", required=True, help="a converted checkpoint, a training run's export/ or its workdir")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
  p.add_argument(
      "--dtype",
      default="float32",
      choices=("float32", "bfloat16", "float16"),
      help="tensor dtype in the safetensors files (params are float32; default keeps them exact)",
  )
  p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
  p.add_argument(
      "--force",
      action="store_true",
      help="write even where transformers would compute differently (each difference is printed)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    max_shard = parse_size(args.max_shard_size)
  except ValueError as e:
    parser.error(str(e))
  from blt_jax import loading  # pylint: disable=g-import-not-at-top

  try:
    summary = export_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=max_shard,
        force=args.force,
        overwrite=args.overwrite,
    )
  except (ExportError, loading.CheckpointError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  files = (
      "model.safetensors" if summary["shards"] == 1 else f"{summary['shards']} shards + model.safetensors.index.json"
  )
  print(f"exported {summary['checkpoint']} -> {summary['out']} (transformers BltForCausalLM layout)")
  print(
      f"  {summary['tensors']} tensors, {summary['bytes']:,} bytes of {summary['dtype']} in {files}"
      + (", entropy model as model.patcher.*" if summary["patcher"] else ", no entropy model")
  )
  for problem in summary["problems"]:
    print(f"  warning (--force): {problem}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
