"""The study's outputs: compressor floors, study.json, the markdown table and the plot."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import Dict, List

from blt_jax.study import io


def compressors(data: bytes) -> Dict[str, float]:
  """Bits per byte of `data` compressed by gzip -9, bzip2 -9 and xz -9e (compressed bits / raw bytes)."""
  sizes = dict(gzip_9=len(gzip.compress(data, compresslevel=9, mtime=0)), bzip2_9=len(bz2.compress(data, 9)),
               xz_9e=len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)))
  return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def _fmt(x, spec: str = ".3g") -> str:
  return "–" if x is None else format(x, spec)


def table(study: dict) -> List[str]:
  lines = ["| variant | steps | bytes seen | training FLOPs | held-out bpb | mean patch length (held-out) | "
           "inference FLOPs/byte | train wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in study["runs"]:
    length = r["heldout"].get("mean_patch_length")
    if r["kind"] == "bpe":
      length = study["bpe"]["heldout_bytes_per_token"]
    lines.append(f"| {r['label']} (`{r['name']}`) | {r['steps']} | {r['bytes_seen']:,.0f} | {r['train_flops']:.3g} | "
                 f"**{r['heldout']['bpb']:.4f}** | {_fmt(length, '.2f')} | {r['inference_flops_per_byte']:.3g} | "
                 f"{r['wall_s']:.0f} |")
  return lines


def markdown(study: dict) -> str:
  s, e = study["settings"], study["entropy_model"]
  flops = [r["train_flops"] for r in study["runs"]]
  spread = (max(flops) - min(flops)) / (sum(flops) / len(flops))
  out = [f"# FLOP-matched study{' (smoke)' if s['smoke'] else ''}", "",
         f"Training FLOPs per run (plan): {study['plan']['flops_per_run']:.3g}; measured spread across runs "
         f"{100 * spread:.1f}% (patch lengths measured during training vs the plan's estimate, and whole steps). "
         f"Held-out: {study['data']['heldout']['bytes']:,} bytes of {', '.join(study['data']['sources']['heldout'])}"
         f" (training: {', '.join(study['data']['sources']['train'])}).", "",
         *table(study), "",
         "BPE: held-out bits per byte = total token NLL in bits / held-out bytes (same documents); its patch length "
         "column is the held-out bytes per token (byte positions per BPE position).", "",
         "## Compressors on the held-out text (bits per byte)", "", "| gzip -9 | bzip2 -9 | xz -9e |", "|---:|---:|---:|",
         "| " + " | ".join(f"{study['compressors'][k]:.4f}" for k in ("gzip_9", "bzip2_9", "xz_9e")) + " |", "",
         "## Entropy model (cost reported separately)", "",
         f"{e['steps']} steps, {e['bytes_seen']:,} bytes, {e['train_flops']:.3g} training FLOPs, "
         f"{e['inference_flops_per_byte']:.3g} FLOPs/byte as a patcher, held-out "
         f"{_fmt((e.get('heldout') or {}).get('bpb'), '.4f')} bpb.", "",
         "| variant | threshold (nats) | mean patch length, training rows | held-out |", "|---|---:|---:|---:|"]
  for r in study["runs"]:
    if r["kind"] == "blt":
      p = study["patching"][r["name"]]
      out.append(f"| `{r['name']}` | {_fmt(p['threshold'], '.4f')} | {p['train_mean_patch_length']:.2f} | "
                 f"{r['heldout']['mean_patch_length']:.2f} |")
  out += ["", "![held-out bpb against training FLOPs](study.png)", ""]
  return "\n".join(out)


def plot(study: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
  for r in study["runs"]:
    xs = [p["flops"] for p in r["curve"]]
    ys = [p["bpb"] for p in r["curve"]]
    left.plot(xs, ys, marker="o", label=r["label"])
    right.scatter([r["inference_flops_per_byte"]], [r["heldout"]["bpb"]], label=r["label"])
  for (name, bpb), style in zip(study["compressors"].items(), (":", "--", "-.")):
    for ax in (left, right):
      ax.axhline(bpb, color="gray", linestyle=style, linewidth=1, label=name.replace("_", " -") if ax is left else None)
  left.set(xscale="log", xlabel="training FLOPs", ylabel="held-out bits per byte",
           title="Held-out bpb vs training FLOPs (equal budget per run)")
  right.set(xscale="log", xlabel="inference FLOPs per byte", ylabel="held-out bits per byte",
            title="Final held-out bpb vs inference cost")
  left.legend(fontsize=7, loc="lower left", ncol=2)  # the lower band holds only the compressor lines
  for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  tmp = f"{path}.tmp.{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def write(out: str, study: dict) -> None:
  io.write_json(os.path.join(out, "study.json"), study)
  io.write_text(os.path.join(out, "study.md"), markdown(study))
  plot(study, os.path.join(out, "study.png"))
