"""The paper's entropy figure for any text: per-byte next-byte entropy, the threshold, and the patch boundaries.

  python scripts/plot_patches.py --checkpoint checkpoints/blt_1b --text "Daenerys Targaryen is in Game of Thrones" \
      --out patches.png

Entropies come from the checkpoint's own entropy model and patches from its own patcher (as in training, scoring
and generation): entropy H(x_t), the entropy model's uncertainty about byte x_t given the bytes before it, is drawn
at byte x_t; byte x_t starts a patch when H(x_t) exceeds the threshold (for the plain global-threshold rule; the plot
names the rule in use). Needs matplotlib (`pip install matplotlib`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def patch_data(model, text: bytes):
  """(bytes, entropies per byte or None, patch start flags per byte) of `[BOS] + text`, BOS dropped."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from blt_jax import patching, tokenizer  # pylint: disable=g-import-not-at-top
  from blt_jax.entropy_model import compute_entropies  # pylint: disable=g-import-not-at-top

  tokens = jnp.asarray(tokenizer.encode(text, add_eos=False))[None]
  entropies = None
  if model.entropy_config is not None:
    entropies = compute_entropies(model.entropy_params, tokens, model.entropy_config)
  patches = patching.patch(tokens, entropies, max_patches=tokens.shape[1] + 1, **model.patching.patch_kwargs())
  ids = np.asarray(patches.patch_ids_BT[0, : tokens.shape[1]])
  starts = np.concatenate([[True], ids[1:] != ids[:-1]])
  # Position t's entropy is that of predicting byte t+1: draw it at the byte it predicts.
  ent = None if entropies is None else np.asarray(entropies[0, :-1])
  return text, ent, starts[1:]


def plot(text: bytes, entropies, starts, threshold, rule: str, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(text)
  fig, ax = plt.subplots(figsize=(max(8, n * 0.22), 3.6))
  x = range(n)
  if entropies is not None:
    ax.plot(x, entropies, marker="o", markersize=3, lw=1, color="tab:blue", label="entropy H(x_t) (nats)")
    if threshold is not None:
      ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:.3f}")
  for t in range(n):
    if starts[t]:
      ax.axvline(t - 0.5, color="gray", lw=0.8, alpha=0.6)
  ax.set_xticks(list(x))
  ax.set_xticklabels([chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in text], fontsize=7)
  ax.set_xlim(-0.5, n - 0.5)
  ax.set_ylabel("nats")
  ax.set_title(f"patches ({sum(bool(s) for s in starts)} boundaries, {rule}): grey lines start a patch", fontsize=9)
  ax.legend(loc="upper right", fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="converted checkpoint or training workdir/export")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--text")
  src.add_argument("--text-file")
  parser.add_argument("--out", default="patches.png")
  args = parser.parse_args(argv)
  from blt_jax import loading  # pylint: disable=g-import-not-at-top

  try:
    model = loading.load(args.checkpoint)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.text_file:
    with open(args.text_file, "rb") as f:
      text = f.read()
  else:
    text = args.text.encode("utf-8")
  if not text:
    print("error: empty text", file=sys.stderr)
    return 2
  p = model.patching
  rule = (
      p.mode
      if p.mode != "entropy"
      else (
          "monotonicity"
          if p.monotonicity
          else "threshold + threshold_add"
          if p.threshold_add is not None
          else "global threshold"
      )
  )
  if p.max_patch_length:
    rule += f", max_patch_length {p.max_patch_length}"
  data, ent, starts = patch_data(model, text)
  plot(data, ent, starts, p.threshold if p.mode == "entropy" else None, rule, args.out)
  print(f"wrote {args.out}: {len(data)} bytes in {int(starts.sum())} patches (after the [BOS] patch)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
