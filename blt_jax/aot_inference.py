"""Ahead-of-time compiles of the inference programs (the scorer's, the generator's) for a TPU slice, before renting it.

The programs are the ones `blt_jax.score.Scorer` and `blt_jax.generate` run, lowered from shapes alone: the model's
params are `ShapeDtypeStruct`s placed as `loading.load(dtype=..., mesh=...)` would restore them
(`blt_jax.placement`), so the compiler's memory figure per chip is the one a real run on that slice needs.

  python scripts/aot_compile.py --step score --config configs/blt_7b.py --topology v5e:2x4 \\
      --entropy_config configs/entropy_100m.py --dtype bfloat16 --mesh fsdp=8

`--step score`: the patcher (entropy model + patch boundaries) and the BLT's NLL program for one batch of full rows
at the most patch slots a row can need. `--step generate`: the prefill of a batch of prompts and one chunk of cached
decoding steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from blt_jax import aot, generate, loading, placement, score, sharding, train_config

GiB = aot.GiB


@dataclasses.dataclass
class ProgramMemory:
  name: str
  shape: str
  compile_s: float = 0.0
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  error: str = ""  # the compiler's out-of-memory message

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


@dataclasses.dataclass
class InferenceReport:
  step: str
  topology: str
  device_kind: str
  chips: int
  mesh: Dict[str, int]
  dtype: str
  param_bytes_per_chip: int
  hbm_bytes: int
  programs: List[ProgramMemory] = dataclasses.field(default_factory=list)

  @property
  def peak_bytes(self) -> int:
    return max((p.total_bytes for p in self.programs), default=0)

  @property
  def fits(self) -> bool:
    if any(p.error for p in self.programs):
      return False
    return not self.hbm_bytes or self.peak_bytes <= self.hbm_bytes

  def lines(self) -> List[str]:
    gib = lambda b: f"{b / GiB:.2f} GiB"
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
    out = [
        f"topology {self.topology}: {self.chips} x {self.device_kind}; mesh {mesh}; params in {self.dtype}, "
        f"{gib(self.param_bytes_per_chip)} per chip"
    ]
    for p in self.programs:
      if p.error:
        out.append(f"{self.step} {p.name} {p.shape}: DOES NOT FIT ({p.error}); compiled in {p.compile_s:.1f} s")
        continue
      share = f" of {gib(self.hbm_bytes)} HBM ({p.total_bytes / self.hbm_bytes:.0%})" if self.hbm_bytes else ""
      out.append(
          f"{self.step} {p.name} {p.shape}: arguments {gib(p.argument_bytes)}, temporaries "
          f"{gib(p.temp_bytes)}, outputs {gib(p.output_bytes - p.alias_bytes)}; total {gib(p.total_bytes)}"
          f"{share}; compiled in {p.compile_s:.1f} s"
      )
    out.append("fits" if self.fits else "DOES NOT FIT")
    return out


def _abstract_model(
    cfg: ml_collections.ConfigDict, entropy_config: Optional[str], dtype: str, mesh
) -> loading.LoadedModel:
  """A LoadedModel whose params are ShapeDtypeStructs placed as `loading.load(dtype, mesh)` restores them."""
  config = loading.inference_config(
      dataclasses.replace(train_config.model_config(cfg), remat=False, scan_layers=False), dtype
  )
  ent = aot.entropy_model_config(cfg, entropy_config) if cfg.patching.mode == "entropy" else None
  params = placement.targets(loading.abstract_params(config), dtype, mesh)
  ent_params = None
  if ent is not None:
    ent = loading.inference_config(dataclasses.replace(ent, remat=False, scan_layers=False), dtype)
    ent_params = placement.targets(loading.abstract_params(ent), dtype, mesh)
  return loading.LoadedModel(config, params, train_config.patching_config(cfg), ent, ent_params, "aot", mesh)


def _compile(name: str, shape: str, lowered) -> ProgramMemory:
  return _compile_keep(name, shape, lowered)[0]


def _compile_keep(name: str, shape: str, lowered):
  """(ProgramMemory, the compiled program or None when it does not fit)."""
  mem = ProgramMemory(name, shape)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError / JaxRuntimeError by jax version)
    mem.compile_s = time.perf_counter() - start
    if not aot._OOM.search(str(e)):  # pylint: disable=protected-access
      raise
    mem.error = aot._oom_summary(str(e))  # pylint: disable=protected-access
    return mem, None
  mem.compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  mem.argument_bytes, mem.output_bytes = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  mem.alias_bytes, mem.temp_bytes = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
  mem.code_bytes = int(m.generated_code_size_in_bytes)
  return mem, compiled


def _score_programs(model: loading.LoadedModel, row_bytes: Optional[int], batch_bytes: int) -> List[ProgramMemory]:
  scorer = score.Scorer(model, row_bytes=row_bytes, batch_bytes=batch_bytes)
  N = scorer.row_len
  R = scorer.rows_per_batch(N)
  P = score._slot_bucket(min(N + 1, model.config.max_seqlen), N + 1)  # pylint: disable=protected-access
  rows = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=scorer._rows_sharding)  # pylint: disable=protected-access
  out = [
      _compile(
          "patcher",
          f"[{R} rows x {N} bytes]",
          scorer._patch_fn(N).lower(model.entropy_params, rows((R, N)), rows((R,))),
      )
  ]  # pylint: disable=protected-access
  out.append(
      _compile(
          "blt",
          f"[{R} rows x {N} bytes, {P} patch slots]",
          scorer._nll_fn(N, P).lower(model.params, rows((R, N)), rows((R, P))),
      )
  )  # pylint: disable=protected-access
  return out


def _generate_programs(
    model: loading.LoadedModel, batch: int, prompt_bytes: int, max_bytes: int, chunk: int
) -> List[ProgramMemory]:
  cfg = model.config
  L = prompt_bytes + 1
  capacity = min(L + max_bytes, cfg.max_encoder_seq_length)
  patch_bytes = min(model.patching.max_patch_length or 512, capacity)
  shapes = generate.Shapes(batch, L, capacity, min(cfg.max_seqlen, capacity + 1), patch_bytes)
  rows_sharding = NamedSharding(model.mesh, PartitionSpec(sharding.BATCH_AXES))
  rows = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding)
  prefill = generate._prefill_jit.lower(model, shapes, rows((batch, L)), rows((batch,)))  # pylint: disable=protected-access
  mem, compiled = _compile_keep(
      "prefill", f"[{batch} prompts x {prompt_bytes} bytes, caches of {capacity} bytes]", prefill
  )
  if compiled is None:
    return [mem]
  # The decode loop takes the prefill's state as the prefill lays it out.
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prefill.out_info, compiled.output_shardings
  )
  out = [mem]
  keys = jax.eval_shape(lambda: jax.vmap(jax.random.PRNGKey)(jnp.arange(batch)))
  lowered = generate._run.lower(
      model,
      state,
      rows((batch, max_bytes)),
      rows((batch,), jnp.bool_),
      0,  # pylint: disable=protected-access
      rows(keys.shape, keys.dtype),
      shapes=shapes,
      sampling=generate.Sampling(),
      steps=chunk,
      record_logits=False,
  )
  out.append(_compile("decode", f"[{batch} rows, {chunk} cached steps]", lowered))
  return out


def compile_inference(
    cfg: ml_collections.ConfigDict,
    topology: str,
    step: str = "score",
    entropy_config: Optional[str] = None,
    dtype: str = "float32",
    mesh: Optional[str] = None,
    row_bytes: Optional[int] = None,
    batch_bytes: int = 16384,
    batch: int = 8,
    prompt_bytes: int = 1024,
    max_bytes: int = 256,
    chunk: int = 16,
) -> InferenceReport:
  """Compiles the scorer's (`step="score"`) or the generator's (`"generate"`) programs for `topology`'s chips."""
  if step not in ("score", "generate"):
    raise aot.AotError(f"--step {step!r}: expected train, score or generate")
  placement.check_dtype(dtype)
  spec = placement.parse_mesh(mesh)
  devices = aot.topology_devices(topology)
  inference_mesh = placement.make_mesh(spec, devices)
  model = _abstract_model(cfg, entropy_config, dtype, inference_mesh)
  report = InferenceReport(
      step,
      topology,
      devices[0].device_kind,
      len(devices),
      dict(inference_mesh.shape),
      dtype,
      placement.bytes_per_device((model.params, model.entropy_params)),
      aot.hbm_bytes(devices[0]),
  )
  if step == "score":
    report.programs = _score_programs(model, row_bytes, batch_bytes)
  else:
    report.programs = _generate_programs(model, batch, prompt_bytes, max_bytes, chunk)
  return report
