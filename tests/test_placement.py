"""Inference placement: the --dtype / --mesh options, sharded and bfloat16 params, the fit check before loading."""

import dataclasses

import jax
import numpy as np
import pytest

import helpers
from blt_jax import generate, loading, placement, score
from blt_jax.config import PatchingConfig, blt_config_from_reference, entropy_config_from_reference
from blt_jax.entropy_model import compute_entropies, init_entropy_model
from blt_jax.model import init_blt

TEXTS = [("The quick brown fox %d jumps over the lazy dog. " % i) * (1 + i % 4) for i in range(10)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = helpers.tiny_entropy_blt(max_seqlen=96)
  path = helpers.save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", **model)
  return dict(path=path, base=score.Scorer(path, batch_bytes=1024).score_texts(TEXTS))


def _mesh(text):
  return placement.make_mesh(placement.parse_mesh(text))


def test_parse_mesh():
  assert placement.parse_mesh(None) is None
  assert placement.parse_mesh("") is None
  assert placement.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
  assert placement.parse_mesh(" fsdp=4, tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
  assert placement.parse_mesh("data=-1,tensor=2") == {"data": -1, "fsdp": 1, "tensor": 2}
  assert placement.parse_mesh("fsdp:4+tensor:2") == {"data": 1, "fsdp": 4, "tensor": 2}  # lm-eval's model_args


@pytest.mark.parametrize(
    "text, message",
    [
        ("model=8", "unknown axis 'model'"),
        ("fsdp=4,fsdp=2", "given twice"),
        ("fsdp8", "axis=size pairs"),
        ("fsdp=three", "axis=size pairs"),
    ],
)
def test_parse_mesh_errors(text, message):
  with pytest.raises(placement.PlacementError, match=message):
    placement.parse_mesh(text)


def test_mesh_that_does_not_divide_the_devices_is_one_line():
  with pytest.raises(placement.PlacementError, match=r"mesh data=1,fsdp=3,tensor=1 over 8 devices"):
    _mesh("fsdp=3")
  with pytest.raises(placement.PlacementError, match="dtype 'bf16'"):
    placement.check_dtype("bf16")


@pytest.mark.parametrize("mesh_text", ["fsdp=8", "fsdp=4,tensor=2"])
def test_sharded_scoring_equals_unsharded(tiny, mesh_text):
  model = loading.load(tiny["path"], mesh=_mesh(mesh_text))
  kernel = model.params["global_transformer"]["layers_0"]["feed_forward"]["w1"]["kernel"]
  # Really sharded: each device holds 1/8 of the kernel (fsdp over its rows, tensor over its columns).
  assert kernel.addressable_shards[0].data.size * 8 == kernel.size
  assert len({d for d in kernel.sharding.device_set}) == 8
  scores = score.Scorer(model, batch_bytes=1024).score_texts(TEXTS)
  for got, want in zip(scores, tiny["base"]):
    assert got.n_patches == want.n_patches
    np.testing.assert_allclose(got.nll_nats, want.nll_nats, rtol=1e-6)


def test_sharded_greedy_generation_is_byte_identical(tiny):
  prompts = ["Hello wor", "The quick brown"]
  base = generate.generate(loading.load(tiny["path"]), prompts, 24)
  sharded = generate.generate(loading.load(tiny["path"], mesh=_mesh("fsdp=4,tensor=2")), prompts, 24)
  assert [r.continuation for r in sharded] == [r.continuation for r in base]
  assert all(len(r.continuation) == 24 for r in base)


def _random_checkpoint(tmp_path, blt_cfg, ent_cfg):
  """A random BLT + entropy model saved as `loading.load` reads it; threshold at a median entropy (patches vary)."""
  blt_params = helpers._unbox(init_blt(jax.random.PRNGKey(3), blt_cfg))
  ent_params = helpers._unbox(init_entropy_model(jax.random.PRNGKey(4), ent_cfg))
  sample = np.asarray([[1] + list(range(4, 200))], np.int32)
  threshold = float(np.median(np.asarray(compute_entropies(ent_params, sample, ent_cfg))))
  return helpers.save_checkpoint(
      tmp_path / "ckpt", blt_cfg, blt_params, PatchingConfig(mode="entropy", threshold=threshold), ent_cfg, ent_params
  )


def _golden_shapes(golden):
  _, meta = golden
  return blt_config_from_reference(meta["blt_args"]), entropy_config_from_reference(meta["entropy_model_args"])


def _mid_size(golden):
  blt_cfg, ent_cfg = _golden_shapes(golden)
  blt_cfg = dataclasses.replace(
      blt_cfg, dim_global=384, n_layers_global=3, n_heads_global=6, dim_local_encoder=128, dim_local_decoder=128
  )
  ent_cfg = dataclasses.replace(ent_cfg, dim=192, n_layers=2)
  return blt_cfg, ent_cfg


@pytest.mark.parametrize("shapes", [_golden_shapes, _mid_size], ids=["golden", "mid"])
def test_bfloat16_scoring_within_one_percent(tmp_path, golden, shapes, record_property):
  path = _random_checkpoint(tmp_path, *shapes(golden))
  one = jax.local_devices()[:1]  # one device: fewer padded rows per batch than 8, the same numbers
  f32 = score.Scorer(path, batch_bytes=2048, devices=one).score_texts(TEXTS)
  bf16_model = loading.load(path, dtype="bfloat16")
  leaves = jax.tree_util.tree_leaves(bf16_model.params) + jax.tree_util.tree_leaves(bf16_model.entropy_params)
  assert {leaf.dtype.name for leaf in leaves} == {"bfloat16"}
  assert bf16_model.config.dtype == "bfloat16" and bf16_model.entropy_config.dtype == "bfloat16"
  bf16 = score.Scorer(bf16_model, batch_bytes=2048, devices=one).score_texts(TEXTS)
  worst = max(abs(b.nll_nats - f.nll_nats) / f.nll_nats for b, f in zip(bf16, f32))
  moved = sum(abs(b.n_patches - f.n_patches) for b, f in zip(bf16, f32))
  total = sum(f.n_patches for f in f32)
  record_property("bf16_worst_relative_nll", worst)
  record_property("bf16_patch_count_change", f"{moved} of {total}")
  print(f"bfloat16 vs float32: worst relative nll {worst:.2e}; patch counts moved by {moved} of {total}")
  assert worst < 0.01
  assert all(np.isfinite(b.nll_nats) for b in bf16)


def test_params_that_cannot_fit_stop_before_loading(tiny, monkeypatch):
  """A device memory the params exceed: one line with the need per device and a dtype/mesh that would fit."""
  target = placement.targets(loading.abstract_params(loading.load(tiny["path"]).config), "float32", None)
  need = placement.bytes_per_device(target)
  monkeypatch.setattr(placement, "device_memory", lambda device: int(need * 0.8))
  read = []
  monkeypatch.setattr(loading, "_read_params", lambda *a: read.append(a))
  with pytest.raises(placement.PlacementError) as e:
    loading.load(tiny["path"])
  assert "GiB of params per device in float32" in str(e.value)
  assert "try --dtype bfloat16 with params replicated" in str(e.value)
  assert not read
  # Sharded over 8 devices it fits.
  loading.load(tiny["path"], mesh=_mesh("fsdp=8"))


def test_suggestion_shards_when_bfloat16_alone_does_not_fit(tiny):
  target = placement.targets(loading.abstract_params(loading.load(tiny["path"]).config), "float32", None)
  total = placement.bytes_per_device(target)
  # A quarter of the float32 size per device (90% usable): nothing replicated fits, float32 over fsdp=8 does.
  assert placement.suggestion(target, 8, int(total / 4)) == "--dtype float32 --mesh fsdp=8"
  # A twelfth: only bfloat16 over all 8 devices.
  assert placement.suggestion(target, 8, int(total / 12)) == "--dtype bfloat16 --mesh fsdp=8"
  assert placement.suggestion(target, 8, int(total / 100)).startswith("more devices")
