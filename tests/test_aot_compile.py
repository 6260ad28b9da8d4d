"""Ahead-of-time TPU compiles on a CPU machine (libtpu, no TPU): the trainer's step for a small v5e slice."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compiles need libtpu (requirements-test.txt)")

from blt_jax import aot, flops, hlo_stats, train_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"  # 4 chips: the smallest slice with an fsdp axis to shard over


def _config(name: str, **overrides):
  cfg = train_config.load_config_file(str(ROOT / "configs" / name))
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return cfg


def _small_tiny():
  """configs/tiny.py with one block per stack and 128-byte rows: the same step, less for XLA to compile."""
  return _config(
      "tiny.py",
      **{
          "model.n_layers_global": 1,
          "model.n_layers_local_decoder": 1,
          "seq_len": 128,
          "model.encoder_hash_byte_group_size": (3, 4),
      },
  )


def test_tiny_step_compiles_for_a_v5e_slice():
  cfg = _small_tiny()
  report = aot.compile_step(cfg, TOPOLOGY)
  assert report.fits and not report.error, report.error
  assert (report.chips, report.device_kind, report.mesh) == (4, "TPU v5 lite", dict(data=1, fsdp=4, tensor=1))
  assert report.hbm_bytes == 16 * aot.GiB
  assert report.argument_bytes > 0 and report.argument_bytes < report.total_bytes and report.code_bytes > 0
  # Temporaries hold at least one chip's logits (2 rows x 128 bytes x 260 ids in float32; measured 12.9 MB in all).
  assert 2 * 128 * 260 * 4 < report.temp_bytes < report.hbm_bytes
  assert report.total_bytes < report.hbm_bytes
  # Space patching runs the global stack over all seq_len + 1 slots: flops.py's every-slot count is what runs.
  expected = report.model_flops["every_patch_slot"]
  assert report.model_flops["model"] == pytest.approx(
      flops.blt_train_flops_per_byte(train_config.model_config(cfg), 128, 4.5) * 8 * 128 / 4
  )
  assert 0.5 < report.matmul_flops / expected < 4, (report.matmul_flops, expected)
  assert report.uncounted_loops == 0 and 0 < report.xla_flops
  assert report.peak_flops == flops.PEAK_FLOPS["TPU v5 lite"]
  # FSDP over 4 chips: weights are all-gathered for the forward and gradients reduced across the batch shards.
  assert report.collectives["all-gather"]["ops"] > 0 and report.collectives["all-gather"]["bytes"] > 0
  assert report.collectives["all-reduce"]["ops"] + report.collectives["reduce-scatter"]["ops"] > 0
  text = "\n".join(report.lines())
  assert "compiled in" in text and "of 16.00 GiB HBM" in text and "DOES NOT FIT" not in text


def test_a_step_too_big_for_the_chip_says_so():
  # An entropy-model step (the smaller program) with 8192 rows of 512 bytes per chip and no remat: its float32
  # activations and logits alone are tens of GiB.
  cfg = _config("entropy_tiny.py", global_batch_size=4 * 8192, seq_len=512, **{"mesh.data": -1, "mesh.fsdp": 1})
  report = aot.compile_step(cfg, TOPOLOGY)
  assert not report.fits
  text = "\n".join(report.lines())
  assert "DOES NOT FIT in 16.00 GiB per chip" in text, text


def test_unknown_topology_is_named():
  with pytest.raises(aot.AotError, match=r"--topology 'v9z:2x2' is not a TPU slice libtpu can describe"):
    aot.topology_devices("v9z:2x2")


def test_a_mesh_the_slice_cannot_hold_is_named():
  cfg = _config("tiny.py", **{"mesh.tensor": 3})  # 256 chips do not split into groups of 3
  with pytest.raises(aot.AotError, match=r"mesh data=1, fsdp=-1, tensor=3 cannot be laid out on v6e:16x16"):
    aot.compile_step(cfg, "v6e:16x16")


def test_an_axis_that_splits_a_ring_is_laid_on_neighbouring_chips():
  """configs/blt_7b.py's tensor=4 on v6e:16x16 (a 16 x 16 torus, so 4 is no product of its dimensions): each tensor
  group is 4 consecutive chips of one ring, and every chip is used once."""
  from blt_jax import sharding  # pylint: disable=g-import-not-at-top

  devices = aot.topology_devices("v6e:16x16")
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=4), devices=devices)
  assert dict(mesh.shape) == dict(data=1, fsdp=64, tensor=4)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  for group in mesh.devices.reshape(-1, 4):
    coords = [tuple(d.coords) for d in group]
    moving = [axis for axis in range(3) if len({c[axis] for c in coords}) > 1]
    assert len(moving) == 1, coords  # along one ring
    assert sorted(c[moving[0]] for c in coords) == list(range(coords[0][moving[0]], coords[0][moving[0]] + 4))


def test_in_graph_entropy_model_needs_its_shape():
  cfg = _config("blt_1b.py")  # its entropy_checkpoint is not on this machine
  cfg.data.entropy_store = ""
  cfg.patching.rows = "bytes"  # rows of seq_len bytes, patched by the step's own entropy model
  with pytest.raises(aot.AotError, match="--entropy_config"):
    aot.entropy_model_config(cfg)
  entropy = aot.entropy_model_config(cfg, str(ROOT / "configs" / "entropy_100m.py"))
  assert (entropy.dim, entropy.n_layers) == (768, 14)
  cfg.data.entropy_store = "precomputed"  # batches carry entropies: no model in the step
  assert aot.entropy_model_config(cfg) is None


def test_collectives_are_counted_from_hlo_text():
  hlo = """
  %ag = bf16[128,1024]{1,0} all-gather(bf16[32,1024]{1,0} %p), replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %q), dimensions={0}
  %agd = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %ags)
  %ar = f32[] all-reduce(f32[] %x), to_apply=%add
  %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %y), dimensions={0}, to_apply=%add
  """
  counts = hlo_stats.count_collectives(hlo)
  assert counts["all-gather"] == dict(ops=2, bytes=128 * 1024 * 2 + 32 * 4)
  assert counts["all-reduce"] == dict(ops=1, bytes=4)
  assert counts["reduce-scatter"] == dict(ops=1, bytes=1024)
  assert counts["all-to-all"]["ops"] == counts["collective-permute"]["ops"] == 0


_LOOP_HLO = """
%body (t: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %t = (s32[], f32[64,32]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %h = f32[64,32]{1,0} get-tuple-element(%t), index=1
  %w = f32[32,32]{1,0} constant({...})
  %d = f32[64,32]{1,0} dot(f32[64,32]{1,0} %h, f32[32,32]{1,0} %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[64,32]) tuple(%next, %d)
}

%cond (t.1: (s32[], f32[64,32])) -> pred[] {
  %t.1 = (s32[], f32[64,32]) parameter(0)
  %n = s32[] constant(25)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%small (x.2: f32[64,32]) -> f32[64,32] {
  %x.2 = f32[64,32]{1,0} parameter(0)
  ROOT %c = f32[64,32]{1,0} convolution(%x.2, %x.2), dim_labels=bf_io->bf
}

%none (x.3: f32[64,32]) -> f32[64,32] {
  ROOT %x.3 = f32[64,32]{1,0} parameter(0)
}

ENTRY %main (x: f32[64,32], p: s32[]) -> f32[64,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %p = s32[] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,32]) tuple(%zero, %x)
  %loop = (s32[], f32[64,32]) while(%init), condition=%cond, body=%body
  %y = f32[64,32]{1,0} get-tuple-element(%loop), index=1
  ROOT %z = f32[64,32]{1,0} conditional(%p, %y, %y), branch_computations={%none, %small}
}
"""


def test_matmul_flops_count_loops_by_their_trip_count():
  # 25 iterations of a [64, 32] x [32, 32] dot, then the costlier branch: a convolution with a [64 in, 32 out]
  # kernel, 64 multiply-adds per output element.
  flops, unknown = hlo_stats.matmul_flops(_LOOP_HLO)
  assert unknown == 0
  assert flops == 25 * 2 * 64 * 32 * 32 + 2 * 64 * 32 * 64


def test_a_loop_that_steps_by_two_runs_half_its_range():
  """XLA's windowed einsums (an FSDP all-gather overlapped with its matmul) run two chunks an iteration and step their
  counter by 2: `i < 16` from 0 is 8 trips. Counted as 16, the 7B's v5p:4x4x8 step read 1.7x flops.py's matmuls."""
  stepped = _LOOP_HLO.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
  flops, unknown = hlo_stats.matmul_flops(stepped)
  assert unknown == 0
  assert flops == 13 * 2 * 64 * 32 * 32 + 2 * 64 * 32 * 64  # ceil(25 / 2) trips


def test_a_kernel_config_over_several_lines_does_not_end_its_computation():
  # A Pallas kernel's custom call prints its config over lines, one starting with "}}": the dot after it counts.
  hlo = """
ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %k = f32[8,16]{1,0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"body":"x
}}, metadata={op_name="jit(step)/attention/pallas_call"}
  ROOT %d = f32[8,4]{1,0} dot(f32[8,16]{1,0} %k, f32[16,4]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
  assert hlo_stats.matmul_flops(hlo) == (2 * 8 * 4 * 16, 0)
  assert hlo_stats.pallas_kernels(hlo) == 1


def test_command_line_reports_a_bad_override_in_one_line():
  result = subprocess.run(
      [
          sys.executable,
          str(ROOT / "scripts" / "aot_compile.py"),
          "--config",
          str(ROOT / "configs" / "tiny.py"),
          "--topology=v5e:2x2",
          "--config.optimizer.lrr=1",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "optimizer.lr" in result.stderr


def test_a_tensor_group_does_not_repeat_the_patcher_or_the_byte_logits(tmp_path):
  """Under tensor=4, the in-graph entropy model's rows and the decoder's 260-way output (weights not split over
  "tensor") are spread over all 8 chips: per chip, 1/8 of the work, not the 1/2 of a batch split over fsdp=2 alone
  (issue 25: 4x the entropy model's FLOPs on the 7B's v5p slice)."""
  cfg = _config(
      "tiny_entropy.py",
      **{
          "model.n_layers_global": 1,
          "model.n_layers_local_decoder": 1,
          "seq_len": 128,
          "model.encoder_hash_byte_group_size": (3, 4),
          "patching.target_bytes_per_patch": 0.0,
          "patching.threshold": 2.0,
          "global_batch_size": 16,
          "mesh.fsdp": 2,
          "mesh.tensor": 4,
      },
  )
  hlo = tmp_path / "step.hlo"
  report = aot.compile_step(cfg, "v5e:2x4", str(ROOT / "configs" / "entropy_tiny.py"), hlo_path=str(hlo))
  assert report.fits and report.mesh == dict(data=1, fsdp=2, tensor=4)
  by_name, _ = hlo_stats.matmul_flops_by(hlo.read_text(), aot.flops_part)
  entropy = sum(f for part, f in by_name.items() if part.startswith("entropy_model/"))
  # flops.py's entropy model forward per chip (dense matmuls and attention at every position, 1/8 of the rows);
  # measured 1.0x with the rows over every chip, 4.0x over fsdp alone.
  assert entropy / report.model_flops["entropy_forward"] < 1.5, (entropy, report.model_flops)
  by_op, _ = hlo_stats.matmul_flops_by(hlo.read_text(), lambda op: "output" if "local_decoder/output/" in op else "")
  rows, dim, vocab = 16 * 128, cfg.model.dim_local_decoder, 260
  # The output projection: forward, and in the backward its input and weight gradients, each 2 * rows * dim * vocab
  # in all; per chip an eighth.
  assert by_op["output"] == pytest.approx(3 * 2 * rows * dim * vocab / 8, rel=0.01), by_op["output"]


def test_a_scanned_v5p_step_gets_the_time_of_its_whole_stack():
  """The TPU compiler's `optimal_seconds` prices a loop body once (a scanned stack of 4 layers costs about what 1
  does); `estimate_step` extrapolates unrolled 1- and 2-layer compiles, and lands on the unrolled 4-layer step's
  own estimate. (On v5e the tiny step comes back negative, -3.0 s: some op has no v5e cost model; not found.)"""
  cfg = _small_tiny()
  cfg.global_batch_size = 8
  cfg.model.n_layers_global = 4
  cfg.scan_layers = True
  report = aot.compile_step(cfg, "v5p:2x2x1")
  assert report.optimal_seconds > 0 and report.loops > 0 and report.peak_flops == flops.PEAK_FLOPS["TPU v5"]
  assert report.estimated_mfu == 0 and "--estimate_time" in "\n".join(report.lines())  # one layer's time is no MFU
  aot.estimate_step(cfg, "v5p:2x2x1", report)
  cfg.scan_layers = False
  unrolled = aot.compile_step(cfg, "v5p:2x2x1")
  assert unrolled.loops == 0 and unrolled.estimated_mfu > 0
  assert report.estimated_seconds == pytest.approx(unrolled.optimal_seconds, rel=0.1)
  assert report.estimated_seconds > report.optimal_seconds  # three more layers than the loop body priced once
  assert 0 < report.estimated_mfu < 1 and "estimated MFU" in "\n".join(report.lines())


def test_patching_has_a_tpu_time_estimate():
  """libtpu's v5p cost model has none for a scalar scatter-add at these sizes (its `optimal_seconds` comes back
  near -2 s per scatter, which made the 1B step's estimate negative); patching builds lengths and ids by binary
  search instead."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  from blt_jax import patching  # pylint: disable=g-import-not-at-top

  chip = aot.topology_devices("v5p:2x2x1")[:1]
  mesh = Mesh(np.array(chip), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))

  def step(starts_BT):
    patches = patching.starts_to_patches(starts_BT, 4096)
    return patches, patching.decoder_patch_ids(patches.patch_lengths_BP, 14336)

  compiled = jax.jit(step).lower(spec((4, 14337), jnp.bool_)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 0 < cost["optimal_seconds"] < 0.1, cost
  # A scalar scatter-add of this kind (the old patching's, at these sizes) has no estimate.
  scatter = jax.jit(lambda ids: jnp.zeros((8, 1024), jnp.int32).at[jnp.arange(8)[:, None], ids].add(1, mode="drop"))
  cost = scatter.lower(spec((8, 4096), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["optimal_seconds"] < 0  # what the old patching compiled to: no estimate
