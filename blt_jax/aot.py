"""Ahead-of-time compiles of the trainer's step for a TPU slice, on a machine without TPUs.

With `libtpu` installed, `jax.experimental.topologies` describes a slice's chips (`v5p:4x4x8`: 128 v5p chips), and
the trainer's own jitted step (`train.build_train_step`) lowers and compiles for them from shapes alone: no array is
ever allocated. XLA's TPU compiler then says how much HBM a chip needs (or that it does not fit), how many FLOPs a
chip runs per step and which collectives the partitioned program holds. `scripts/aot_compile.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections

from blt_jax import flops as flops_lib
from blt_jax import hlo_stats, layer_stacking, sharding, train, train_config
from blt_jax.config import EntropyModelConfig
from blt_jax.data import patch_rows
from blt_jax.entropy_model import init_entropy_model

GiB = 1024**3
# HBM per chip (as jax sees one device), by `device_kind`. Cloud TPU's published figures.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,
    "TPU v6e": 32 * GiB,
}


class AotError(ValueError):
  """The compile cannot be set up (no libtpu, an unknown topology, a config without its entropy model)."""


def topology_devices(name: str) -> list:
  """The chips of a TPU slice such as `v5e:2x2`, `v5p:4x4x8`, `v6e:16x16` (devices to build a mesh on, not to run)."""
  # libtpu takes a machine-wide lock for the chips it drives; describing a topology drives none, so let a compile
  # share the machine with a process that holds it (a training run on the same TPU VM, another compile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if importlib.util.find_spec("libtpu") is None:
    raise AotError(
        f"--topology {name!r}: ahead-of-time TPU compiles need libtpu, the TPU compiler: "
        f'pip install "jax[tpu]=={jax.__version__}"'
    )
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError / XlaRuntimeError by jax version)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise AotError(
        f"--topology {name!r} is not a TPU slice libtpu can describe ({message}); write "
        f"<generation>:<chips per dimension>, e.g. v5e:2x2, v5p:4x4x8, v6e:16x16"
    ) from None
  return list(topology.devices)


def hbm_bytes(device) -> int:
  """The chip's HBM, or 0 for a kind not in `HBM_BYTES`."""
  return HBM_BYTES.get(getattr(device, "device_kind", ""), 0)


def entropy_model_config(
    cfg: ml_collections.ConfigDict, entropy_config: Optional[str] = None
) -> Optional[EntropyModelConfig]:
  """The in-graph entropy model's config: from a config file (`entropy_config`), else from the checkpoint's
  config.json; None when the step runs none."""
  if not train.uses_entropy_model(cfg):
    return None
  if entropy_config:
    ecfg = train_config.load_config_file(entropy_config)
    if ecfg.model_type != "entropy_model":
      raise AotError(f"--entropy_config {entropy_config}: model_type={ecfg.model_type!r}, not 'entropy_model'")
    return train_config.patching_entropy_model_config(cfg, ecfg.entropy_model.to_dict())
  try:
    return train.load_entropy_model_config(cfg.entropy_checkpoint, run=cfg)
  except FileNotFoundError as e:
    raise AotError(
        f"{e}. The step runs the entropy model in-graph: name its shape with --entropy_config "
        f"(e.g. configs/entropy_100m.py, the released one's), or compile with precomputed entropies "
        f"(--config.data.entropy_store=<any name>)"
    ) from None


def _with_sharding(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_inputs(
    cfg: ml_collections.ConfigDict, parts: train.TrainStepParts, entropy_cfg: Optional[EntropyModelConfig]
):
  """(state, batches_ABN, entropy params) of `parts.train_step` as sharded ShapeDtypeStructs (the batch contract of
  `data.pipeline`, stacked over `grad_accum_steps` as the trainer stacks it)."""
  state = sharding.abstract_with_shardings(parts.abstract_state, parts.state_shardings)
  shape = (cfg.grad_accum_steps, cfg.global_batch_size, cfg.seq_len)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parts.batch_sharding)
  batch = dict(tokens=spec(jnp.int32), targets=spec(jnp.int32), loss_mask=spec(jnp.float32))
  if cfg.model_type == "blt" and parts.sc.patching.mode == "entropy" and cfg.data.entropy_store:
    batch["entropies"] = spec(jnp.float32)
  if cfg.model_type == "blt" and cfg.patching.get("rows", "bytes") == "patches":
    batch[patch_rows.STARTS] = spec(jnp.float32)  # the loader's patches: the step runs no patcher
  entropy_params = None
  if entropy_cfg is not None:
    rep = sharding.replicated(parts.batch_sharding.mesh)
    # In the trainer's layout (`Trainer` stacks a scan_layers entropy model's params once, at load).
    boxed = jax.eval_shape(
        lambda: layer_stacking.to_run_layout(init_entropy_model(jax.random.PRNGKey(0), entropy_cfg), entropy_cfg)
    )
    unboxed = train._unbox(boxed)  # pylint: disable=protected-access
    entropy_params = _with_sharding(unboxed, jax.tree_util.tree_map(lambda _: rep, unboxed))
  return state, batch, entropy_params


@dataclasses.dataclass
class Report:
  """What one ahead-of-time compile found; memory and FLOPs are per chip, per optimizer step."""

  topology: str
  device_kind: str
  chips: int
  mesh: Dict[str, int]
  global_batch_size: int
  grad_accum_steps: int
  seq_len: int
  compute_dtype: str
  remat: bool
  scan_layers: bool
  in_graph_entropy_model: bool
  attention_impl: str = "auto"  # config.attention_impl ("auto": the Pallas splash kernel on a TPU target)
  remat_policy: str = ""  # config.remat_policy, when the config has one
  lower_s: float = 0.0
  compile_s: float = 0.0
  fits: bool = True
  hbm_bytes: int = 0
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  xla_flops: float = 0.0  # XLA's cost analysis for one chip: every loop body counted once
  # The TPU compiler's own estimate of the step's time (cost analysis `optimal_seconds`, one chip); negative when an
  # op has no cost model (libtpu's scalar scatter-adds, which patching no longer uses).
  # XLA prices a loop's body once, as its FLOPs: with a scanned stack this is not the step's time (`estimate_step`).
  optimal_seconds: float = 0.0
  loops: int = 0  # while loops in the compiled program (a scanned stack, grad accumulation, blocked attention)
  peak_flops: float = 0.0  # the chip's vendor bf16 peak (flops.PEAK_FLOPS), 0 when unknown
  # `estimate_step`: the step's time from unrolled compiles of 1 and 2 global layers (0: not estimated)
  estimated_seconds: float = 0.0
  estimate_note: str = ""
  matmul_flops: float = 0.0  # the program's matmuls with loops times their trip counts (hlo_stats), one chip
  uncounted_loops: int = 0  # loops whose trip count could not be read (their matmuls counted once)
  pallas_kernels: int = 0  # Pallas kernel calls (splash attention): their FLOPs are not in matmul_flops
  # matmul_flops by "stage/pass/kind" (`flops_part`): which stage, forward/backward/recompute, attention/dense
  matmul_parts: Dict[str, float] = dataclasses.field(default_factory=dict)
  model_flops: Dict[str, float] = dataclasses.field(default_factory=dict)  # flops.py terms, per chip
  collectives: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
  error: str = ""  # the compiler's out-of-memory message when it does not fit

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program: live arguments, outputs not aliased to a donated argument, temporaries, code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  def lines(self) -> list:
    gib = lambda b: f"{b / GiB:.2f} GiB"
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    out = [
        f"topology {self.topology}: {self.chips} x {self.device_kind}; mesh {mesh}",
        f"step: batch {self.global_batch_size} x {self.seq_len} bytes x {self.grad_accum_steps} micro-step(s), "
        f"{self.compute_dtype}, remat={self.remat}"
        + (f" ({self.remat_policy})" if self.remat and self.remat_policy else "")
        + f", scan_layers={self.scan_layers}, attention={self.attention_impl}, in-graph entropy model="
        f"{self.in_graph_entropy_model}",
        f"lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s",
    ]
    if not self.fits:
      out.append(f"DOES NOT FIT in {gib(self.hbm_bytes) if self.hbm_bytes else 'HBM'} per chip: {self.error}")
      return out
    hbm = f" of {gib(self.hbm_bytes)} HBM ({self.total_bytes / self.hbm_bytes:.0%})" if self.hbm_bytes else ""
    out.append(
        f"memory per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
        f"outputs not aliased {gib(self.output_bytes - self.alias_bytes)}, code {gib(self.code_bytes)}; "
        f"total {gib(self.total_bytes)}{hbm}"
    )
    model = self.model_flops.get("model", 0.0)
    ratio = f" = {self.matmul_flops / model:.2f} x flops.py's {model:.3g}" if model else ""
    loops = f", {self.uncounted_loops} loop(s) of unknown length counted once" if self.uncounted_loops else ""
    kernels = f"; {self.pallas_kernels} Pallas kernel call(s) not counted" if self.pallas_kernels else ""
    out.append(
        f"FLOPs per chip per step: matmuls in the compiled program {self.matmul_flops:.3g}{ratio} (loops "
        f"times their trip counts, conditionals at their costliest branch{loops}{kernels}); XLA's cost "
        f"analysis {self.xla_flops:.3g} (loop bodies once)"
    )
    out.append(self._estimate_line(model))
    for name, value in self.model_flops.items():
      if name != "model":
        out.append(f"  flops.py {name}: {value:.3g}" + (f" ({value / model:.2f} x model)" if model else ""))
    out.extend(self._breakdown_lines())
    out.append(
        "collectives (static instructions, result bytes): "
        + ", ".join(f"{k} {v['ops']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in self.collectives.items() if v["ops"])
    )
    return out

  @property
  def estimated_mfu(self) -> float:
    """flops.py's model FLOPs per chip over the estimated step time (`estimate_step`), against the chip's peak; also
    from `optimal_seconds` itself when the program has no loop. 0: no estimate."""
    model = self.model_flops.get("model", 0.0)
    seconds = self.estimated_seconds or (self.optimal_seconds if self.loops == 0 else 0.0)
    if seconds <= 0 or not self.peak_flops or not model:
      return 0.0
    return model / seconds / self.peak_flops

  def _estimate_line(self, model: float) -> str:
    raw = f"optimal_seconds {self.optimal_seconds:.3g}"
    if self.optimal_seconds <= 0:
      raw += " (negative: an op without a cost model on this chip)"
    elif self.loops:
      raw += f" (each of {self.loops} loop bodies priced once, as XLA's FLOPs)"
    line = f"TPU compiler's time estimate: {raw}"
    seconds = self.estimated_seconds or (self.optimal_seconds if self.loops == 0 else 0.0)
    if seconds > 0:
      mfu = f", {self.estimated_mfu:.1%} of the chip's {self.peak_flops / 1e12:g} TFLOP/s" if self.peak_flops else ""
      line += (
          f"; step {seconds:.3g} s{self.estimate_note}: flops.py's model FLOPs at {model / seconds / 1e12:.1f} "
          f"TFLOP/s per chip{mfu} (estimated MFU)"
      )
    elif self.loops and self.optimal_seconds > 0:
      line += "; --estimate_time prices the whole stack"
    return line

  def _breakdown_lines(self) -> list:
    """Per stage: compiled matmul FLOPs by pass, and the attention (scores and values) share."""
    if not self.matmul_parts:
      return []
    stages: Dict[str, Dict[str, float]] = {}
    for part, flops in self.matmul_parts.items():
      stage, pass_, kind = part.split("/")
      row = stages.setdefault(stage, dict(forward=0.0, backward=0.0, recompute=0.0, attention=0.0))
      row[pass_] += flops
      row["attention"] += flops if kind == "attention" else 0.0
    out = ["  compiled matmuls by stage (forward / backward / recompute; attention share):"]
    for stage, row in sorted(stages.items(), key=lambda kv: -sum(kv[1].values())):
      total = row["forward"] + row["backward"] + row["recompute"]
      out.append(
          f"    {stage}: {total:.3g} = {row['forward']:.3g} / {row['backward']:.3g} / {row['recompute']:.3g}; "
          f"attention {row['attention'] / total:.0%}"
      )
    return out


STAGES = ("local_encoder", "global_transformer", "local_decoder")


def flops_part(op_name: str) -> str:
  """ "stage/pass/kind" of a matmul from its jax name stack: stage one of `STAGES`, `entropy_model` (the in-graph
  patcher, or the model an entropy-model run trains) or `other`; pass forward, backward or recompute (remat);
  kind attention (an einsum of activations: scores, values, cross-attention) or dense (weights)."""
  stage = next((s for s in STAGES if f"/{s}/" in op_name), None)
  if stage is None:
    stage = "entropy_model" if "EntropyModel" in op_name or "entropy" in op_name else "other"
  pass_ = "recompute" if "rematted_computation" in op_name else "backward" if "transpose(" in op_name else "forward"
  parts = op_name.split("/")
  # An einsum of activations (scores, values); the backward of a weight's matmul is an einsum under its name.
  einsum = len(parts) >= 2 and "->" in parts[-2]
  kind = "attention" if einsum and not any(_WEIGHT.fullmatch(p) for p in parts) else "dense"
  return f"{stage}/{pass_}/{kind}"


_WEIGHT = re.compile(r"w[qkvo]|w\d")  # the attention and feed-forward kernels' module names


def model_flops_per_chip(
    cfg: ml_collections.ConfigDict, parts: train.TrainStepParts, chips: int, mean_patch_length: float
) -> Dict[str, float]:
  """flops.py's count for one step, per chip: `model` (the paper's accounting at `mean_patch_length`), and for a
  BLT `every_patch_slot` (the global stack over all `max_patches` slots, as the step runs it) and
  `entropy_forward` (the in-graph entropy model's forward, which flops.py does not count)."""
  sc = parts.sc
  step_bytes = cfg.global_batch_size * cfg.grad_accum_steps * cfg.seq_len
  if not sc.is_blt:
    return dict(model=flops_lib.entropy_model_train_flops_per_byte(sc.model, cfg.seq_len) * step_bytes / chips)
  out = dict(model=flops_lib.blt_train_flops_per_byte(sc.model, cfg.seq_len, mean_patch_length) * step_bytes / chips)
  slots_patch_length = cfg.seq_len / sc.max_patches
  out["every_patch_slot"] = (
      flops_lib.blt_train_flops_per_byte(sc.model, cfg.seq_len, slots_patch_length) * step_bytes / chips
  )
  if sc.entropy_model is not None:
    out["entropy_forward"] = (
        flops_lib.entropy_model_train_flops_per_byte(sc.entropy_model, cfg.seq_len) / 3 * step_bytes / chips
    )
  return out


def _xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
    cost = cost[0] if cost else {}
  return dict(cost or {})


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceed(s|ed)? .*(hbm|memory)", re.S)


def compile_step(
    cfg: ml_collections.ConfigDict,
    topology: str,
    entropy_config: Optional[str] = None,
    mean_patch_length: float = 4.5,
    progress=None,
    hlo_path: Optional[str] = None,
) -> Report:
  """Compiles the trainer's train step of `cfg` for every chip of `topology`; the report says whether it fits.

  `progress`: called with a line before the (long) compile starts; `hlo_path`: where to write the compiled
  program's HLO text.
  """
  train_config.validate(cfg)
  entropy_cfg = entropy_model_config(cfg, entropy_config)
  devices = topology_devices(topology)
  try:
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
  except (NotImplementedError, ValueError, AssertionError) as e:  # jax's mesh_utils cannot lay the axes on the torus
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise AotError(
        f"mesh data={cfg.mesh.data}, fsdp={cfg.mesh.fsdp}, tensor={cfg.mesh.tensor} cannot be laid out "
        f"on {topology}'s {len(devices)} chips ({first[:400]}); pick mesh sizes that are products of the "
        f"slice's dimensions"
    ) from None
  parts = train.build_train_step(cfg, mesh, entropy_cfg)
  state, batch, entropy_params = abstract_inputs(cfg, parts, entropy_cfg)
  kind = devices[0].device_kind
  report = Report(
      topology=topology,
      device_kind=kind,
      chips=len(devices),
      mesh=dict(mesh.shape),
      global_batch_size=cfg.global_batch_size,
      grad_accum_steps=cfg.grad_accum_steps,
      seq_len=cfg.seq_len,
      compute_dtype=cfg.compute_dtype,
      remat=bool(cfg.remat),
      scan_layers=bool(cfg.get("scan_layers", False)),
      in_graph_entropy_model=entropy_cfg is not None,
      attention_impl=str(cfg.get("attention_impl", "auto")),
      remat_policy=str(cfg.get("remat_policy", "")),
      hbm_bytes=hbm_bytes(devices[0]),
      model_flops=model_flops_per_chip(cfg, parts, len(devices), mean_patch_length),
  )
  start = time.perf_counter()
  lowered = parts.train_step.lower(state, batch, entropy_params)
  report.lower_s = time.perf_counter() - start
  if progress is not None:
    progress(f"lowered in {report.lower_s:.1f} s; compiling for {report.chips} x {kind} ...")
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError / JaxRuntimeError by jax version)
    report.compile_s = time.perf_counter() - start
    if not _OOM.search(str(e)):
      raise
    report.fits, report.error = False, _oom_summary(str(e))
    return report
  report.compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  report.argument_bytes = int(memory.argument_size_in_bytes)
  report.output_bytes = int(memory.output_size_in_bytes)
  report.alias_bytes = int(memory.alias_size_in_bytes)
  report.temp_bytes = int(memory.temp_size_in_bytes)
  report.code_bytes = int(memory.generated_code_size_in_bytes)
  report.fits = not report.hbm_bytes or report.total_bytes <= report.hbm_bytes
  if not report.fits:
    report.error = f"needs {report.total_bytes / GiB:.2f} GiB"
  cost = _xla_cost(compiled)
  report.xla_flops = float(cost.get("flops", 0.0))
  report.optimal_seconds = float(cost.get("optimal_seconds", 0.0))
  report.peak_flops = flops_lib.device_peak_flops(devices[0])
  report.loops = hlo_stats.while_loops(compiled.as_text())
  hlo = compiled.as_text()
  report.matmul_parts, report.uncounted_loops = hlo_stats.matmul_flops_by(hlo, flops_part)
  report.matmul_flops = sum(report.matmul_parts.values())
  report.collectives = hlo_stats.count_collectives(hlo)
  report.pallas_kernels = hlo_stats.pallas_kernels(hlo)
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo)
  return report


def _oom_summary(message: str) -> str:
  """The compiler's out-of-memory message without its allocation listing."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  keep = [line for line in lines if re.search(r"[Rr]an out of memory|[Uu]sed .* of .*|[Ee]xceeded", line)]
  return " ".join(keep[:3] or lines[:1])[:600]


def estimate_step(
    cfg: ml_collections.ConfigDict, topology: str, report: Report, entropy_config: Optional[str] = None, progress=None
) -> Report:
  """Fills `report.estimated_seconds`: the TPU compiler's time for the step of `cfg` with its whole global stack.

  XLA prices a loop's body once, so a scanned stack's `optimal_seconds` is about one layer's. The step is compiled
  twice more, unrolled (`scan_layers=False`) with 1 and 2 global layers, which is quick; their difference is one
  layer's time, and the step's is the 1-layer time plus `n_layers_global - 1` of those. Left at 0, with
  `estimate_note` saying why, when either compile has a loop or no valid estimate.
  """
  import copy  # pylint: disable=g-import-not-at-top

  seconds = []
  for layers in (1, 2):
    small = copy.deepcopy(cfg)
    small.scan_layers = False
    small.model.n_layers_global = layers
    if progress is not None:
      progress(f"estimating the step's time: compiling {layers} unrolled global layer(s) ...")
    r = compile_step(small, topology, entropy_config)
    if not r.fits or r.optimal_seconds <= 0 or r.loops:
      why = "does not fit" if not r.fits else f"loops {r.loops}, optimal_seconds {r.optimal_seconds:.3g}"
      report.estimate_note = f" (no estimate: the {layers}-layer compile {why})"
      return report
    seconds.append(r.optimal_seconds)
  per_layer = seconds[1] - seconds[0]
  layers = int(cfg.model.n_layers_global)
  report.estimated_seconds = seconds[0] + (layers - 1) * per_layer
  report.estimate_note = f" (1 layer {seconds[0]:.3g} s + {layers - 1} x {per_layer:.3g} s, unrolled compiles)"
  return report


def report_dict(report: Report) -> dict:
  """The report as json-able data (`total_bytes` included)."""
  return dict(dataclasses.asdict(report), total_bytes=report.total_bytes, estimated_mfu=report.estimated_mfu)


def main(argv=None) -> int:
  """`scripts/aot_compile.py --config configs/<name>.py --topology v5p:4x4x8 [--config.a.b=v]`; 1 if it does not fit."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = sys.argv if argv is None else argv
  config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice to compile for: <generation>:<chips per dim>, e.g. v5p:4x4x8.")
  flags.DEFINE_string(
      "entropy_config",
      None,
      "Config file of the in-graph entropy model (e.g. "
      "configs/entropy_100m.py) when the config's entropy_checkpoint is not on this machine.",
  )
  flags.DEFINE_float("mean_patch_length", 4.5, "Bytes per patch for flops.py's model FLOPs (paper accounting).")
  flags.DEFINE_string("json", None, "Also write the report as json to this file.")
  flags.DEFINE_bool(
      "estimate_time",
      False,
      "Also compile the step unrolled with 1 and 2 global layers for the TPU compiler's step time (estimate_step).",
  )
  flags.DEFINE_string("hlo", None, "Also write the compiled program's HLO text to this file.")
  flags.DEFINE_enum(
      "step",
      "train",
      ["train", "score", "generate"],
      "The program to compile: the train step, the "
      "scorer's programs or the generator's (prefill and a chunk of cached steps; blt_jax.aot_inference).",
  )
  flags.DEFINE_string("dtype", "float32", "--step score/generate: the params' dtype (float32 or bfloat16).")
  flags.DEFINE_string(
      "mesh",
      None,
      "--step score/generate: the inference mesh, e.g. fsdp=8 (default: params " "replicated on every chip).",
  )
  flags.DEFINE_integer("row_bytes", None, "--step score: bytes per row (default: the scorer's).")
  flags.DEFINE_integer("batch_bytes", 16384, "--step score: bytes per batch.")
  flags.DEFINE_integer("gen_batch", 8, "--step generate: prompts per batch.")
  flags.DEFINE_integer("prompt_bytes", 1024, "--step generate: prompt bytes.")
  flags.DEFINE_integer("max_bytes", 256, "--step generate: bytes generated per prompt.")
  train.parse_flags(argv)
  cfg, topology = flags.FLAGS.config, flags.FLAGS.topology
  if cfg is None or topology is None:
    raise SystemExit(
        "usage: scripts/aot_compile.py --config configs/<name>.py --topology v5p:4x4x8 "
        "[--entropy_config configs/entropy_100m.py] [--config.a.b=value]"
    )
  f = flags.FLAGS
  try:
    if f.step == "train":
      report = compile_step(
          cfg,
          topology,
          f.entropy_config,
          f.mean_patch_length,
          progress=lambda line: print(line, flush=True),
          hlo_path=f.hlo,
      )
      if f.estimate_time and report.fits:
        estimate_step(cfg, topology, report, f.entropy_config, progress=lambda line: print(line, flush=True))
      data = report_dict(report)
    else:
      from blt_jax import aot_inference  # pylint: disable=g-import-not-at-top

      report = aot_inference.compile_inference(
          cfg,
          topology,
          f.step,
          f.entropy_config,
          f.dtype,
          f.mesh,
          row_bytes=f.row_bytes,
          batch_bytes=f.batch_bytes,
          batch=f.gen_batch,
          prompt_bytes=f.prompt_bytes,
          max_bytes=f.max_bytes,
      )
      data = dict(dataclasses.asdict(report), peak_bytes=report.peak_bytes, fits=report.fits)
  except (ValueError, FileNotFoundError) as e:  # AotError and PlacementError are ValueErrors
    raise SystemExit(f"error: {e}") from None
  print("\n".join(report.lines()), flush=True)
  if f.json:
    with open(f.json, "w") as out:
      json.dump(data, out, indent=1)
  return 0 if report.fits else 1
