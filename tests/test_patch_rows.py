"""Rows cut to a patch budget (`patching.rows="patches"`): every stream token once, never more than max_patches
patches, the step's own patching rule, the step's loss unchanged, exact resume, and eval rows every host agrees on."""

import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import data, patching, steps, tokenizer, train_config
from blt_jax.config import PatchingConfig
from blt_jax.data import packing, patch_rows
from blt_jax.model import init_blt

ROOT = pathlib.Path(__file__).resolve().parents[1]
L = 48  # bytes per row


def _docs(n=30, seed=0):
  """Documents of prose, numbers and code-like runs: patch densities vary within and across them."""
  rng = np.random.default_rng(seed)
  words = ["the", "patch", "of", "x", "=", "1234567", "(a,", "b)", "\n", "entropy", "ok;", "{}", "#"]
  docs = []
  for i in range(n):
    count = int(rng.integers(0, 60)) if i != 3 else 200  # one document spans many rows
    docs.append(f"d{i}: " + " ".join(rng.choice(words, size=count)))
  return docs


def _encoded(docs, seed=0, with_entropies=True):
  rng = np.random.default_rng(seed + 1)
  out = []
  for d in docs:
    ids = tokenizer.encode(d)
    doc = {"ids": ids}
    if with_entropies:
      doc["entropies"] = rng.gamma(2.0, 0.8, size=len(ids)).astype(np.float32)
    out.append(doc)
  return out


def _rows(docs, patcher, seq_len=L, pad_final=True):
  ds = grain.MapDataset.source(docs).map(packing.to_token_doc).to_iter_dataset()
  return list(packing.PackedWindowsIterDataset(ds, seq_len, pad_final=pad_final, row_patcher=patcher))


PATCHINGS = {
    "entropy": PatchingConfig(mode="entropy", threshold=1.6),
    "entropy_monotonic_maxlen": PatchingConfig(mode="entropy", threshold=0.5, monotonicity=True, max_patch_length=5),
    "entropy_add": PatchingConfig(mode="entropy", threshold=1.2, threshold_add=0.3),
    "space": PatchingConfig(mode="space"),
    "static": PatchingConfig(mode="static", patch_size=3),
}


@pytest.mark.parametrize("name", sorted(PATCHINGS))
@pytest.mark.parametrize("max_patches", [2, 7, 16])
def test_rows_hold_every_token_once_within_the_budget(name, max_patches):
  docs = _encoded(_docs())
  patcher = patch_rows.RowPatcher(PATCHINGS[name].patch_kwargs(), max_patches, L)
  rows = _rows(docs, patcher)
  stream = np.concatenate([d["ids"] for d in docs])
  real = [r["loss_mask"] > 0 for r in rows]
  # Every stream token is an input once and every later one a target once, in order; real positions come first.
  np.testing.assert_array_equal(np.concatenate([r["tokens"][m] for r, m in zip(rows, real)]), stream[:-1])
  np.testing.assert_array_equal(np.concatenate([r["targets"][m] for r, m in zip(rows, real)]), stream[1:])
  entropies = np.concatenate([d["entropies"] for d in docs])
  np.testing.assert_array_equal(np.concatenate([r["entropies"][m] for r, m in zip(rows, real)]), entropies[:-1])
  for r, m in zip(rows, real):
    length = int(m.sum())
    assert np.all(m[:length]) and not np.any(m[length:])
    starts = np.asarray(patch_rows.step_starts(jnp.asarray(r[patch_rows.STARTS][None])))[0]
    assert starts[0] and starts[1]  # the model's first patch is one byte
    assert not np.any(starts[length + 1 :])  # padding joins the last patch
    assert starts.sum() <= max_patches
  # The budget is what ends a short row: a byte more would need max_patches + 1 patches (all but the last row).
  for r, m in zip(rows[:-1], real[:-1]):
    if m.sum() < L:
      assert 1 + r[patch_rows.STARTS].sum() == max_patches
  if max_patches == 2:
    assert all(m.sum() <= L for m in real) and any(m.sum() < L for m in real)


@pytest.mark.parametrize("name", sorted(PATCHINGS))
def test_carried_starts_are_the_steps_rule_on_the_row(name):
  """The loader's starts equal what the step computes for the same row from its tokens (and entropies)."""
  pc = PATCHINGS[name]
  docs = _encoded(_docs(seed=2), seed=2)
  rows = _rows(docs, patch_rows.RowPatcher(pc.patch_kwargs(), 9, L))
  assert len(rows) > 10
  for r in rows:
    length = int(r["loss_mask"].sum())
    entropies = jnp.asarray(r["entropies"][None]) if pc.mode == "entropy" else None
    # The step's own patcher on the row (`patching.patch`), its starts read back from its lengths.
    lengths = np.asarray(
        patching.patch(jnp.asarray(r["tokens"][None]), entropies, **pc.patch_kwargs()).patch_lengths_BP
    )[0]
    in_step = np.zeros((1, L + 1), bool)
    in_step[0, np.cumsum(lengths[lengths > 0])[:-1]] = True
    in_step[0, 0] = True
    carried = np.asarray(patch_rows.step_starts(jnp.asarray(r[patch_rows.STARTS][None])))[0]
    # Positions 0..length: the row's bytes and its next-token position (a start depends only on what precedes it).
    np.testing.assert_array_equal(np.asarray(in_step)[0, : length + 1], carried[: length + 1])


def test_byte_rows_unchanged_without_a_patcher():
  docs = _encoded(_docs())
  rows = _rows(docs, None)
  stream = np.concatenate([d["ids"] for d in docs])
  assert all(r["loss_mask"].sum() == L for r in rows[:-1]) and patch_rows.STARTS not in rows[0]
  for k, r in enumerate(rows[:-1]):
    np.testing.assert_array_equal(r["tokens"], stream[k * L : (k + 1) * L])


def test_step_loss_with_carried_starts_equals_in_step_patching():
  """A row the loader patched gives the loss the step's own patching of that row gives (configs/tiny.py's BLT)."""
  cfg = train_config.load_config_file(str(ROOT / "configs" / "tiny.py"))
  cfg.seq_len = L
  model = train_config.model_config(cfg)
  pc = train_config.patching_config(cfg)
  docs = _encoded(_docs(seed=4), seed=4, with_entropies=False)
  rows = _rows(docs, patch_rows.RowPatcher(pc.patch_kwargs(), 12, L))[:8]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  params = init_blt(jax.random.PRNGKey(0), model)
  budget = steps.StepConfig(model, pc, 12)
  in_step = steps.StepConfig(model, pc, L + 1)  # patched in the step, never overflows
  loss_b, count_b, stats_b = steps.loss_terms(budget, params, batch)
  plain = {k: v for k, v in batch.items() if k != patch_rows.STARTS}
  loss_s, count_s, _ = steps.loss_terms(in_step, params, plain)
  assert float(count_b) == float(count_s) == sum(float(r["loss_mask"].sum()) for r in rows)
  np.testing.assert_allclose(float(loss_b), float(loss_s), rtol=1e-6)
  assert float(stats_b["overflow_rows"]) == 0
  assert float(stats_b["num_patches"]) == sum(1 + float(r[patch_rows.STARTS].sum()) for r in rows)
  # The patches really are the budget's: a short row holds 12.
  patches = steps.make_patches(budget, batch, None)
  assert patches.patch_lengths_BP.shape == (8, 12)


def _write_txt(tmp_path, docs):
  folder = tmp_path / "txt"
  folder.mkdir()
  for i, doc in enumerate(docs):
    (folder / f"{i:03d}.txt").write_text(doc)
  return folder


def _space_patcher(max_patches=6, seq_len=L):
  return patch_rows.RowPatcher(PatchingConfig(mode="space").patch_kwargs(), max_patches, seq_len)


def test_train_iterator_resumes_exactly_and_refuses_another_budget(tmp_path):
  folder = _write_txt(tmp_path, _docs(12))
  cfg = data.default_data_config()
  cfg.sources = [str(folder / "*.txt")]
  cfg.prefetch = 0
  it = data.make_train_iterator(cfg, L, 2, 3, 0, 1, row_patcher=_space_patcher())
  for _ in range(9):
    next(it)
  state = data.state_to_bytes(it.get_state())
  expected = [next(it) for _ in range(7)]
  fresh = data.make_train_iterator(cfg, L, 2, 3, 0, 1, row_patcher=_space_patcher())
  fresh.set_state(data.state_from_bytes(state))
  for a, b in zip(expected, [next(fresh) for _ in range(7)]):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for other in (_space_patcher(max_patches=7), None):
    it2 = data.make_train_iterator(cfg, L, 2, 3, 0, 1, row_patcher=other)
    with pytest.raises(ValueError, match="max_patches"):
      it2.set_state(data.state_from_bytes(state))


def test_eval_rows_agree_across_hosts(tmp_path):
  docs = _docs(9, seed=5)
  folder = _write_txt(tmp_path, docs)
  cfg = data.default_data_config()
  cfg.sources = cfg.validation_sources = [str(folder / "*.txt")]
  evs = [data.make_eval_iterator(cfg, L, 4, h, 2, row_patcher=_space_patcher()) for h in range(2)]
  assert evs[0].num_batches == evs[1].num_batches
  seen = []
  for h, ev in enumerate(evs):
    batches = list(ev)
    assert len(batches) == ev.num_batches
    for b, real in zip(batches, ev.num_real_rows):
      assert patch_rows.STARTS in b and np.all(b["loss_mask"][real:] == 0)
      assert np.all(b[patch_rows.STARTS].sum(-1) + 1 <= 6)
      seen.append(b["tokens"][b["loss_mask"] > 0])
    # This host's documents, every token an input once (the host's stream ends without a target for its last).
    mine = np.concatenate([tokenizer.encode(d) for d in docs[h::2]])
    np.testing.assert_array_equal(np.concatenate(seen), mine[:-1])
    seen = []


def test_config_refuses_entropy_rows_without_stored_entropies():
  cfg = train_config.load_config_file(str(ROOT / "configs" / "tiny_entropy.py"))
  cfg.patching.rows = "patches"
  cfg.data.entropy_store = ""
  with pytest.raises(ValueError, match="entropy_store"):
    train_config.validate(cfg)
  cfg.patching.rows = "tokens"
  with pytest.raises(ValueError, match="patching.rows"):
    train_config.validate(cfg)
