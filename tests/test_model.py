"""The full BLT forward: golden parity with the reference, invariances, causality, no recompiles."""

import collections
import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import patching
from blt_jax.config import REMAT_POLICIES, BLTConfig, EntropyModelConfig, blt_config_from_reference, entropy_config_from_reference
from blt_jax.convert.mapping import params_from_state_dict
from blt_jax.entropy_model import compute_entropies, init_entropy_model
from blt_jax.model import BLT, init_blt

TOL = 1e-4


@pytest.fixture(scope="module")
def golden_models(golden):
  arrays, meta = golden
  blt_cfg = blt_config_from_reference(meta["blt_args"])
  ent_cfg = entropy_config_from_reference(meta["entropy_model_args"])
  strip = lambda prefix: {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
  return (
      blt_cfg,
      params_from_state_dict(strip("blt/"), blt_cfg),
      ent_cfg,
      params_from_state_dict(strip("entropy_model/"), ent_cfg),
  )


def test_golden_end_to_end(golden, golden_models):
  """tokens -> entropies -> patches -> encoder -> global -> logits, each stage against the reference."""
  arrays, meta = golden
  blt_cfg, blt_params, ent_cfg, ent_params = golden_models
  tokens = jnp.asarray(arrays["tokens"], jnp.int32)
  entropies = compute_entropies(ent_params, tokens, ent_cfg)
  np.testing.assert_allclose(entropies, arrays["entropies"], atol=TOL)

  # Boundaries from the reference's entropies: ours agree to 1e-6, but a value within 1e-6 of the threshold
  # would flip a boundary, and the patch rule is tested exactly on its own in test_patching.py.
  P = arrays["patch_lengths_include_next"].shape[1]
  patches = patching.patch(tokens, jnp.asarray(arrays["entropies"]), threshold=meta["threshold"], max_patches=P)
  np.testing.assert_array_equal(patches.patch_lengths_BP, arrays["patch_lengths_include_next"])
  ours = patching.patch(tokens, entropies, threshold=meta["threshold"], max_patches=P)
  np.testing.assert_array_equal(ours.patch_lengths_BP, arrays["patch_lengths_include_next"])
  np.testing.assert_array_equal(patches.patch_ids_BT[:, :-1], arrays["patch_ids"])

  logits, state = BLT(blt_cfg).apply(
      {"params": blt_params}, tokens, patches.patch_lengths_BP, mutable=["intermediates"]
  )
  inter = state["intermediates"]
  np.testing.assert_allclose(inter["local_encoder_h"][0], arrays["blt_local_encoder_h"], atol=TOL)
  np.testing.assert_allclose(inter["local_encoder_patch_h"][0], arrays["blt_local_encoder_patch_h"], atol=TOL)
  # Global states of real patches. The reference ran with sdpa (plain causal), so its zero-length padding patches
  # after row 0's EOS patch also saw the earlier document; with the released block-causal semantics they do not.
  # Those states are never read by the decoder.
  real = np.asarray(arrays["patch_lengths_include_next"]) > 0
  np.testing.assert_allclose(np.asarray(inter["global_h"][0])[real], arrays["blt_global_h"][real], atol=TOL)
  np.testing.assert_allclose(logits, arrays["blt_logits"], atol=TOL)


def test_golden_logits_jitted(golden, golden_models):
  arrays, _ = golden
  blt_cfg, blt_params, _, _ = golden_models
  fwd = jax.jit(lambda p, t, l: BLT(blt_cfg).apply({"params": p}, t, l))
  logits = fwd(
      blt_params, jnp.asarray(arrays["tokens"], jnp.int32), jnp.asarray(arrays["patch_lengths_include_next"], jnp.int32)
  )
  np.testing.assert_allclose(logits, arrays["blt_logits"], atol=TOL)


def test_extra_patch_padding_leaves_logits_unchanged(golden, golden_models):
  arrays, _ = golden
  blt_cfg, blt_params, _, _ = golden_models
  tokens = jnp.asarray(arrays["tokens"], jnp.int32)
  lengths = jnp.asarray(arrays["patch_lengths_include_next"], jnp.int32)
  wide = jnp.pad(lengths, ((0, 0), (0, 25)))
  apply = lambda l: BLT(blt_cfg).apply({"params": blt_params}, tokens, l)
  np.testing.assert_allclose(apply(wide), apply(lengths), atol=1e-5)


def test_trailing_byte_padding_leaves_real_logits_unchanged(golden, golden_models):
  """Padding bytes appended to the last patch (as the data pipeline does) do not change earlier logits."""
  arrays, _ = golden
  blt_cfg, blt_params, _, _ = golden_models
  tokens = jnp.asarray(arrays["tokens"], jnp.int32)
  lengths = np.asarray(arrays["patch_lengths_include_next"])
  n_pad = 7
  padded_tokens = jnp.pad(tokens, ((0, 0), (0, n_pad)))
  padded_lengths = lengths.copy()
  for b in range(len(lengths)):
    last = np.nonzero(lengths[b])[0][-1]
    padded_lengths[b, last] += n_pad
  apply = lambda t, l: BLT(blt_cfg).apply({"params": blt_params}, t, jnp.asarray(l))
  # The last real byte's logits depend on whether the next token opens a patch; compare all bytes before it.
  n = tokens.shape[1]
  np.testing.assert_allclose(
      apply(padded_tokens, padded_lengths)[:, : n - 1], apply(tokens, lengths)[:, : n - 1], atol=1e-5
  )


def test_batch_rows_are_independent(golden, golden_models):
  arrays, _ = golden
  blt_cfg, blt_params, _, _ = golden_models
  tokens = jnp.asarray(arrays["tokens"], jnp.int32)
  lengths = jnp.asarray(arrays["patch_lengths_include_next"], jnp.int32)
  apply = lambda t, l: BLT(blt_cfg).apply({"params": blt_params}, t, l)
  both = apply(tokens, lengths)
  swapped = apply(tokens[::-1], lengths[::-1])
  np.testing.assert_allclose(swapped[::-1], both, atol=1e-5)
  alone = apply(tokens[1:], lengths[1:])
  np.testing.assert_allclose(alone[0], both[1], atol=1e-5)


def _tiny_configs(**blt_overrides):
  blt_cfg = BLTConfig(
      dim_local_encoder=32,
      n_layers_local_encoder=2,
      n_heads_local_encoder=4,
      dim_global=48,
      n_layers_global=2,
      n_heads_global=4,
      dim_local_decoder=32,
      n_layers_local_decoder=2,
      n_heads_local_decoder=4,
      cross_attn_k=2,
      cross_attn_nheads=4,
      encoder_hash_byte_group_size=(3, 4),
      encoder_hash_byte_group_vocab=211,
      encoder_hash_byte_group_nb_functions=2,
      **{"local_attention_window_len": 8, "max_seqlen": 64, "max_encoder_seq_length": 128, **blt_overrides},
  )
  ent_cfg = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=8, max_seqlen=64)
  return blt_cfg, ent_cfg


MODES = [
    dict(mode="entropy", threshold=1.0),
    dict(mode="entropy", threshold=0.5, monotonicity=True),
    dict(mode="entropy", threshold=1.0, threshold_add=0.1, max_patch_length=3),
    dict(mode="space"),
    dict(mode="static", patch_size=3),
    dict(mode="byte"),
]


WINDOWS = dict(
    cross_attn_all_layers_encoder=True,
    cross_attn_window_encoder=2,
    cross_attn_window_decoder=2,
    downsampling_by_pooling="avg",
)
CASES = [(m, {}) for m in MODES] + [(MODES[0], WINDOWS), (MODES[3], WINDOWS)]


@pytest.mark.parametrize(
    "patch_kwargs,blt_overrides",
    CASES,
    ids=[f"{'-'.join(f'{a}{b}' for a, b in m.items())}{'-windows' if o else ''}" for m, o in CASES],
)
def test_no_byte_sees_a_later_byte(patch_kwargs, blt_overrides):
  """Perturb byte t: logits at positions < t do not change, for every patching mode (full pipeline)."""
  blt_cfg, ent_cfg = _tiny_configs(**blt_overrides)
  blt_params = init_blt(jax.random.PRNGKey(0), blt_cfg)
  ent_params = init_entropy_model(jax.random.PRNGKey(1), ent_cfg)
  rng = np.random.default_rng(0)
  N = 40
  tokens = rng.integers(4, 260, size=(2, N)).astype(np.int32)
  tokens[:, 0] = 1
  tokens[0, 17] = 2  # a document boundary inside row 0
  tokens[:, 9] = 32 + 4  # spaces for space patching

  @jax.jit
  def pipeline(tokens):
    entropies = compute_entropies(ent_params, tokens, ent_cfg)
    # Scale the untrained model's entropies (~5.5 nats) so that thresholds give varied patches.
    entropies = (entropies - 5.0) * 4.0
    patches = patching.patch(tokens, entropies, max_patches=N + 1, **patch_kwargs)
    return BLT(blt_cfg).apply({"params": blt_params}, tokens, patches.patch_lengths_BP)

  base = np.asarray(pipeline(jnp.asarray(tokens)))
  for t in (5, 18, 30):
    bumped = tokens.copy()
    bumped[:, t] = (bumped[:, t] - 4 + 37) % 256 + 4
    out = np.asarray(pipeline(jnp.asarray(bumped)))
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, err_msg=f"logits before {t} changed")
    assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4  # the perturbation is visible from t on


def test_forward_and_grad_compile_once():
  blt_cfg, _ = _tiny_configs()
  params = init_blt(jax.random.PRNGKey(0), blt_cfg)
  traces = []

  @jax.jit
  def loss_and_grad(params, tokens, lengths):
    traces.append(1)

    def loss(p):
      logits = BLT(blt_cfg).apply({"params": p}, tokens, lengths)
      return jnp.mean(jax.nn.logsumexp(logits, -1))

    return jax.value_and_grad(loss)(params)

  rng = np.random.default_rng(1)
  for _ in range(3):
    tokens = jnp.asarray(rng.integers(4, 260, size=(2, 24)), jnp.int32)
    starts = jnp.asarray(rng.random((2, 25)) < 0.4)
    lengths = patching.starts_to_patches(patching.limit_patch_length(starts.at[:, :2].set(True), 6), 25)
    value, grads = loss_and_grad(params, tokens, lengths.patch_lengths_BP)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  assert len(traces) == 1


def _remat_loss(cfg):
  """A scalar loss of the tiny BLT's logits on fixed bytes (static patches of 4), as a function of its params."""
  tokens = jnp.asarray(np.random.default_rng(3).integers(4, 260, size=(2, 24)), jnp.int32)
  lengths = patching.patch(tokens, None, mode="static", patch_size=4, max_patches=25).patch_lengths_BP
  return lambda p: jnp.mean(jax.nn.logsumexp(BLT(cfg).apply({"params": p}, tokens, lengths), -1))


def test_remat_gives_the_same_gradients():
  blt_cfg, _ = _tiny_configs()
  params = init_blt(jax.random.PRNGKey(0), blt_cfg)

  def grads(cfg):
    return jax.tree_util.tree_leaves(jax.jit(jax.grad(_remat_loss(cfg)))(params))

  reference = grads(blt_cfg)
  for policy in REMAT_POLICIES:
    remat = grads(dataclasses.replace(blt_cfg, remat=True, remat_policy=policy))
    for a, b in zip(reference, remat):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"remat_policy={policy}")


@pytest.mark.parametrize(
    "policy, kept",
    [
        ("full", set()),
        ("save_qkv_proj", {"query_proj", "key_proj", "value_proj"}),
        ("save_attention_proj", {"query_proj", "key_proj", "value_proj", "out_proj"}),
    ],
)
def test_named_remat_policies_keep_their_projections(policy, kept):
  """A named policy keeps exactly the projections it names for the backward pass (a misspelt tag would keep
  nothing and silently recompute them, with the same gradients)."""
  blt_cfg, _ = _tiny_configs()
  cfg = dataclasses.replace(blt_cfg, remat=True, remat_policy=policy)
  params = init_blt(jax.random.PRNGKey(0), cfg)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(_remat_loss(cfg), params)
  named = collections.Counter(re.findall(r"named '(\w+)'", out.getvalue()))
  assert set(named) == kept
  blocks = cfg.n_layers_local_encoder + cfg.n_layers_global + cfg.n_layers_local_decoder
  assert all(n == blocks for n in named.values()), named  # one of each per block of every stack


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_gives_the_same_logits_and_gradients(remat):
  """The scanned global stack reads the same per-layer params and computes the same function as the loop."""
  blt_cfg = dataclasses.replace(_tiny_configs(remat=remat)[0], n_layers_global=3)
  scan_cfg = dataclasses.replace(blt_cfg, scan_layers=True)
  params = init_blt(jax.random.PRNGKey(0), blt_cfg)
  assert jax.tree.structure(params) == jax.tree.structure(init_blt(jax.random.PRNGKey(0), scan_cfg))
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(4, 260, size=(2, 24)), jnp.int32).at[0, 9].set(2)  # two documents in row 0
  lengths = patching.patch(tokens, None, mode="static", patch_size=3, max_patches=25).patch_lengths_BP

  def logits_and_grads(cfg):
    fwd = lambda p: BLT(cfg).apply({"params": p}, tokens, lengths)
    loss = lambda p: jnp.mean(jax.nn.logsumexp(fwd(p), -1))
    return jax.jit(fwd)(params), jax.jit(jax.grad(loss))(params)

  (ref_logits, ref_grads), (logits, grads) = logits_and_grads(blt_cfg), logits_and_grads(scan_cfg)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# (patching, documents end with EOS as in training rows, or not as in scoring rows)
PACK_CASES = [
    (MODES[0], True),
    (MODES[0], False),
    (MODES[1], False),
    (MODES[2], True),
    (MODES[3], False),
    (MODES[3], True),
    (MODES[4], True),
    (MODES[4], False),
]


@pytest.mark.parametrize(
    "patch_kwargs,with_eos",
    PACK_CASES,
    ids=[f"{'-'.join(f'{a}{b}' for a, b in m.items())}-{'eos' if e else 'noeos'}" for m, e in PACK_CASES],
)
def test_packed_documents_equal_documents_alone(patch_kwargs, with_eos):
  """The document rule end to end: a row of packed documents gives each one the patches and logits it gets alone.

  One document is longer than the entropy model's context (64): its reset counts from the document's start.
  """
  blt_cfg, ent_cfg = _tiny_configs(max_seqlen=256)
  blt_params = init_blt(jax.random.PRNGKey(0), blt_cfg)
  ent_params = init_entropy_model(jax.random.PRNGKey(1), ent_cfg)
  rng = np.random.default_rng(7)
  docs = []
  for length in (13, 75, 9):
    body = rng.integers(4, 260, size=length)
    body[rng.random(length) < 0.2] = 32 + 4  # spaces for space patching
    docs.append([1] + body.tolist() + ([2] if with_eos else []))

  def pipeline(tokens):
    entropies = (compute_entropies(ent_params, tokens, ent_cfg) - 5.0) * 4.0  # varied patches from random weights
    patches = patching.patch(tokens, entropies, max_patches=tokens.shape[1] + 1, **patch_kwargs)
    logits = BLT(blt_cfg).apply({"params": blt_params}, tokens, patches.patch_lengths_BP)
    return jax.nn.log_softmax(logits, -1), patches

  pipeline = jax.jit(pipeline)

  packed = sum(docs, []) + [0] * 5  # right padding, as the scorer's fixed-length rows have
  # One batch: the packed row, then each document alone in a row of the same length (right padding after it, as in
  # the scorer's rows; rows are independent, test_batch_rows_are_independent), so one compile serves all four.
  rows = [packed] + [doc + [0] * (len(packed) - len(doc)) for doc in docs]
  logp, patches = pipeline(jnp.asarray(rows, jnp.int32))
  offset = 0
  for r, doc in enumerate(docs, start=1):
    L = len(doc)
    np.testing.assert_allclose(logp[0, offset : offset + L - 1], logp[r, : L - 1], rtol=1e-5, atol=1e-5)
    # The same patch boundaries inside the document (the next-token slot after it aside).
    ids_packed = np.asarray(patches.patch_ids_BT[0, offset : offset + L])
    np.testing.assert_array_equal(ids_packed - ids_packed[0], np.asarray(patches.patch_ids_BT[r, :L]))
    offset += L


def test_model_input_checks_name_the_problem():
  blt_cfg, _ = _tiny_configs()
  params = init_blt(jax.random.PRNGKey(0), blt_cfg)
  apply = lambda t, l: BLT(blt_cfg).apply({"params": params}, jnp.asarray(t, jnp.int32), jnp.asarray(l, jnp.int32))
  tokens = [[1, 70, 71, 72]]
  with pytest.raises(ValueError, match="first patch must be the single BOS byte"):
    apply(tokens, [[2, 3, 0]])
  with pytest.raises(ValueError, match=r"must sum to N \+ 1 = 5"):
    apply(tokens, [[1, 2, 1]])
  with pytest.raises(ValueError, match="max_encoder_seq_length=128"):
    jax.jit(apply)([[1] + [70] * 200], [[1, 201]])  # shapes are checked at trace time, under jit too
  with pytest.raises(ValueError, match="max_seqlen=64"):
    apply(tokens, [[1, 4] + [0] * 70])
  assert np.isfinite(apply(tokens, [[1, 3, 1, 0]])).all()
