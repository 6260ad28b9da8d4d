"""Model configs: released shapes build abstractly with the spec's parameter counts; bad values are named."""

import pathlib
import sys
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import pytest

from blt_jax import train_config
from blt_jax.config import BLTConfig, EntropyModelConfig, ffn_hidden_dim
from blt_jax.entropy_model import init_entropy_model
from blt_jax.model import init_blt

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name):
  return train_config.load_config_file(str(CONFIGS / f"{name}.py"))


def _counts(tree):
  return {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v)) for k, v in tree.items()}


@pytest.mark.parametrize("dim,expected", [(768, 2048), (1024, 2816), (2048, 5632), (4096, 11008), (32, 256)])
def test_ffn_hidden_dim_matches_spec(dim, expected):
  assert ffn_hidden_dim(dim, 256, 1.0) == expected


def test_blt_1b_parameter_counts():
  cfg = train_config.model_config(load_config("blt_1b"))
  abstract = nn.meta.unbox(jax.eval_shape(lambda: init_blt(jax.random.PRNGKey(0), cfg)))
  counts = _counts(abstract)
  encoder = counts["local_encoder"] + counts["tok_embeddings"]
  assert round(encoder / 1e6, 1) == 19.4  # spec 14.3
  assert round(counts["global_transformer"] / 1e6, 1) == 1284.6
  assert round(counts["local_decoder"] / 1e6, 1) == 157.9
  assert counts["hash_embeddings"] == 6 * 500002 * 1024
  total = sum(counts.values())
  assert round(total / 1e9, 2) == 4.53
  assert round((total - counts["hash_embeddings"]) / 1e9, 2) == 1.46


def test_entropy_100m_parameter_count():
  cfg = train_config.model_config(load_config("entropy_100m"))
  abstract = jax.eval_shape(lambda: init_entropy_model(jax.random.PRNGKey(0), cfg))
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(abstract)))
  assert round(total / 1e6, 1) == 99.5  # spec 2.1


def test_blt_7b_builds_with_global_input_projection():
  cfg = train_config.model_config(load_config("blt_7b"))
  assert cfg.global_input_dim != cfg.dim_global
  abstract = nn.meta.unbox(jax.eval_shape(lambda: init_blt(jax.random.PRNGKey(0), cfg)))
  proj = abstract["global_transformer"]["token_embedding_projection"]["kernel"]
  assert proj.shape == (cfg.global_input_dim, cfg.dim_global)
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract))
  assert 6e9 < total - 6 * 500002 * 1280 < 9e9


@pytest.mark.parametrize("name", ["tiny", "entropy_tiny", "tiny_entropy", "entropy_100m", "blt_1b", "blt_7b"])
def test_shipped_configs_load_and_validate(name):
  cfg = load_config(name)
  train_config.validate(cfg)


def test_bad_values_are_named():
  with pytest.raises(ValueError, match="unknown blt config key"):
    BLTConfig.from_dict({"dim_local_encoder": 8, "bogus": 1})
  with pytest.raises(ValueError, match="dim_local_decoder"):
    BLTConfig(dim_local_encoder=32, dim_local_decoder=64, cross_attn_nheads=4)
  with pytest.raises(ValueError, match="downsampling_by_pooling"):
    BLTConfig(downsampling_by_pooling="median")
  with pytest.raises(ValueError, match="dtype"):
    EntropyModelConfig(dtype="float8")
  cfg = load_config("tiny")
  cfg.seq_len = 100000
  with pytest.raises(ValueError, match="max_encoder_seq_length"):
    train_config.validate(cfg)
  cfg = load_config("tiny")
  cfg.patching.max_patches = cfg.model.max_seqlen + 1
  with pytest.raises(ValueError, match="max_patches=513 .* exceeds model.max_seqlen=512"):
    train_config.validate(cfg)


def test_run_option_values_are_checked():
  for field, value, match in [
      ("checkpoint_on_damaged", "ignore", "checkpoint_on_damaged='ignore'"),
      ("profile_steps", (3,), r"profile_steps=\(3,\)"),
      ("profile_steps", (0, 2), r"1 <= start < stop"),
      ("profile_steps", (5, 5), r"1 <= start < stop"),
  ]:
    cfg = load_config("tiny")
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
      train_config.validate(cfg)
  cfg = load_config("tiny")
  cfg.profile_steps = (10, 13)
  train_config.validate(cfg)


def test_unknown_keys_name_the_closest_field():
  cfg = load_config("tiny")
  assert train_config.unknown_key_error(cfg, "optimizer.lr") is None
  assert train_config.unknown_key_error(cfg, "mesh") is None
  assert "'nonexistent' (" in train_config.unknown_key_error(cfg, "nonexistent")
  assert "did you mean" not in train_config.unknown_key_error(cfg, "optimizer.nope")
  for key, guess in [
      ("lr", "optimizer.lr"),
      ("dim_global", "model.dim_global"),
      ("optimizer.warmpu", "optimizer.warmup"),
      ("modle.dim_global", "model.dim_global"),
      ("seq_lenn", "seq_len"),
  ]:
    assert train_config.unknown_key_error(cfg, key).startswith(f"unknown config key {key!r}; did you mean {guess!r}?")


def test_checkpoint_config_replaces_model_patching_and_entropy_model():
  cfg = load_config("tiny")
  model = BLTConfig(
      dim_local_encoder=32,
      dim_local_decoder=32,
      dim_global=128,
      cross_attn_nheads=4,
      encoder_hash_byte_group_size=(3, 4),
      dtype="bfloat16",
      remat=True,
  ).to_dict()
  meta = {
      "format": "blt_jax",
      "model_type": "blt",
      "model": model,
      "patching": {
          "mode": "entropy",
          "threshold": 1.5,
          "threshold_add": None,
          "monotonicity": False,
          "max_patch_length": None,
          "patch_size": None,
          "compare_dtype": "float32",
      },
  }
  changes = dict(
      (field, (old, new)) for field, old, new in train_config.apply_checkpoint_config(cfg, meta, "/ckpt/entropy_model")
  )
  assert changes["model.dim_local_encoder"] == (64, 32)
  assert changes["model.encoder_hash_byte_group_size"] == ((3, 4, 5, 6), (3, 4))
  assert changes["patching.mode"] == ("space", "entropy") and changes["patching.threshold"][1] == 1.5
  assert changes["entropy_checkpoint"] == ("", "/ckpt/entropy_model")
  assert "model_type" not in changes and "model.dim_global" not in changes  # unchanged fields are not listed
  assert not [f for f in changes if f.endswith((".dtype", ".remat"))]  # run settings, not architecture
  assert train_config.model_config(cfg) == BLTConfig.from_dict({**model, "dtype": "float32", "remat": False})
  assert cfg.patching.max_patches == 0 and cfg.seq_len == 256  # the run's own settings stay
  # An entropy model checkpoint switches the run to training an entropy model.
  cfg = load_config("tiny")
  changes = train_config.apply_checkpoint_config(
      cfg, {"model_type": "entropy_model", "model": EntropyModelConfig(dim=32, n_heads=2).to_dict()}
  )
  assert ("model_type", "blt", "entropy_model") in changes and cfg.entropy_model.dim == 32
  with pytest.raises(ValueError, match="field model.bogus"):
    train_config.apply_checkpoint_config(load_config("tiny"), {"model_type": "blt", "model": {"bogus": 1}})
  with pytest.raises(ValueError, match="model_type='gpt'"):
    train_config.apply_checkpoint_config(load_config("tiny"), {"model_type": "gpt", "model": {}})


def _parse_config_flags(*overrides):
  """configs/tiny.py with `--config.KEY=VALUE` overrides, parsed as `python -m blt_jax.train` parses them."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flag_values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  argv = ["train", f"--config={CONFIGS / 'tiny.py'}", *overrides]
  with mock.patch.object(sys, "argv", argv):  # config_flags reads the overrides from sys.argv
    flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize(
    "key,text,value",
    [
        ("mesh.coordinator_address", "10.0.0.1:1234", "10.0.0.1:1234"),  # str
        ("mesh.num_processes", "4", 4),  # int
        ("mesh.process_id", "3", 3),
        ("data.shuffle_seed", "7", 7),
        ("data.max_eval_batches", "2", 2),
        ("patching.threshold_add", "0.5", 0.5),  # float (a model dataclass field)
        ("model.ngram_vocab_sizes", "(10, 20)", (10, 20)),  # tuple
        (
            "mesh.logical_axis_rules",
            "(('batch', ('data', 'fsdp')), ('embed', None))",
            (("batch", ("data", "fsdp")), ("embed", None)),
        ),
    ],
)
def test_fields_that_default_to_none_can_be_set_on_the_command_line(key, text, value):
  section, field = key.split(".")
  assert load_config("tiny")[section][field] is None
  got = _parse_config_flags(f"--config.{key}={text}")[section][field]
  assert got == value and type(got) is type(value)


def test_bad_values_for_fields_that_default_to_none_are_one_line_errors():
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from blt_jax import train  # pylint: disable=g-import-not-at-top

  with pytest.raises(absl_flags.IllegalFlagValueError) as e:
    _parse_config_flags("--config.mesh.num_processes=four")
  assert train.flag_error(e.value) == (
      "bad value 'four' for config key 'mesh.num_processes': invalid literal for " "int() with base 10: 'four'"
  )
  # Unset, they still read as None, and rules given on the command line are the ones the mesh uses.
  cfg = _parse_config_flags("--config.mesh.logical_axis_rules=(('embed', 'fsdp'),)")
  assert cfg.data.shuffle_seed is None and cfg.mesh.coordinator_address is None
  from blt_jax import sharding  # pylint: disable=g-import-not-at-top

  assert sharding.logical_axis_rules_from_config(cfg.mesh) == (("embed", "fsdp"),)
