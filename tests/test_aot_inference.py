"""Ahead-of-time TPU compiles of the inference programs (the scorer's, the generator's) on a CPU machine."""

import pathlib

import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compiles need libtpu (requirements-test.txt)")

from blt_jax import aot, aot_inference, placement, train_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"


def _tiny_entropy():
  cfg = train_config.load_config_file(str(ROOT / "configs" / "tiny_entropy.py"))
  cfg.model.n_layers_global = 1
  cfg.model.n_layers_local_decoder = 1
  cfg.model.encoder_hash_byte_group_size = (3, 4)
  return cfg


def test_scoring_programs_compile_with_params_sharded_in_bfloat16():
  cfg = _tiny_entropy()
  kw = dict(entropy_config=str(ROOT / "configs" / "entropy_tiny.py"), row_bytes=256, batch_bytes=2048)
  sharded = aot_inference.compile_inference(cfg, TOPOLOGY, "score", dtype="bfloat16", mesh="fsdp=4", **kw)
  assert sharded.fits and [p.name for p in sharded.programs] == ["patcher", "blt"]
  assert sharded.mesh == dict(data=1, fsdp=4, tensor=1) and sharded.hbm_bytes == 16 * aot.GiB
  assert all(p.argument_bytes > 0 and p.total_bytes > p.argument_bytes for p in sharded.programs)
  replicated = aot_inference.compile_inference(cfg, TOPOLOGY, "score", dtype="float32", **kw)
  assert replicated.mesh == dict(data=4, fsdp=1, tensor=1)
  # bfloat16 halves the params and fsdp=4 quarters them (up to arrays that do not divide by 4).
  ratio = sharded.param_bytes_per_chip / replicated.param_bytes_per_chip
  assert 1 / 8 <= ratio < 1 / 8 * 1.2, ratio
  # The BLT program's arguments are its params and the batch: they shrink with the params.
  assert sharded.programs[1].argument_bytes < replicated.programs[1].argument_bytes / 4
  assert any("params in bfloat16" in line for line in sharded.lines()) and sharded.lines()[-1] == "fits"


def test_generation_programs_compile():
  report = aot_inference.compile_inference(
      _tiny_entropy(),
      TOPOLOGY,
      "generate",
      entropy_config=str(ROOT / "configs" / "entropy_tiny.py"),
      dtype="bfloat16",
      mesh="fsdp=4",
      batch=4,
      prompt_bytes=32,
      max_bytes=16,
      chunk=4,
  )
  assert report.fits and [p.name for p in report.programs] == ["prefill", "decode"]
  assert all(p.total_bytes > 0 for p in report.programs)


def test_bad_inference_options_are_one_line():
  cfg = _tiny_entropy()
  with pytest.raises(placement.PlacementError, match="unknown axis 'model'"):
    aot_inference.compile_inference(cfg, TOPOLOGY, "score", mesh="model=4")
  with pytest.raises(aot.AotError, match="--step 'serve'"):
    aot_inference.compile_inference(cfg, TOPOLOGY, "serve")
