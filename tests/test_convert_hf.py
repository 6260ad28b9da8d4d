"""Hugging Face transformers layout: tiny random `BltForCausalLM`s built here -> blt_jax -> transformers again.

Levanter-style: the source model is the torch implementation itself (transformers, CPU), with random weights; the
numbers compared are logits for given patch lengths, the patcher's entropies and patch lengths, the logits of
transformers' own in-forward patching, and a full import -> export -> `from_pretrained` round trip. Rows are one
document each, `[BOS] bytes` (transformers has no document split; blt_jax's rule agrees on such rows).
"""

import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.blt import modeling_blt  # noqa: E402

from blt_jax import convert, export, patching, tokenizer  # noqa: E402
from blt_jax.convert import hf, safetensors_io  # noqa: E402
from blt_jax.entropy_model import compute_entropies  # noqa: E402
from blt_jax.model import BLT  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
TEXTS = ("BLT reads bytes: patches of high entropy!", "Ünïcödé bytes & a second row, a bit longer.")

# Local GQA (so transformers' cross-attention is GQA too), global GQA, sliding windows of 6 over 40+ bytes,
# explicit FFN widths that the reference's rule would not give, one cross-attention in the encoder.
GQA_WINDOW = dict(
    vocab_size=260,
    max_position_embeddings=64,
    local_attention_window_len=6,
    cross_attn_k=2,
    encoder_hash_byte_group_size=[3, 4, 5],
    encoder_hash_byte_group_vocab=37,
    encoder_hash_byte_group_nb_functions=1,
    patcher_config=dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=40,
        sliding_window=6,
        max_position_embeddings=128,
    ),
    encoder_config=dict(
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        cross_attn_all_layers=False,
        cross_attn_k=2,
        hidden_size_global=32,
        intermediate_size=24,
        max_position_embeddings=128,
    ),
    decoder_config=dict(
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        cross_attn_all_layers=True,
        cross_attn_k=2,
        hidden_size_global=32,
        intermediate_size=40,
        max_position_embeddings=128,
    ),
    global_config=dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=48,
        max_position_embeddings=64,
    ),
)
# All-layer encoder cross-attention (the one by-design difference), k=3 (global input projection 48 -> 32), three
# hash functions, decoder with fewer heads than the encoder and GQA, global GQA, no windows.
ALL_LAYERS_K3 = dict(
    vocab_size=260,
    max_position_embeddings=64,
    local_attention_window_len=None,
    cross_attn_k=3,
    encoder_hash_byte_group_size=[2, 3],
    encoder_hash_byte_group_vocab=29,
    encoder_hash_byte_group_nb_functions=3,
    patcher_config=dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        sliding_window=None,
        max_position_embeddings=128,
    ),
    encoder_config=dict(
        hidden_size=16,
        num_attention_heads=4,
        num_hidden_layers=2,
        cross_attn_all_layers=True,
        cross_attn_k=3,
        hidden_size_global=32,
        intermediate_size=32,
        max_position_embeddings=128,
    ),
    decoder_config=dict(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        cross_attn_all_layers=False,
        cross_attn_k=3,
        hidden_size_global=32,
        intermediate_size=24,
        max_position_embeddings=128,
    ),
    global_config=dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=40,
        max_position_embeddings=64,
    ),
)
CONFIGS = {"gqa_window": GQA_WINDOW, "all_layers_k3": ALL_LAYERS_K3}


def _tokens(texts=TEXTS):
  rows = [tokenizer.encode(t, add_eos=False) for t in texts]
  n = min(len(r) for r in rows)
  return np.stack([r[:n] for r in rows]).astype(np.int64)  # [BOS] bytes, no EOS/BOS inside


def build_hf_model(spec, seed=0):
  """A random BltForCausalLM; norm weights randomised too, so a swapped norm cannot go unnoticed."""
  torch.manual_seed(seed)
  model = transformers.BltForCausalLM(transformers.BltConfig(**spec)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  return model


def _threshold_between(entropies):
  """A threshold in the widest gap near the median (no entropy within float noise of it)."""
  e = np.sort(np.asarray(entropies).ravel()[1:])
  mid = len(e) // 2
  lo, hi = mid - len(e) // 4, mid + len(e) // 4
  i = lo + int(np.argmax(np.diff(e[lo:hi])))
  return float((e[i] + e[i + 1]) / 2)


def hf_logits(model, ids, patch_lengths=None):
  with torch.no_grad():
    kwargs = {} if patch_lengths is None else {"patch_lengths": torch.as_tensor(np.asarray(patch_lengths))}
    return model(input_ids=torch.as_tensor(ids), use_cache=False, **kwargs).logits.float().numpy()


def hf_patcher(model, ids, threshold):
  with torch.no_grad():
    entropies, lengths, _ = model.model.patcher(
        torch.as_tensor(ids), patch_size=model.config.patch_size, threshold=threshold
    )
  return entropies.numpy(), lengths.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """(name, transformers model, its saved dir, converted blt_jax checkpoint dir)."""
  name = request.param
  model = build_hf_model(CONFIGS[name])
  entropies, _ = hf_patcher(model, _tokens(), threshold=0.0)
  model.config.patching_threshold = _threshold_between(entropies)  # a mix of patch sizes
  root = tmp_path_factory.mktemp(name)
  model.save_pretrained(root / "hf")
  convert.convert_dir(root / "hf", root / "ckpt", format="hf")
  return name, model, root / "hf", root / "ckpt"


def _forward(config):
  return jax.jit(lambda p, t, l: BLT(config).apply({"params": p}, t, l))


def _given_lengths(n):
  """Two rows of patch lengths summing to N+1, one padded with zero-length patches."""
  a = [1, 3, 5, 2, 7, 4]
  a.append(n + 1 - sum(a))
  b = [1] + [4] * ((n - 1) // 4)
  b.append(n + 1 - sum(b))
  width = max(len(a), len(b)) + 2
  return np.array([a + [0] * (width - len(a)), b + [0] * (width - len(b))], np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Parity with BltForCausalLM.


def test_logits_parity_given_patch_lengths(case):
  name, model, _, ckpt = case
  config, params, _ = convert.load_converted(ckpt)
  ids = _tokens()
  lengths = _given_lengths(ids.shape[1])
  ours = np.asarray(_forward(config)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths)))
  theirs = hf_logits(model, ids, lengths)
  diff = float(np.abs(ours - theirs).max())
  print(f"\n[{name}] logits max |blt_jax - transformers| = {diff:.2e} (given patch lengths)")
  assert diff < TOL


def test_patcher_entropies_lengths_and_in_forward_logits(case):
  """The patcher transformers runs inside forward: same entropies, same patches, same logits."""
  name, model, _, ckpt = case
  config, params, patch_cfg = convert.load_converted(ckpt)
  ent_cfg, ent_params, _ = convert.load_converted(ckpt / "entropy_model")
  assert patch_cfg.mode == "entropy" and patch_cfg.threshold == model.config.patching_threshold
  assert patch_cfg.threshold_add is None and not patch_cfg.monotonicity
  forward = _forward(config)
  ids = _tokens()
  n = ids.shape[1]
  ours_ent = np.asarray(compute_entropies(ent_params, jnp.asarray(ids, jnp.int32), ent_cfg))
  ent_diffs, logit_diffs, counts = [], [], []
  for row in range(ids.shape[0]):
    theirs_ent, theirs_len = hf_patcher(model, ids[row : row + 1], patch_cfg.threshold)
    ent_diffs.append(float(np.abs(ours_ent[row] - theirs_ent[0]).max()))
    patches = patching.patch(
        jnp.asarray(ids[row : row + 1], jnp.int32),
        jnp.asarray(ours_ent[row : row + 1]),
        max_patches=n + 1,
        **patch_cfg.patch_kwargs(),
    )
    ours_len = np.asarray(patches.patch_lengths_BP)[0]
    ours_len = ours_len[: int((ours_len > 0).sum())]
    # transformers' lengths cover the N bytes; ours also the next-token position (spec 3.2): the last patch holds
    # it, or it opens a patch of its own (transformers then ends with a zero-length patch).
    theirs = theirs_len[0].copy()
    theirs[-1] += 1
    np.testing.assert_array_equal(ours_len, theirs)
    counts.append(len(ours_len))
    ours = np.asarray(forward(params, jnp.asarray(ids[row : row + 1], jnp.int32), patches.patch_lengths_BP))
    logit_diffs.append(float(np.abs(ours - hf_logits(model, ids[row : row + 1])).max()))
  print(
      f"\n[{name}] entropies max diff {max(ent_diffs):.2e}; patches per row {counts} of {n} bytes; "
      f"in-forward-patching logits max diff {max(logit_diffs):.2e}"
  )
  assert max(ent_diffs) < TOL and max(logit_diffs) < TOL
  assert all(2 < c < n for c in counts)  # a real mix of patch sizes


def test_round_trip_import_export_transformers(case, tmp_path):
  """transformers -> blt_jax -> transformers: every tensor identical, config read back the same, same logits."""
  name, model, _, ckpt = case
  summary = export.export_hf(ckpt, tmp_path / "hf")
  assert summary["problems"] == [] and summary["patcher"]
  again = transformers.BltForCausalLM.from_pretrained(tmp_path / "hf").eval()
  want, got = model.state_dict(), again.state_dict()
  assert want.keys() == got.keys()
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
  for field in (
      "patching_threshold",
      "local_attention_window_len",
      "cross_attn_k",
      "encoder_hash_byte_group_size",
      "encoder_hash_byte_group_vocab",
      "encoder_hash_byte_group_nb_functions",
      "patch_in_forward",
  ):
    assert getattr(again.config, field) == getattr(model.config, field), field
  for sub in ("encoder_config", "decoder_config", "global_config", "patcher_config"):
    a, b = getattr(again.config, sub).to_dict(), getattr(model.config, sub).to_dict()
    for field in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "intermediate_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "cross_attn_all_layers",
        "sliding_window",
    ):
      assert a.get(field) == b.get(field), (sub, field)
  ids = _tokens()
  diff = float(np.abs(hf_logits(again, ids[:1]) - hf_logits(model, ids[:1])).max())
  print(f"\n[{name}] round trip: logits max diff {diff:.1e}")
  assert diff == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The by-design difference: all-layer encoder cross-attention.


def _pool_once_encoder_forward(
    self,
    input_ids=None,
    inputs_embeds=None,
    patch_embeds=None,
    attention_mask=None,
    position_ids=None,
    cache=None,
    encoder_attention_mask=None,
    num_patches=None,
    patch_ids=None,
    **kwargs,
):
  """BltLocalEncoder.forward with the reference's rule: patch queries pooled once, then refined by every layer's
  cross-attention (written for this test from spec 7; transformers re-pools before each one)."""
  h = inputs_embeds
  batch = h.shape[0]
  positions = torch.arange(h.shape[1])[None].expand(batch, -1)
  rope = self.rotary_emb(h, positions)
  patches = None
  for i, layer in enumerate(self.layers):
    h = layer(h, position_embeddings=rope, attention_mask=attention_mask)
    if i == len(self.layers) - 1 or self.config.cross_attn_all_layers:
      if patches is None:
        pooled = self.patch_reduce(h, num_patches, patch_ids)
        patches = self.patch_embedding_projection(pooled).reshape(batch, -1, self.config.hidden_size)
      cross = self.cross_attn_layers[i if self.config.cross_attn_all_layers else 0]
      out, _ = cross(hidden_states=patches, cross_attention_states=h, attention_mask=encoder_attention_mask)
      patches = patches + out
  return h, patches


def test_all_layer_encoder_cross_attention_both_behaviours(tmp_path):
  model = build_hf_model(ALL_LAYERS_K3, seed=3)
  model.save_pretrained(tmp_path / "hf")
  ids = _tokens()
  lengths = _given_lengths(ids.shape[1])
  stock = hf_logits(model, ids, lengths)
  with mock.patch.object(modeling_blt.BltLocalEncoder, "forward", _pool_once_encoder_forward):
    pooled_once = hf_logits(model, ids, lengths)

  diffs = {}
  for choice, want in (("transformers", stock), ("reference", pooled_once)):
    config, params = convert.convert(
        tmp_path / "hf", format="hf", choices=convert.ImportChoices(encoder_pooling=choice)
    )
    assert config.encoder_repool_patches == (choice == "transformers")
    ours = np.asarray(_forward(config)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths)))
    diffs[choice] = float(np.abs(ours - want).max())
    other = pooled_once if choice == "transformers" else stock
    assert np.abs(ours - other).max() > 1e-2  # the two rules really differ on these weights
  print(
      f"\n[all_layers_k3] repool (transformers) vs stock BltForCausalLM: {diffs['transformers']:.2e}; "
      f"pool once (reference) vs BltForCausalLM with a pool-once encoder: {diffs['reference']:.2e}; "
      f"stock vs pool-once logits differ by {np.abs(stock - pooled_once).max():.2f}"
  )
  assert diffs["transformers"] < TOL and diffs["reference"] < TOL

  # The pool-once model cannot be written for transformers without changing what it computes.
  convert.convert_dir(
      tmp_path / "hf", tmp_path / "ckpt", format="hf", choices=convert.ImportChoices(encoder_pooling="reference")
  )
  with pytest.raises(export.ExportError, match="re-pools"):
    export.export_hf(tmp_path / "ckpt", tmp_path / "out")
  summary = export.export_hf(tmp_path / "ckpt", tmp_path / "out", force=True)
  assert len(summary["problems"]) == 1 and "re-pools" in summary["problems"][0]
  assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["import_choices"]["encoder_pooling"] == "reference"


# ---------------------------------------------------------------------------------------------------------------
# Files: bf16, shards, CLI, errors.


def test_bf16_sharded_checkpoint(tmp_path):
  """bf16 weights in three shards with an index, read without torch; logits as transformers' with those weights."""
  model = build_hf_model(GQA_WINDOW, seed=5).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
  assert len(shards) > 1 and (tmp_path / "hf" / hf.INDEX_FILE).is_file()
  with mock.patch.dict(sys.modules, {"torch": None}):  # the reader needs no torch
    config, params = convert.convert(tmp_path / "hf", format="hf")
  fused = np.concatenate(
      [
          safetensors_io.read_safetensors(tmp_path / "hf" / s).get(
              "model.encoder_hash_tok_embedding.weight", np.zeros((0, 16), ml_dtypes.bfloat16)
          )
          for s in shards
      ]
  )
  np.testing.assert_array_equal(params["hash_embeddings"]["embedding"].reshape(fused.shape), fused.astype(np.float32))
  assert params["hash_embeddings"]["embedding"].dtype == np.float32
  ids = _tokens()
  lengths = _given_lengths(ids.shape[1])
  ours = np.asarray(_forward(config)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(lengths)))
  # The same bf16 values computed in fp32 (loaded afresh: a cast model would also carry a bf16-rounded RoPE table).
  theirs = hf_logits(
      transformers.BltForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval(), ids, lengths
  )
  diff = float(np.abs(ours - theirs).max())
  print(f"\n[gqa_window bf16, {len(shards)} shards] logits max diff {diff:.2e}")
  assert diff < TOL


@pytest.mark.parametrize("case", ["gqa_window"], indirect=True)
def test_cli_import_and_export(case, tmp_path):
  """Both command lines, from another directory with relative paths; the export loads as is and shards."""
  _, model, hf_dir, _ = case
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  os.symlink(hf_dir, tmp_path / "src")
  run = subprocess.run(
      [sys.executable, "-m", "blt_jax.convert", "--format", "hf", "--src", "src", "--out", "ckpt"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert "entropy_model:" in run.stdout and "encoder_pooling=transformers" in run.stdout
  run = subprocess.run(
      [
          sys.executable,
          "-m",
          "blt_jax.export",
          "--format",
          "hf",
          "--checkpoint",
          "ckpt",
          "--out",
          "out",
          "--dtype",
          "bfloat16",
          "--max-shard-size",
          "50KB",
      ],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert "shards + model.safetensors.index.json" in run.stdout and "model.patcher" in run.stdout
  again = transformers.BltForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert next(again.parameters()).dtype == torch.bfloat16
  for k, v in model.state_dict().items():
    torch.testing.assert_close(again.state_dict()[k].float(), v.to(torch.bfloat16).float(), rtol=0, atol=0, msg=k)
  run = subprocess.run(
      [sys.executable, "-m", "blt_jax.export", "--checkpoint", "ckpt", "--out", "out"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert run.returncode == 2 and "already exists" in run.stderr and "Traceback" not in run.stderr


def _rewrite(src, dst, edit):
  """Copy of a transformers dir whose single safetensors file goes through `edit(tensors)`."""
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = dict(safetensors_io.read_safetensors(src / "model.safetensors", mmap=False))
  edit(tensors)
  safetensors_io.write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})
  return dst


@pytest.mark.parametrize("case", ["gqa_window"], indirect=True)
def test_errors_name_the_tensors(case, tmp_path):
  _, _, hf_dir, _ = case

  def error(src):
    with pytest.raises(convert.ConversionError) as e:
      convert.convert(src, format="hf")
    return str(e.value)

  msg = error(
      _rewrite(hf_dir, tmp_path / "missing", lambda t: t.pop("model.local_decoder.cross_attn_layers.1.k_norm.weight"))
  )
  assert "missing 1 tensor(s): model.local_decoder.cross_attn_layers.1.k_norm.weight" in msg
  msg = error(
      _rewrite(
          hf_dir,
          tmp_path / "extra",
          lambda t: t.update({"model.local_encoder.layers.1.mlp.up_proj.weight": np.zeros((24, 16), np.float32)}),
      )
  )
  assert "unexpected 1 tensor(s): model.local_encoder.layers.1.mlp.up_proj.weight" in msg
  msg = error(
      _rewrite(
          hf_dir,
          tmp_path / "shape",
          lambda t: t.update({"model.encoder_hash_tok_embedding.weight": np.zeros((110, 16), np.float32)}),
      )
  )
  assert "model.encoder_hash_tok_embedding.weight: got (110, 16), expected (111, 16)" in msg
  # GQA cross-attention: the kv projection holds 2 heads of 4 rows, not 4.
  msg = error(
      _rewrite(
          hf_dir,
          tmp_path / "kv",
          lambda t: t.update({"model.local_encoder.cross_attn_layers.0.k_proj.weight": np.zeros((16, 16), np.float32)}),
      )
  )
  assert "model.local_encoder.cross_attn_layers.0.k_proj.weight: got (16, 16), expected (8, 16)" in msg
  # Wrong --format either way round, and a reference-layout config under --format hf.
  with pytest.raises(convert.ConversionError, match="--format hf"):
    convert.convert(hf_dir, format="reference")
  (tmp_path / "ref").mkdir()
  (tmp_path / "ref" / "config.json").write_text(json.dumps({"args": {"dim_global": 32}}))
  with pytest.raises(convert.ConversionError, match="--format reference"):
    convert.convert(tmp_path / "ref", format="hf")
  with pytest.raises(ValueError, match="format 'hf'"):
    convert.convert(hf_dir, format="reference", choices=convert.ImportChoices())


@pytest.mark.parametrize("case", ["gqa_window"], indirect=True)
def test_export_refuses_what_transformers_cannot_hold(case, tmp_path):
  """A blt_jax model with MHA cross-attention over GQA local stacks: transformers would share kv heads."""
  _, _, _, ckpt = case
  from blt_jax import loading  # pylint: disable=import-outside-toplevel

  m = loading.load(ckpt)
  kernel = np.array(m.params["local_encoder"]["cross_attn_layers_0"]["wk"]["kernel"])
  kernel[:, 4:8] += 1.0  # query heads 0 and 1 no longer share their kv head
  m.params["local_encoder"]["cross_attn_layers_0"]["wk"]["kernel"] = kernel
  with pytest.raises(export.ExportError, match="cross_attn_layers_0/wk.*share each kv head"):
    export.export_hf(m, tmp_path / "out")
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Imported checkpoints drive the rest of the package like any other.


@pytest.mark.parametrize("case", ["gqa_window"], indirect=True)
def test_scoring_an_imported_checkpoint(case):
  """blt_jax.score on the imported checkpoint = the NLL of transformers' own forward (its in-forward patching)."""
  name, model, _, ckpt = case
  from blt_jax.score import Scorer  # pylint: disable=import-outside-toplevel

  scorer = Scorer(str(ckpt), batch_bytes=64 * len(jax.local_devices()))
  text = TEXTS[0]
  (score,) = scorer.score_texts([text])
  ids = tokenizer.encode(text, add_eos=False)[None].astype(np.int64)
  logp = torch.log_softmax(torch.as_tensor(hf_logits(model, ids)), -1).numpy()[0]
  want = -float(sum(logp[t, ids[0, t + 1]] for t in range(ids.shape[1] - 1)))
  print(f"\n[{name}] scorer nll {score.nll_nats:.5f} vs transformers {want:.5f}")
  assert score.n_bytes == ids.shape[1] - 1
  assert abs(score.nll_nats - want) < 1e-3


@pytest.mark.parametrize("case", ["gqa_window", "all_layers_k3"], indirect=True)
def test_generation_from_an_imported_checkpoint(case):
  """blt_jax.generate (cached) on the imported checkpoint: every step's logits = transformers' forward (its own
  in-forward patching) over the same prefix."""
  name, model, _, ckpt = case
  from blt_jax import generate  # pylint: disable=import-outside-toplevel

  prompt = TEXTS[0][:20]
  (result,) = generate.generate(str(ckpt), [prompt], max_bytes=6, record_logits=True)
  ids = tokenizer.encode(prompt, add_eos=False).astype(np.int64).tolist()
  diffs = []
  for step in range(len(result.logits)):  # the step that chose EOS (if any) has logits but no byte
    theirs = hf_logits(model, np.asarray([ids]))[0, -1]
    diffs.append(float(np.abs(result.logits[step] - theirs).max()))
    if step < len(result.continuation):
      ids.append(result.continuation[step] + tokenizer.OFFSET)
  print(f"\n[{name}] generation: {len(diffs)} steps, per-step logits max diff {max(diffs):.2e}")
  assert max(diffs) < TOL
