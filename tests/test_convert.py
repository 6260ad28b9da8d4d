"""Checkpoint conversion: released layouts built from the golden weights -> blt_jax, checked against golden outputs."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from blt_jax import convert, loading
from blt_jax.config import (BLTConfig, EntropyModelConfig, blt_config_from_reference, entropy_config_from_reference)
from blt_jax.convert import __main__ as cli
from blt_jax.convert import mapping, reference, safetensors_io
from blt_jax.entropy_model import compute_entropies, init_entropy_model
from blt_jax.model import BLT, init_blt

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
BF16_TOL = 5e-2  # bf16 weights (8-bit mantissa): logits move by about 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Released layouts written from golden (or random) state dicts.


def _train_args(meta):
  """A params.json / train_args.json (TrainArgs) for the golden models."""
  return {
      "model": meta["blt_args"],
      "entropy_model": meta["entropy_model_args"],
      "data": {"patcher_args": {"patching_mode": "entropy", "threshold": meta["threshold"]}},
  }


def write_pth_dir(path, state_dict, params_json, weights="consolidated.pth", dtype=torch.float32):
  """Layout (a): params.json + torch.save({"model": state_dict})."""
  (path / weights).parent.mkdir(parents=True, exist_ok=True)
  (path / "params.json").write_text(json.dumps(params_json))
  torch.save({"model": {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in state_dict.items()}}, path / weights)
  return path


def write_safetensors_dir(path, state_dict, args, dtype=np.float32, train_args=None):
  """Layout (b): config.json {"args": ...} + model.safetensors (+ train_args.json)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps({"args": args}))
  safetensors_io.write_safetensors(
      path / "model.safetensors", {k: np.asarray(v).astype(dtype) for k, v in state_dict.items()}
  )
  if train_args is not None:
    (path / "train_args.json").write_text(json.dumps(train_args))
  return path


@pytest.fixture(scope="module")
def golden_sd(golden):
  arrays, meta = golden
  strip = lambda prefix: {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
  return strip("blt/"), strip("entropy_model/"), meta


@pytest.fixture(scope="module")
def blt_forward(golden_sd):
  """One jitted forward of the golden config, shared by every test that runs it (one compile)."""
  cfg = blt_config_from_reference(golden_sd[2]["blt_args"])
  return jax.jit(lambda p, t, l: BLT(cfg).apply({"params": p}, t, l))


def _golden_inputs(arrays):
  return (jnp.asarray(arrays["tokens"], jnp.int32), jnp.asarray(arrays["patch_lengths_include_next"], jnp.int32))


def _flat(tree):
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Golden parity.


def test_cli_converts_reference_layout(golden, golden_sd, blt_forward, tmp_path):
  """params.json + consolidated.pth, entropy model in entropy_model/consolidated/ -> CLI -> golden outputs."""
  arrays, _ = golden
  blt_sd, ent_sd, meta = golden_sd
  src = write_pth_dir(tmp_path / "blt_1b", blt_sd, _train_args(meta))
  # `consolidated_with_rope.pth` copies carry the RoPE table (issue #133); it must be ignored.
  write_pth_dir(
      src / "entropy_model",
      {**ent_sd, "rope_embeddings.freqs_cis": np.zeros((256, 8, 2, 2))},
      _train_args(meta),
      weights="consolidated/consolidated.pth",
  )
  out = tmp_path / "ckpt"
  # From another directory with relative paths, as a user would (orbax itself refuses relative paths).
  run = subprocess.run(
      [sys.executable, "-m", "blt_jax.convert", "--format", "reference", "--src", "blt_1b", "--out", "ckpt"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  blt_count = sum(v.size for v in blt_sd.values())
  ent_count = sum(v.size for v in ent_sd.values())
  assert f"blt: {blt_count:,} params" in run.stdout and f"entropy_model: {ent_count:,} params" in run.stdout
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "entropy_model", "params"]

  cfg, params, patching = convert.load_converted(out)
  assert isinstance(cfg, BLTConfig) and cfg == blt_config_from_reference(meta["blt_args"])
  assert patching.mode == "entropy" and patching.threshold == meta["threshold"]
  assert convert.param_count(params) == blt_count
  np.testing.assert_allclose(blt_forward(params, *_golden_inputs(arrays)), arrays["blt_logits"], atol=TOL)

  ent_cfg, ent_params, ent_patching = convert.load_converted(out / "entropy_model")
  assert isinstance(ent_cfg, EntropyModelConfig) and ent_patching is None
  assert ent_cfg == entropy_config_from_reference(meta["entropy_model_args"])
  assert convert.param_count(ent_params) == ent_count
  entropies = compute_entropies(ent_params, jnp.asarray(arrays["tokens"], jnp.int32), ent_cfg)
  np.testing.assert_allclose(entropies, arrays["entropies"], atol=TOL)
  meta_json = json.loads((out / "config.json").read_text())
  assert meta_json["format"] == "blt_jax" and meta_json["model_type"] == "blt"
  assert meta_json["source"] == str(src) and meta_json["entropy_model"] == "entropy_model"


def test_bf16_safetensors_layout(golden, golden_sd, blt_forward, tmp_path):
  """config.json {"args"} + bf16 model.safetensors (+ train_args.json for the patcher), read without torch."""
  arrays, _ = golden
  blt_sd, _, meta = golden_sd
  src = write_safetensors_dir(
      tmp_path / "blt-1b", blt_sd, meta["blt_args"], ml_dtypes.bfloat16, train_args=_train_args(meta)
  )
  loaded = reference.load_model(src)
  assert loaded.model_type == "blt" and loaded.patching.threshold == meta["threshold"]
  want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in blt_sd.items()}
  got = mapping.state_dict_from_params(loaded.params, "blt")
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  logits = blt_forward(loaded.params, *_golden_inputs(arrays))
  np.testing.assert_allclose(logits, arrays["blt_logits"], atol=BF16_TOL)


def test_entropy_model_safetensors_layout(golden_sd, tmp_path):
  """facebook/blt-entropy style: config.json {"args": LMTransformerArgs} + fp32 model.safetensors."""
  _, ent_sd, meta = golden_sd
  src = write_safetensors_dir(tmp_path / "blt-entropy", ent_sd, meta["entropy_model_args"])
  cfg, params = convert.convert(src)
  assert cfg == entropy_config_from_reference(meta["entropy_model_args"])
  assert cfg.sliding_window == 512  # load_entropy_model hard-codes it (spec 2.1)
  _assert_trees_equal(params, mapping.params_from_state_dict(ent_sd, cfg))
  # The entropy model alone converts to out/ itself.
  summary = convert.convert_dir(src, tmp_path / "out")
  assert [m["model_type"] for m in summary["models"]] == ["entropy_model"]
  assert summary["models"][0]["params"] == sum(v.size for v in ent_sd.values())
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  shardings = jax.tree.map(
      lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), convert.abstract_params(cfg)
  )
  ent_cfg, ent_params, patching = convert.load_converted(tmp_path / "out", shardings=shardings)
  assert ent_cfg == cfg and patching is None
  assert all(x.sharding == s for x, s in zip(jax.tree.leaves(ent_params), jax.tree.leaves(shardings)))
  _assert_trees_equal(ent_params, params)
  with pytest.raises(convert.ConversionError, match="itself an entropy model"):
    convert.convert_dir(src, tmp_path / "out2", entropy_src=src)


def test_round_trip_is_identity(golden_sd):
  blt_sd, ent_sd, meta = golden_sd
  for sd, cfg, model in (
      (blt_sd, blt_config_from_reference(meta["blt_args"]), "blt"),
      (ent_sd, entropy_config_from_reference(meta["entropy_model_args"]), "entropy"),
  ):
    params = mapping.params_from_state_dict(sd, cfg)
    back = mapping.state_dict_from_params(params, model)
    assert back.keys() == sd.keys()
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    _assert_trees_equal(mapping.params_from_state_dict(back, cfg), params)


def _random_params(init, cfg, seed):
  """Random weights in the tree `init` builds (shapes via eval_shape: an eager init costs tens of seconds)."""
  abstract = nn.meta.unbox(jax.eval_shape(lambda: init(jax.random.PRNGKey(0), cfg)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def test_other_dims_are_read_from_the_files(golden_sd, tmp_path):
  """A random BLT and entropy model with other dims round-trip through the released layout: nothing is golden-only."""
  _, _, meta = golden_sd
  args = dict(
      meta["blt_args"],
      dim_local_encoder=24,
      dim_local_decoder=24,
      dim_global=40,
      cross_attn_k=3,
      n_heads_local_encoder=2,
      n_heads_local_decoder=3,
      n_heads_global=5,
      cross_attn_nheads=3,
      n_layers_local_encoder=2,
      n_layers_global=1,
      n_layers_local_decoder=3,
      cross_attn_all_layers_encoder=True,
      encoder_hash_byte_group_size=[2, 5],
      encoder_hash_byte_group_vocab=53,
      encoder_hash_byte_group_nb_functions=2,
  )
  cfg = blt_config_from_reference(args)
  assert cfg.global_input_dim != cfg.dim_global  # exercises global_transformer.token_embedding_projection
  ent_args = dict(meta["entropy_model_args"], dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim_multiplier=1.5)
  ent_cfg = entropy_config_from_reference(ent_args)
  params = _random_params(init_blt, cfg, seed=1)
  ent_params = _random_params(init_entropy_model, ent_cfg, seed=2)
  sd = mapping.state_dict_from_params(params, "blt")
  assert sd["global_transformer.token_embedding_projection.weight"].shape == (40, 72)
  assert sum(k.startswith("encoder_hash_tok_embedding.") for k in sd) == 4
  src = write_pth_dir(tmp_path / "blt", sd, {"model": args, "entropy_model": ent_args})
  write_pth_dir(src / "entropy_model", mapping.state_dict_from_params(ent_params, "entropy"), {})
  (src / "entropy_model" / "params.json").unlink()  # weights only: the parent's `entropy_model` section applies
  summary = convert.convert_dir(src, tmp_path / "out")
  assert summary["patching"]["threshold"] == args["patching_threshold"]  # from the BLT args: no data.patcher_args
  got_cfg, got, _ = convert.load_converted(tmp_path / "out")
  assert got_cfg == cfg
  _assert_trees_equal(got, params)
  got_ent_cfg, got_ent, _ = convert.load_converted(tmp_path / "out" / "entropy_model")
  assert got_ent_cfg == ent_cfg
  _assert_trees_equal(got_ent, ent_params)


# ---------------------------------------------------------------------------------------------------------------
# Clear errors.


def _entropy_dir(path, golden_sd, state_dict=None, args=None):
  _, ent_sd, meta = golden_sd
  return write_safetensors_dir(
      path, ent_sd if state_dict is None else state_dict, meta["entropy_model_args"] if args is None else args
  )


def _error(src):
  with pytest.raises(convert.ConversionError) as e:
    convert.convert(src)
  assert isinstance(e.value, ValueError)
  return str(e.value)


def test_error_missing_tensor(golden_sd, tmp_path):
  sd = dict(golden_sd[1])
  del sd["layers.1.feed_forward.w2.weight"]
  msg = _error(_entropy_dir(tmp_path, golden_sd, sd))
  assert "missing 1 tensor" in msg and "layers.1.feed_forward.w2.weight" in msg and "model.safetensors" in msg


def test_error_missing_hash_table(golden_sd, tmp_path):
  blt_sd, _, meta = golden_sd
  sd = {k: v for k, v in blt_sd.items() if k != "encoder_hash_tok_embedding.3.weight"}
  msg = _error(write_pth_dir(tmp_path, sd, _train_args(meta)))
  assert "encoder_hash_tok_embedding.3.weight" in msg and "consolidated.pth" in msg


def test_error_extra_tensor(golden_sd, tmp_path):
  sd = dict(golden_sd[1], **{"layers.2.attention.wq.weight": np.zeros((64, 64), np.float32)})
  msg = _error(_entropy_dir(tmp_path, golden_sd, sd))
  assert "unexpected 1 tensor" in msg and "layers.2.attention.wq.weight" in msg


def test_error_misshaped_tensor(golden_sd, tmp_path):
  sd = dict(golden_sd[1], **{"output.weight": np.zeros((260, 63), np.float32)})
  msg = _error(_entropy_dir(tmp_path, golden_sd, sd))
  assert "output.weight" in msg and "(260, 63)" in msg and "(260, 64)" in msg


def test_error_config_disagrees_with_weights(golden_sd, tmp_path):
  args = dict(golden_sd[2]["entropy_model_args"], dim=128)
  msg = _error(_entropy_dir(tmp_path, golden_sd, args=args))
  assert "tok_embeddings.weight: got (260, 64), expected (260, 128)" in msg


def test_error_truncated_safetensors(golden_sd, tmp_path):
  weights = _entropy_dir(tmp_path, golden_sd) / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  msg = _error(tmp_path)
  assert str(weights) in msg and "truncated" in msg
  weights.write_bytes(data[:5])
  assert "truncated" in _error(tmp_path)
  weights.write_bytes(b"\xff" * 64)
  assert "corrupt or truncated" in _error(tmp_path)


def test_error_unknown_safetensors_dtype(tmp_path):
  path = tmp_path / "x.safetensors"
  safetensors_io.write_safetensors(path, {"w": np.zeros(4, np.float32)})
  data = path.read_bytes().replace(b'"F32"', b'"F8X"')
  path.write_bytes(data)
  with pytest.raises(safetensors_io.SafetensorsError, match=r"x\.safetensors.*'w'.*'F8X'"):
    safetensors_io.read_safetensors(path)


def test_error_corrupt_torch_checkpoint(golden_sd, tmp_path):
  write_pth_dir(tmp_path, golden_sd[1], _train_args(golden_sd[2]))
  (tmp_path / "consolidated.pth").write_bytes(b"not a torch file")
  msg = _error(tmp_path)
  assert str(tmp_path / "consolidated.pth") in msg and "cannot load torch checkpoint" in msg


def test_error_corrupt_json(golden_sd, tmp_path):
  _entropy_dir(tmp_path, golden_sd)
  (tmp_path / "config.json").write_text('{\n  "args": {"dim": 64,,\n}')
  msg = _error(tmp_path)
  assert str(tmp_path / "config.json") in msg and "line 2" in msg


def test_error_missing_config_fields(golden_sd, tmp_path):
  args = {k: v for k, v in golden_sd[2]["entropy_model_args"].items() if k not in ("dim", "n_heads")}
  msg = _error(_entropy_dir(tmp_path, golden_sd, args=args))
  assert "config.json" in msg and "dim, n_heads" in msg


def test_error_missing_files(golden_sd, tmp_path):
  assert "does not exist" in _error(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps({"args": golden_sd[2]["entropy_model_args"]}))
  msg = _error(tmp_path)
  assert str(tmp_path) in msg and "no weights file" in msg and "config.json" in msg
  (tmp_path / "config.json").unlink()
  safetensors_io.write_safetensors(tmp_path / "model.safetensors", golden_sd[1])
  assert "no config json" in _error(tmp_path)


def test_unknown_format():
  with pytest.raises(ValueError, match="supported formats: reference, hf"):
    convert.convert("anything", format="gguf")


def test_safetensors_beside_pth_is_read_without_torch(golden, golden_sd, blt_forward, tmp_path, monkeypatch):
  """A directory with both consolidated.pth and model.safetensors reads the safetensors: no pickle, no torch."""
  arrays, _ = golden
  blt_sd, _, meta = golden_sd
  src = write_safetensors_dir(tmp_path / "both", blt_sd, meta["blt_args"], train_args=_train_args(meta))
  write_pth_dir(src, blt_sd, _train_args(meta))
  (src / "consolidated.pth").write_bytes(b"a pickle that must not be opened")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as on a machine without it
  loaded = reference.load_model(src)
  assert loaded.weights_file == src / "model.safetensors"
  np.testing.assert_allclose(blt_forward(loaded.params, *_golden_inputs(arrays)), arrays["blt_logits"], atol=TOL)


def test_cli_reports_errors_without_traceback(golden_sd, tmp_path, capsys):
  sd = dict(golden_sd[1])
  del sd["norm.weight"]
  src = _entropy_dir(tmp_path / "src", golden_sd, sd)
  assert cli.main(["--format", "reference", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "norm.weight" in err and "Traceback" not in err
  assert not (tmp_path / "out").exists()
  (tmp_path / "out").mkdir()
  assert cli.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2
  assert "already exists" in capsys.readouterr().err


def test_readme_usage_snippet_runs(golden_sd, tmp_path):
  """The README's "Using the model" code runs as written on a converted checkpoint."""
  blt_sd, ent_sd, meta = golden_sd
  src = write_pth_dir(tmp_path / "blt_1b", blt_sd, _train_args(meta))
  write_pth_dir(src / "entropy_model", ent_sd, _train_args(meta))
  out = tmp_path / "ckpt"
  convert.convert_dir(str(src), str(out))
  readme = (REPO / "README.md").read_text()
  snippet = readme.split("## Using the model")[1].split("```python")[1].split("```")[0]
  namespace = {}
  exec(snippet.replace("checkpoints/blt_1b", str(out)), namespace)  # pylint: disable=exec-used
  tokens = namespace["tokens"]
  assert namespace["logits"].shape == (1, tokens.shape[1], 260)
  assert np.isfinite(np.asarray(namespace["logits"])).all()


def test_bfloat16_conversion_halves_the_checkpoint(golden_sd, tmp_path):
  """--dtype bfloat16 stores every float param in bfloat16 (about half the bytes); loading gives those values."""
  blt_sd, ent_sd, meta = golden_sd
  src = write_pth_dir(tmp_path / "src", blt_sd, _train_args(meta))
  write_pth_dir(src / "entropy_model", ent_sd, _train_args(meta))
  convert.convert_dir(src, tmp_path / "f32")
  convert.convert_dir(src, tmp_path / "bf16", dtype="bfloat16")
  size = lambda d: sum(p.stat().st_size for p in (d / "params").rglob("*") if p.is_file())
  ratio = size(tmp_path / "bf16") / size(tmp_path / "f32")
  assert 0.3 < ratio < 0.6, ratio  # zarr compresses each chunk, so not exactly half
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["params_dtype"] == "bfloat16"
  f32 = loading.load(tmp_path / "f32", dtype="bfloat16")
  bf16 = loading.load(tmp_path / "bf16", dtype="bfloat16")
  _assert_trees_equal(f32.params, bf16.params)
  _assert_trees_equal(f32.entropy_params, bf16.entropy_params)
  assert {x.dtype.name for x in jax.tree.leaves(loading.load(tmp_path / "bf16").params)} == {"float32"}
  with pytest.raises(convert.ConversionError, match="dtype 'fp16'"):
    convert.convert_dir(src, tmp_path / "bad", dtype="fp16")
