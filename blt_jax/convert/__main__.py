"""CLI: python -m blt_jax.convert --format reference|hf --src DIR --out CKPT [--entropy-src DIR] [--overwrite]
[--dtype float32|bfloat16] [--hf-encoder-pooling transformers|reference] [--hf-patcher transformers|reference]."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m blt_jax.convert",
      description="Convert a released BLT / entropy-model checkpoint directory to blt_jax.",
  )
  p.add_argument(
      "--format",
      default="reference",
      help="source layout: reference (params.json + consolidated.pth, or config.json {args} + "
      "model.safetensors) or hf (transformers' BltForCausalLM: config.json + model.safetensors "
      "or sharded with model.safetensors.index.json)",
  )
  p.add_argument("--src", required=True, help="source model directory (a BLT, optionally with entropy_model/)")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
  p.add_argument(
      "--entropy-src", default=None, help="the BLT's entropy model directory when it is not SRC/entropy_model/"
  )
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument(
      "--dtype",
      choices=("float32", "bfloat16"),
      default="float32",
      help="store the params in this dtype: bfloat16 halves the checkpoint for users who only infer "
      "(default float32, the source's precision)",
  )
  p.add_argument(
      "--hf-encoder-pooling",
      choices=("transformers", "reference"),
      default="transformers",
      help="--format hf with all-layer encoder cross-attention: re-pool the patch queries before every "
      "layer as transformers does (default), or pool once as the reference does",
  )
  p.add_argument(
      "--hf-patcher",
      choices=("transformers", "reference"),
      default="transformers",
      help="--format hf: patch as transformers' patcher does (threshold only; default), or also honour "
      "config.json's patching_threshold_add / monotonicity as the reference would",
  )
  return p


def _print_summary(summary: dict) -> None:
  print(f"converted {summary['source']} ({summary['format']} format) -> {summary['out']}")
  for m in summary["models"]:
    dims = ", ".join(f"{k}={v}" for k, v in m["dims"].items())
    print(f"  {m['model_type']}: {m['params']:,} params ({dims})")
    print(f"    from {m['weights_file']} + {m['config_file']}")
    print(f"    wrote {m['path']}/config.json and {m['path']}/params/")
  if summary.get("choices"):
    print(
        "  where transformers and the reference differ: " + ", ".join(f"{k}={v}" for k, v in summary["choices"].items())
    )
  if summary["patching"]:
    print("  patching: " + ", ".join(f"{k}={v}" for k, v in summary["patching"].items()))
  elif summary["models"][0]["model_type"] == "blt":
    print("  patching: not stated by the source (none written)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  # Imported after argument parsing so that --help does not wait for jax.
  from blt_jax import convert  # pylint: disable=g-import-not-at-top

  if args.format not in convert.SUPPORTED_FORMATS:
    parser.error(f"unknown --format {args.format!r}; supported formats: {', '.join(convert.SUPPORTED_FORMATS)}")
  choices = None
  if args.format == "hf":
    choices = convert.ImportChoices(encoder_pooling=args.hf_encoder_pooling, patcher=args.hf_patcher)
  elif (args.hf_encoder_pooling, args.hf_patcher) != ("transformers", "transformers"):
    parser.error("--hf-encoder-pooling / --hf-patcher apply to --format hf only")
  try:
    summary = convert.convert_dir(
        args.src,
        args.out,
        format=args.format,
        entropy_src=args.entropy_src,
        overwrite=args.overwrite,
        choices=choices,
        dtype=args.dtype,
    )
  except (convert.ConversionError, FileExistsError) as e:
    # A bad source is the user's to fix from the message; a jax traceback would bury it.
    print(f"error: {e}", file=sys.stderr)
    return 2
  _print_summary(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
