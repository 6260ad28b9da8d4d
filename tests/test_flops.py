"""The FLOP model: hand-checkable pieces and the scaling the paper relies on."""

from blt_jax import flops
from blt_jax.config import BLTConfig, EntropyModelConfig


def test_entropy_model_flops_match_6n_plus_attention():
  cfg = EntropyModelConfig(dim=64, n_layers=2, n_heads=4, sliding_window=None, ffn_dim_multiplier=1.0)
  seq = 32
  non_embed = 2 * (4 * 64 * 64 + 3 * 64 * 256)
  head = 64 * 260
  attn = 2 * 4 * ((seq + 1) / 2) * 64
  assert flops.entropy_model_train_flops_per_byte(cfg, seq) == 6 * (non_embed + head) + 3 * attn


def test_global_cost_per_byte_falls_with_patch_length():
  cfg = BLTConfig(n_layers_global=25)
  short, long = (flops.blt_train_flops_per_byte(cfg, 8192, m) for m in (2.0, 8.0))
  assert long < short
  # The global transformer dominates a 1B BLT: doubling the patch length removes most of its share.
  assert flops.blt_train_flops_per_byte(cfg, 8192, 4.0) / flops.blt_train_flops_per_byte(cfg, 8192, 8.0) > 1.5


def test_mfu():
  assert flops.mfu(1e9, 1e3, 1e13) == 1e-1
  assert flops.mfu(1e9, 1e3, 0.0) == 0.0


def test_token_model_flops_are_per_token_cost_over_bytes_per_token():
  cfg = EntropyModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=4096, sliding_window=None)
  per_token = flops.entropy_model_train_flops_per_byte(cfg, 64)
  assert flops.token_model_train_flops_per_byte(cfg, 64, 4.0) == per_token / 4.0
  # The vocabulary-sized head is part of the per-token cost.
  small = EntropyModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=260, sliding_window=None)
  assert per_token - flops.entropy_model_train_flops_per_byte(small, 64) == 3 * 2 * 64 * (4096 - 260)


def test_inference_is_one_third_of_training():
  cfg = BLTConfig(n_layers_global=2)
  train = flops.blt_train_flops_per_byte(cfg, 1024, 4.0)
  assert flops.inference_flops_per_byte(train) * 3 == train
