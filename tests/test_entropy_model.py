"""Entropy model: golden parity, the released masks (window, documents), chunking without cross-row bleed."""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax.config import EntropyModelConfig, entropy_config_from_reference
from blt_jax.convert.mapping import params_from_state_dict
from blt_jax.entropy_model import chunked_logits, compute_entropies_jit, entropy_from_logits, init_entropy_model

CFG = EntropyModelConfig(dim=32, n_layers=2, n_heads=2, sliding_window=6, max_seqlen=16)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(0), CFG))


def _tokens(seed, B, N):
  return jnp.asarray(np.random.default_rng(seed).integers(4, 260, size=(B, N)), jnp.int32)


def test_golden_entropies(golden):
  arrays, meta = golden
  cfg = entropy_config_from_reference(meta["entropy_model_args"])
  assert cfg.sliding_window == 512  # hard-coded by the reference's load_entropy_model (spec 2.1)
  params = params_from_state_dict(
      {k[len("entropy_model/") :]: v for k, v in arrays.items() if k.startswith("entropy_model/")}, cfg
  )
  tokens = jnp.asarray(arrays["tokens"], jnp.int32)
  logits = chunked_logits(params, tokens, cfg)
  np.testing.assert_allclose(logits, arrays["entropy_logits"], atol=1e-4)
  np.testing.assert_allclose(compute_entropies_jit(params, tokens, cfg), arrays["entropies"], atol=1e-4)


def test_entropy_of_uniform_and_peaked():
  uniform = jnp.zeros((1, 1, 260))
  np.testing.assert_allclose(entropy_from_logits(uniform), np.log(260.0), rtol=1e-6)
  peaked = jnp.zeros((1, 1, 260)).at[..., 7].set(100.0)
  assert float(entropy_from_logits(peaked)[0, 0]) < 1e-6


def test_rows_do_not_bleed_into_each_other(params):
  """The reference flattens rows into shared chunks (Q3); here row 1's entropies ignore row 0."""
  tokens = _tokens(0, 2, 12)
  both = compute_entropies_jit(params, tokens, CFG)
  other = compute_entropies_jit(params, tokens.at[0].set(_tokens(1, 1, 12)[0]), CFG)
  np.testing.assert_allclose(both[1], other[1], atol=1e-6)


def test_context_resets_every_max_seqlen_tokens(params):
  tokens = _tokens(2, 1, 40)  # chunks [0,16), [16,32), [32,40)
  full = compute_entropies_jit(params, tokens, CFG)
  suffix = compute_entropies_jit(params, tokens[:, 16:], CFG)
  np.testing.assert_allclose(full[:, 16:], suffix, atol=1e-5)


def test_sliding_window_and_documents(params):
  cfg = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=4, max_seqlen=64)
  p = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(1), cfg))
  tokens = _tokens(3, 1, 20)
  base = compute_entropies_jit(p, tokens, cfg)
  # One layer with a 4-key window: position t sees tokens t-3..t only.
  changed = compute_entropies_jit(p, tokens.at[0, 5].set(99), cfg)
  np.testing.assert_allclose(changed[0, 9:], base[0, 9:], atol=1e-6)
  assert np.abs(changed[0, 5:9] - base[0, 5:9]).max() > 1e-4
  # A document boundary (EOS at 10) hides everything before it from positions > 10.
  with_eos = tokens.at[0, 10].set(2)
  a = compute_entropies_jit(p, with_eos, cfg)
  b = compute_entropies_jit(p, with_eos.at[0, 8].set(77), cfg)
  np.testing.assert_allclose(a[0, 11:], b[0, 11:], atol=1e-6)


def test_scan_layers_gives_the_same_logits():
  cfg = EntropyModelConfig(dim=32, n_layers=3, n_heads=2, sliding_window=8, max_seqlen=64)
  params = nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(1), cfg))
  tokens = jnp.asarray(np.random.default_rng(2).integers(4, 260, size=(2, 40)), jnp.int32).at[1, 17].set(2)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  np.testing.assert_allclose(chunked_logits(params, tokens, scanned), chunked_logits(params, tokens, cfg), atol=2e-5)
