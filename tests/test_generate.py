"""Cached generation equals the full recompute, byte for byte and logit for logit; sampling; limits; the CLI."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import attention, checkpoint, decode_cache, generate, loading, patching, tokenizer
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import compute_entropies, init_entropy_model
from blt_jax.model import init_blt

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hi", "naïve café, 42 words"]


def _unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def _model(patching_kwargs, seed=0, **blt_overrides):
  """A random tiny BLT (local window 16, so prompts cross it; entropy context 48, so generation crosses a reset)."""
  blt_cfg = BLTConfig(
      **{
          **dict(
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
              encoder_hash_byte_group_size=(3, 4, 6),
              encoder_hash_byte_group_vocab=211,
              encoder_hash_byte_group_nb_functions=2,
              local_attention_window_len=16,
              max_seqlen=128,
              max_encoder_seq_length=128,
          ),
          **blt_overrides,
      }
  )
  ent_cfg = EntropyModelConfig(dim=32, n_layers=2, n_heads=2, sliding_window=16, max_seqlen=48)
  blt_params = _unbox(init_blt(jax.random.PRNGKey(seed), blt_cfg))
  ent_params = _unbox(init_entropy_model(jax.random.PRNGKey(seed + 1), ent_cfg))
  if patching_kwargs.get("mode") == "entropy":
    sample = jnp.asarray([tokenizer.encode(" ".join(PROMPTS))])
    ent = np.asarray(compute_entropies(ent_params, sample, ent_cfg))[0]
    # Each threshold at a quantile of what its rule compares: raw entropies, or their increases e[p-1] - e[p-2]
    # (the monotonic rule compares only those; threshold_add compares both), so patches close after the prompt.
    increases = ent[1:] - ent[:-1]
    if patching_kwargs.get("monotonicity"):
      patching_kwargs = dict(patching_kwargs, threshold=float(np.quantile(increases, 0.6)) + 1e-3)
    else:
      patching_kwargs = dict(patching_kwargs, threshold=float(np.quantile(ent, 0.6)) + 1e-3)
    if patching_kwargs.get("threshold_add") is not None:
      patching_kwargs = dict(
          patching_kwargs,
          threshold=float(np.quantile(ent, 0.3)) + 1e-3,
          threshold_add=float(np.quantile(increases, 0.3)) + 1e-3,
      )
  else:
    ent_cfg = ent_params = None
  # Random weights: an EOS logit of 0 among logits of a few hundred keeps greedy rows going to max_bytes.
  blt_params["local_decoder"]["output"]["kernel"] = (
      blt_params["local_decoder"]["output"]["kernel"].at[:, tokenizer.EOS_ID].set(0.0)
  )
  return loading.LoadedModel(blt_cfg, blt_params, PatchingConfig(**patching_kwargs), ent_cfg, ent_params, "test")


MODELS = {
    "entropy-max_patch_length": lambda: _model(dict(mode="entropy", max_patch_length=3)),
    "entropy-monotonic-allxattn": lambda: _model(
        dict(mode="entropy", monotonicity=True),
        seed=2,
        cross_attn_all_layers_encoder=True,
        cross_attn_k=3,
        n_kv_heads=2,
    ),
    "entropy-threshold_add": lambda: _model(dict(mode="entropy", threshold_add=0.0), seed=6),
    "space": lambda: _model(dict(mode="space"), seed=4, downsampling_by_pooling="avg"),
    "static": lambda: _model(dict(mode="static", patch_size=3), seed=8),
}


@functools.lru_cache(maxsize=None)
def _built(name):
  """Each model built once per session (tests never modify one: they derive others with dataclasses.replace)."""
  return MODELS[name]()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
  return _built(request.param)


def test_cached_greedy_equals_full_recompute(model):
  """Batch of prompts of different lengths, 60 bytes each (prompt + generation crosses the window of 16 and the
  entropy model's 48-token reset): the same bytes and per-step logits within 1e-4."""
  ref = generate.generate_uncached(model, PROMPTS, 60)
  got = generate.generate(model, PROMPTS, 60, record_logits=True, chunk=17)  # chunk boundaries mid-patch
  for r, g in zip(ref, got):
    assert g.continuation == r.continuation and g.stopped == r.stopped == "max_bytes"
    np.testing.assert_allclose(g.logits, r.logits[:, : g.logits.shape[1]], atol=1e-4)
  alone = generate.generate(model, PROMPTS[1:2], 60)[0]  # batch 1
  assert alone.continuation == ref[1].continuation
  # The patcher's own rule (before max_patch_length splits) starts patches among the generated bytes of every row:
  # the cached path closed patches there with its incremental rule (`patching.next_start`) and latent steps.
  assert all(n >= 3 for n in _mode_starts_after_prompt(model, got)), _mode_starts_after_prompt(model, got)


def _mode_starts_after_prompt(m, results):
  """Per row: the positions after the prompt ([BOS] + prompt bytes) that the mode's own rule starts."""
  rows = [tokenizer.encode(r.prompt + r.continuation, add_bos=True, add_eos=False) for r in results]
  tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)  # right padding: causal rules ignore it
  for b, row in enumerate(rows):
    tokens[b, : len(row)] = row
  ent = None
  if m.entropy_config is not None:
    ent = compute_entropies(m.entropy_params, jnp.asarray(tokens), m.entropy_config)
  kwargs = m.patching.patch_kwargs()
  kwargs.pop("max_patch_length")
  starts = np.asarray(patching.mode_starts(jnp.asarray(tokens), ent, include_next_token=True, **kwargs))
  return [
      int(starts[b, len(tokenizer.encode(r.prompt, add_bos=True, add_eos=False)) + 1 : len(rows[b])].sum())
      for b, r in enumerate(results)
  ]


@pytest.mark.parametrize("window,context_len,kv_heads", [(None, None, 4), (64, 200, 2)])
def test_prefill_attention_on_new_keys_equals_attention_over_the_cache(window, context_len, kv_heads):
  """A prefill (`fresh`) runs the model's self-attention kernel on the prompt's own keys; over 300 positions that is
  the blocked kernel, with windows and context resets (positions // context_len) crossing its blocks. Its outputs
  and the caches it writes equal the dense masked attention over the whole (empty-before) cache."""
  S, B, capacity = 300, 2, 320
  assert attention.choose_impl("auto", S, context_len is not None) == "blocked"
  stack = EntropyModelConfig(
      dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, sliding_window=window, max_seqlen=context_len or 8192
  ).stack()
  params = _unbox(
      init_entropy_model(jax.random.PRNGKey(3), EntropyModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads))
  )
  x_BSD = jax.random.normal(jax.random.PRNGKey(4), (B, S, 64), jnp.float32)
  pos_BS = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
  caches = decode_cache.empty_caches(stack, B, capacity)
  run = jax.jit(
      lambda fresh: decode_cache.stack_forward(stack, params, x_BSD, pos_BS, caches, context_len, fresh=fresh),
      static_argnums=0,
  )
  (h_fresh, caches_fresh), (h_dense, caches_dense) = run(True), run(False)
  np.testing.assert_allclose(h_fresh, h_dense, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(caches_fresh[0]["k"], caches_dense[0]["k"])  # layer 0's keys: same inputs
  for got, want in zip(caches_fresh, caches_dense):  # later layers' keys: inputs within float rounding
    np.testing.assert_allclose(got["k"], want["k"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got["v"], want["v"], atol=2e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_independent_of_the_batch():
  m = _built("space")
  sampling = generate.Sampling(temperature=0.9, top_k=40, top_p=0.95)
  alone = generate.generate(m, ["Once upon"], 32, sampling=sampling, seed=7)[0].continuation
  # Row b samples from stream b (its position in the prompt list): a repeated prompt gets samples of its own.
  rows = generate.generate(m, ["Once upon", "Once upon", "another prompt"], 32, sampling=sampling, seed=7)
  assert rows[0].continuation == alone and rows[1].continuation != alone
  # A row's output is its prompt's, seed's and stream's, whatever the other rows (same shapes: no new compile).
  moved = generate.generate(m, ["x", "Once upon", "another prompt"], 32, sampling=sampling, seed=7, streams=[1, 0, 2])
  assert moved[1].continuation == alone and moved[2].continuation == rows[2].continuation
  assert generate.generate(m, ["Once upon"], 32, sampling=sampling, seed=8)[0].continuation != alone
  greedy = generate.generate(m, ["Once upon"], 32)[0].continuation
  assert alone != greedy


def test_choose_masks_non_byte_ids_and_respects_top_k():
  logits = jnp.zeros((2, 260)).at[:, 1].set(50.0).at[:, 0].set(40.0).at[:, 3].set(30.0).at[:, 70].set(5.0)
  assert np.all(np.asarray(generate.choose(logits, None, generate.Sampling())) == 70)
  keys = jnp.stack([jax.random.PRNGKey(0)] * 2)
  picked = generate.choose(logits.at[:, 71].set(4.9), keys, generate.Sampling(temperature=1.0, top_k=2))
  assert set(np.asarray(picked).tolist()) <= {70, 71}


def _draw_frequencies(logits_V, sampling, draws=20000):
  """Empirical frequencies [V] of `draws` rows of `generate.choose` on the same logits, one key each (fixed)."""
  keys = jax.random.split(jax.random.PRNGKey(11), draws)
  ids = np.asarray(
      jax.jit(generate.choose, static_argnums=2)(jnp.broadcast_to(logits_V, (draws,) + logits_V.shape), keys, sampling)
  )
  return np.bincount(ids, minlength=logits_V.shape[0]) / draws


def test_sampling_follows_temperature_top_k_and_top_p():
  """Over 20000 draws with a fixed key the sampler matches its distribution: softmax(logits / T) over byte ids;
  top-k keeps exactly the k largest; top-p keeps exactly the nucleus (the smallest set of the largest
  probabilities with mass >= p), each renormalized. Frequencies within 5 standard errors (+ 1e-3) of the
  probabilities. Mutations seen to fail: top-k filter removed; top-p inverted (keeping the tail)."""
  V = 260
  top = jnp.asarray([4.0, 3.5, 3.0, 2.6, 2.2, 1.5, 1.0, 0.0])  # the mass sits on these ids, byte ids 4..11
  ids = jnp.arange(4, 12)
  logits = jnp.full((V,), -4.0).at[ids].set(top).at[1].set(9.0)  # id 1 (BOS) is never chosen, however likely
  n = 20000

  def check(freq, probs):
    probs = np.asarray(probs, np.float64)
    tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3
    bad = np.nonzero(np.abs(freq - probs) > tol)[0]
    assert bad.size == 0, [(int(i), float(freq[i]), float(probs[i])) for i in bad]

  byte_logits = logits.at[jnp.asarray(generate.NOT_BYTES)].set(-jnp.inf)
  for temperature in (0.5, 2.0):
    check(
        _draw_frequencies(logits, generate.Sampling(temperature=temperature)), jax.nn.softmax(byte_logits / temperature)
    )
  # Top-k: exactly the 3 largest byte logits, renormalized.
  freq = _draw_frequencies(logits, generate.Sampling(temperature=1.0, top_k=3))
  assert set(np.nonzero(freq)[0].tolist()) == {4, 5, 6}
  check(freq, jax.nn.softmax(jnp.full((V,), -jnp.inf).at[ids[:3]].set(top[:3])))
  # Top-p: the nucleus of p = 0.8 at T = 1 is the ids whose preceding (sorted) mass is below 0.8.
  probs = np.asarray(jax.nn.softmax(byte_logits), np.float64)
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[before < 0.8]
  assert 2 <= len(nucleus) <= 5, nucleus  # a real cut: neither one id nor all of them
  freq = _draw_frequencies(logits, generate.Sampling(temperature=1.0, top_p=0.8))
  assert set(np.nonzero(freq)[0].tolist()) == set(nucleus.tolist())
  check(freq, np.where(np.isin(np.arange(V), nucleus), probs, 0.0) / probs[nucleus].sum())


def test_stop_strings_and_eos_end_rows():
  m = _built("space")
  # The sampling test's greedy shapes (one prompt of 9 bytes, 32 bytes): its compiled programs serve here too.
  full = generate.generate(m, ["Once upon"], 32)[0].continuation
  stop = full[10:13]
  cut = generate.generate(m, ["Once upon"], 32, stop=[stop], chunk=8)[0]
  assert cut.stopped == "stop" and cut.continuation == full[: full.find(stop)]
  # All logits equal: the first id that may be chosen is EOS (0, 1, 3 are masked), so the row ends at once.
  bias = dict(m.params)
  out = dict(bias["local_decoder"]["output"])
  out["kernel"] = jnp.zeros_like(out["kernel"])
  eos_model = dataclasses.replace(m, params=dict(bias, local_decoder=dict(bias["local_decoder"], output=out)))
  r = generate.generate(eos_model, ["Once upon"], 32)[0]  # the same shapes, other params: nothing new to compile
  assert r.stopped == "eos" and r.continuation == b""


def test_streamed_bytes_never_hold_part_of_a_stop_string():
  """`on_bytes` (the CLI's stdout) gets only bytes no stop string can cut: a stop string that completes in the next
  chunk took back nothing already written."""
  m = _built("space")
  full = generate.generate(m, ["Once upon"], 32)[0].continuation  # the stop-string test's shapes and programs
  k = next(k for k in range(7, 30, 8) if full.find(full[k : k + 2]) == k)  # starts in one chunk of 8, ends in the next
  pieces = []
  collect = lambda row, data: pieces.append(data)
  cut = generate.generate(m, ["Once upon"], 32, stop=[full[k : k + 2]], chunk=8, on_bytes=collect)[0]
  assert cut.stopped == "stop" and cut.continuation == full[:k]
  assert b"".join(pieces) == full[:k], pieces
  pieces.clear()  # no stop string completes: every byte comes out, the held-back ones at the end
  generate.generate(m, ["Once upon"], 32, stop=[full[-1:] + b"\xff"], chunk=8, on_bytes=collect)
  assert b"".join(pieces) == full


def test_a_limit_reached_after_the_last_byte_is_no_error():
  """The open patch's limit matters only for a byte that would follow: a row that produced every byte asked ends at
  max_bytes (static patches of 8 after [BOS]'s, max_patch_bytes 5: "ab" + 3 bytes fill one)."""
  m = dataclasses.replace(_built("space"), patching=PatchingConfig(mode="static", patch_size=8))
  r = generate.generate(m, ["ab"], 3, max_patch_bytes=5)[0]
  assert r.stopped == "max_bytes" and len(r.continuation) == 3
  assert r.continuation == generate.generate_uncached(m, ["ab"], 3)[0].continuation


def test_limits_are_clear_errors():
  m = _built("entropy-max_patch_length")
  with pytest.raises(ValueError, match="max_encoder_seq_length=128"):
    generate.generate(m, ["x" * 100], 40)
  # More patches than the global model's max_seqlen: byte patching, 24 slots.
  small = dataclasses.replace(
      m, config=dataclasses.replace(m.config, max_seqlen=24), patching=PatchingConfig(mode="byte")
  )
  r = generate.generate(small, ["abc"], 40)[0]
  assert r.stopped == generate.ERRORS[2] and 0 < len(r.continuation) < 40
  ref = generate.generate_uncached(small, ["abc"], len(r.continuation))[0]
  assert ref.continuation == r.continuation  # exact up to the limit
  # An open patch longer than the encoder's look-back: space patching, no spaces in the output of a long run.
  r = generate.generate(_built("space"), ["a" * 30], 8, max_patch_bytes=8)[0]
  assert r.stopped == generate.ERRORS[1]


def test_bad_prompt_records_and_flags_are_one_line_errors(tmp_path, capsys):
  """The CLI names the record (file:line) or the flag in one line, before loading a model; the API refuses a prompt
  that is not text or bytes (it made 5 into five NUL bytes) and a chunk that could never end."""
  (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
  (tmp_path / "q.jsonl").write_text('{"prompt": null}\n')
  for args, where in (
      (["--prompts", "p.jsonl"], "p.jsonl:2: "),
      (["--prompts", "q.jsonl"], "q.jsonl:1: "),
      (["--prompt", "x", "--chunk-bytes", "-3"], "--chunk-bytes=-3"),
      (["--prompt", "x", "--max-bytes", "0"], "--max-bytes=0"),
      (["--prompt", "x", "--max-patch-bytes", "0"], "--max-patch-bytes=0"),
      (["--prompt", "x", "--top-p", "0"], "--top-p=0.0"),
  ):
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    assert generate.main(["--checkpoint", str(tmp_path / "no_checkpoint")] + args) == 2
    err = capsys.readouterr().err
    assert where in err and len(err.strip().splitlines()) == 1, err
  m = _built("space")
  for prompts, kwargs, message in (
      (["a", 5], {}, r"prompts\[1\] is int"),
      (["a", None], {}, "NoneType"),
      (["a"], dict(chunk=-3), "chunk=-3"),
      (["a"], dict(max_patch_bytes=-1), "=-1"),
  ):
    with pytest.raises(ValueError, match=message):
      generate.generate(m, prompts, 4, **kwargs)


def test_cli_streams_the_continuation_only(tmp_path):
  m = _built("space")
  checkpoint.save_params(
      tmp_path / "ckpt",
      m.params,
      {"format": "blt_jax", "model_type": "blt", "model": m.config.to_dict(), "patching": m.patching.to_dict()},
  )
  expected = generate.generate(m, ["Hello", "Bye"], 20)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = subprocess.run(
      [
          sys.executable,
          "-m",
          "blt_jax.generate",
          "--checkpoint",
          "ckpt",
          "--prompt",
          "Hello",
          "--max-bytes",
          "20",
          "--raw",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr.decode()
  assert run.stdout == expected[0].continuation
  # --prompts in batches of 2: the lines equal one sampled batch of all three (streams are file positions).
  prompts = ["Hello", "Bye", "Hello"]
  sampled = generate.generate(m, prompts, 20, sampling=generate.Sampling(temperature=1.0), seed=3)
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
  run = subprocess.run(
      [
          sys.executable,
          "-m",
          "blt_jax.generate",
          "--checkpoint",
          "ckpt",
          "--prompts",
          "p.jsonl",
          "--max-bytes",
          "20",
          "--temperature",
          "1",
          "--seed",
          "3",
          "--batch-size",
          "2",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      timeout=300,
      text=True,
  )
  assert run.returncode == 0, run.stderr
  lines = [json.loads(line) for line in run.stdout.splitlines()]
  assert [line["continuation"] for line in lines] == [e.continuation.decode("utf-8", "replace") for e in sampled]
  assert lines[0]["continuation"] != lines[2]["continuation"]  # a repeated prompt gets its own sample
  bad = subprocess.run(
      [sys.executable, "-m", "blt_jax.generate", "--checkpoint", "nope", "--prompt", "x"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      timeout=300,
      text=True,
  )
  assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
