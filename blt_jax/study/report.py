"""The study's outputs: compressor floors, study.json, the markdown table and the plot."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import Dict, List, Optional, Sequence, Tuple

from blt_jax.study import io


def compressors(data: bytes) -> Dict[str, float]:
  """Bits per byte of `data` compressed by gzip -9, bzip2 -9 and xz -9e (compressed bits / raw bytes)."""
  sizes = dict(
      gzip_9=len(gzip.compress(data, compresslevel=9, mtime=0)),
      bzip2_9=len(bz2.compress(data, 9)),
      xz_9e=len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
  )
  return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def _fmt(x, spec: str = ".3g") -> str:
  return "–" if x is None else format(x, spec)


def groups(runs: List[dict]) -> List[List[dict]]:
  """Runs grouped by (budget, variant), in the study's order; each group holds one run per seed."""
  out: Dict[Tuple[float, str], List[dict]] = {}
  for r in runs:
    out.setdefault((r.get("budget_scale", 1.0), r["name"]), []).append(r)
  return list(out.values())


def _mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs)


def spread(xs: Sequence[float]) -> Optional[float]:
  """Max - min across seeds (None with one seed: no spread measured)."""
  return max(xs) - min(xs) if len(xs) > 1 else None


def _budget(r: dict) -> str:
  scale = r.get("budget_scale", 1.0)
  return "1x" if scale == 1 else f"{scale:g}x"


def _per_seed(rs: Sequence[dict], value) -> str:
  return " / ".join(f"s{r.get('seed', 0)} {value(r):.4f}" for r in rs)


def table(study: dict) -> List[str]:
  """One row per variant and budget: each seed's held-out bpb, their mean and spread (max - min)."""
  lines = [
      "| variant | budget | steps | bytes seen | training FLOPs | held-out bpb per seed | mean bpb | "
      "seed spread | mean patch length (held-out) | inference FLOPs/byte | train wall s |",
      "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
  ]
  for rs in groups(study["runs"]):
    r = rs[0]
    lengths = [x["heldout"].get("mean_patch_length") for x in rs]
    length = (
        study["bpe"]["heldout_bytes_per_token"] if r["kind"] == "bpe" else (None if None in lengths else _mean(lengths))
    )
    bpbs = [x["heldout"]["bpb"] for x in rs]
    lines.append(
        f"| {r['label']} (`{r['name']}`) | {_budget(r)} | {r['steps']} | {r['bytes_seen']:,.0f} | "
        f"{_mean([x['train_flops'] for x in rs]):.3g} | {_per_seed(rs, lambda x: x['heldout']['bpb'])} | "
        f"**{_mean(bpbs):.4f}** | {_fmt(spread(bpbs), '.4f')} | {_fmt(length, '.2f')} | "
        f"{_mean([x['inference_flops_per_byte'] for x in rs]):.3g} | "
        f"{_mean([x['wall_s'] for x in rs]):.0f} |"
    )
  return lines


def degradation(rs: Sequence[dict], name: str) -> Optional[dict]:
  """Noise `name` over one group's seeds: mean clean and noised bpb, noised - clean per seed, mean, spread, ratio.

  Clean is the score taken during training; only seeds scored under `name` count. None when none was."""
  scored = [r for r in rs if name in r.get("noise", {})]
  if not scored:
    return None
  clean = [r["heldout"]["bpb"] for r in scored]
  noised = [r["noise"][name]["bpb"] for r in scored]
  deltas = [n - c for n, c in zip(noised, clean)]
  per_clean = [r["noise"][name].get("bits_per_clean_byte") for r in scored]
  return dict(
      seeds=[r.get("seed", 0) for r in scored],
      clean=_mean(clean),
      noised=_mean(noised),
      deltas=deltas,
      delta=_mean(deltas),
      spread=spread(deltas),
      ratio=_mean(noised) / _mean(clean),
      per_clean_byte=None if None in per_clean else _mean(per_clean),
  )


def _noise_names(study: dict) -> List[str]:
  present = {name for r in study["runs"] for name in r.get("noise", {})}
  return [name for name in study.get("noise", {}) if name in present]


def noise_tables(study: dict) -> List[str]:
  """Degradation under noise: a model x noise matrix, then every figure with its seeds."""
  names = _noise_names(study)
  if not names:
    return []
  info = study["noise"]
  out = [
      "## Noised held-out text",
      "",
      "Bits per byte of the noised text (its own bytes as the denominator); the BPE model tokenizes the noised "
      "text with its own tokenizer. Degradation = noised bpb - clean bpb (mean over seeds; ratio = noised / "
      "clean). The last column of the long table divides the same bits by the clean text's bytes instead: noise "
      "that adds easy bytes (spaces, repeats) lowers bits per noised byte without being easier to read.",
      "",
      "| noise | rate | noised bytes | bzip2 -9 bpb |",
      "|---|---:|---:|---:|",
  ]
  out += [
      f"| {info[n]['label']} (`{n}`) | {info[n]['rate']:g} | {info[n]['bytes']:,} | "
      f"{info[n]['compressors']['bzip2_9']:.4f} |"
      for n in names
  ]
  out += [
      "",
      "| model | budget | clean bpb | " + " | ".join(f"`{n}`" for n in names) + " |",
      "|---|---:|---:|" + "---:|" * len(names),
  ]
  for rs in groups(study["runs"]):
    cells = []
    for n in names:
      d = degradation(rs, n)
      cells.append("–" if d is None else f"{d['delta']:+.3f} (x{d['ratio']:.2f})")
    out.append(
        f"| `{rs[0]['name']}` | {_budget(rs[0])} | {_mean([r['heldout']['bpb'] for r in rs]):.4f} | "
        + " | ".join(cells)
        + " |"
    )
  out += [
      "",
      "| model | budget | noise | clean bpb | noised bpb | degradation | ratio | degradation per seed | "
      "seed spread | noised bits / clean bytes |",
      "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
  ]
  for rs in groups(study["runs"]):
    for n in names:
      d = degradation(rs, n)
      if d is not None:
        per_seed = " / ".join(f"s{s} {x:+.4f}" for s, x in zip(d["seeds"], d["deltas"]))
        out.append(
            f"| `{rs[0]['name']}` | {_budget(rs[0])} | `{n}` | {d['clean']:.4f} | {d['noised']:.4f} | "
            f"**{d['delta']:+.4f}** | {d['ratio']:.3f} | {per_seed} | {_fmt(d['spread'], '.4f')} | "
            f"{_fmt(d['per_clean_byte'], '.4f')} |"
        )
  return out + [""]


def markdown(study: dict) -> str:
  s, e = study["settings"], study["entropy_model"]
  flops = [r["train_flops"] for r in study["runs"] if r.get("budget_scale", 1.0) == 1]
  flop_spread = (max(flops) - min(flops)) / _mean(flops) if flops else 0.0
  out = [
      f"# FLOP-matched study{' (smoke)' if s['smoke'] else ''}",
      "",
      f"Training FLOPs per run (plan): {study['plan']['flops_per_run']:.3g} (budget 1x; a 3x run has 3 times "
      f"that); measured spread across the 1x runs {100 * flop_spread:.1f}% (patch lengths measured during "
      f"training vs the plan's estimate, and whole steps). Held-out: {study['data']['heldout']['bytes']:,} bytes "
      f"of {', '.join(study['data']['sources']['heldout'])} (training: "
      f"{', '.join(study['data']['sources']['train'])}). Seeds: sK inits the params with K and orders the "
      f"training documents with data seed + K; the seed spread is max - min over seeds.",
      "",
      *table(study),
      "",
      "BPE: held-out bits per byte = total token NLL in bits / held-out bytes (same documents); its patch length "
      "column is the held-out bytes per token (byte positions per BPE position).",
      "",
      *noise_tables(study),
      "## Compressors on the held-out text (bits per byte)",
      "",
      "| gzip -9 | bzip2 -9 | xz -9e |",
      "|---:|---:|---:|",
      "| " + " | ".join(f"{study['compressors'][k]:.4f}" for k in ("gzip_9", "bzip2_9", "xz_9e")) + " |",
      "",
      "## Entropy model (cost reported separately)",
      "",
      f"{e['steps']} steps, {e['bytes_seen']:,} bytes, {e['train_flops']:.3g} training FLOPs, "
      f"{e['inference_flops_per_byte']:.3g} FLOPs/byte as a patcher, held-out "
      f"{_fmt((e.get('heldout') or {}).get('bpb'), '.4f')} bpb.",
      "",
      "| variant | budget | threshold (nats) | mean patch length, training rows | held-out (mean over seeds) |",
      "|---|---:|---:|---:|---:|",
  ]
  for rs in groups(study["runs"]):
    if rs[0]["kind"] == "blt":
      p = study["patching"][rs[0]["name"]]
      out.append(
          f"| `{rs[0]['name']}` | {_budget(rs[0])} | {_fmt(p['threshold'], '.4f')} | "
          f"{p['train_mean_patch_length']:.2f} | "
          f"{_mean([r['heldout']['mean_patch_length'] for r in rs]):.2f} |"
      )
  out += ["", "![held-out bpb against training FLOPs; degradation under noise](study.png)", ""]
  return "\n".join(out)


def _curves(ax_flops, ax_infer, runs: List[dict], colors: Dict[str, str]) -> None:
  """Every run's curve and final point: a colour per variant, a marker per seed, dashed beyond the 1x budget."""
  labelled = set()
  for r in runs:
    scale = r.get("budget_scale", 1.0)
    label = r["label"] if scale == 1 else f"{r['label']}, {scale:g}x budget"
    label = None if label in labelled else label
    labelled.add(label)
    marker = "osD^v"[r.get("seed", 0) % 5]
    style = "-" if scale == 1 else "--"
    ax_flops.plot(
        [p["flops"] for p in r["curve"]],
        [p["bpb"] for p in r["curve"]],
        marker=marker,
        linestyle=style,
        color=colors[r["name"]],
        label=label,
    )
    ax_infer.scatter(
        [r["inference_flops_per_byte"]],
        [r["heldout"]["bpb"]],
        marker=marker,
        color=colors[r["name"]],
        facecolors="none" if scale != 1 else None,
    )


def _degradation_bars(ax, study: dict, colors: Dict[str, str]) -> None:
  """Mean degradation per noise type, a bar per model; the whiskers span the seeds (min to max)."""
  names = _noise_names(study)
  models = [rs for rs in groups(study["runs"]) if any(degradation(rs, n) for n in names)]
  width = 0.8 / max(len(models), 1)
  for i, rs in enumerate(models):
    ds = [degradation(rs, n) for n in names]
    xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(names))]
    mean = [d["delta"] if d else 0.0 for d in ds]
    err = [
        [(d["delta"] - min(d["deltas"])) if d else 0.0 for d in ds],
        [(max(d["deltas"]) - d["delta"]) if d else 0.0 for d in ds],
    ]
    scale = rs[0].get("budget_scale", 1.0)
    ax.bar(
        xs,
        mean,
        width,
        yerr=err,
        capsize=2,
        color=colors[rs[0]["name"]],
        hatch=None if scale == 1 else "//",
        label=rs[0]["name"] if scale == 1 else f"{rs[0]['name']} {scale:g}x",
    )
  ax.set_xticks(range(len(names)), names)
  ax.axhline(0, color="gray", linewidth=1)
  ax.set(ylabel="noised bpb - clean bpb", title="Degradation under noise (bars: mean; whiskers: seeds)")
  ax.legend(fontsize=7)
  ax.grid(True, axis="y", alpha=0.3)


def plot(study: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  noised = bool(_noise_names(study))
  fig, axes = plt.subplots(1, 3 if noised else 2, figsize=(18 if noised else 12, 4.8))
  left, right = axes[0], axes[1]
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  names = list(dict.fromkeys(r["name"] for r in study["runs"]))
  colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
  _curves(left, right, study["runs"], colors)
  for (name, bpb), style in zip(study["compressors"].items(), (":", "--", "-.")):
    for ax in (left, right):
      ax.axhline(bpb, color="gray", linestyle=style, linewidth=1, label=name.replace("_", " -") if ax is left else None)
  left.set(
      xscale="log",
      xlabel="training FLOPs",
      ylabel="held-out bits per byte",
      title="Held-out bpb vs training FLOPs (equal budget per run)",
  )
  right.set(
      xscale="log",
      xlabel="inference FLOPs per byte",
      ylabel="held-out bits per byte",
      title="Final held-out bpb vs inference cost",
  )
  left.legend(fontsize=7, loc="lower left", ncol=2)  # the lower band holds only the compressor lines
  for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
  if noised:
    _degradation_bars(axes[2], study, colors)
  fig.tight_layout()
  tmp = f"{path}.tmp.{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def write(out: str, study: dict) -> None:
  io.write_json(os.path.join(out, "study.json"), study)
  io.write_text(os.path.join(out, "study.md"), markdown(study))
  plot(study, os.path.join(out, "study.png"))
