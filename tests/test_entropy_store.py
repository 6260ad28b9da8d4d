"""Precomputed entropies: stored values equal the model's, travel with the tokens through packing, fail clearly."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from test_paths import fake_gcs  # noqa: F401 (a fixture)

from blt_jax import data as data_lib
from blt_jax import entropy_store, tokenizer
from blt_jax.config import EntropyModelConfig
from blt_jax.data import pipeline
from blt_jax.entropy_model import compute_entropies, init_entropy_model
import flax.linen as nn

CFG = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, sliding_window=16, max_seqlen=128)


@pytest.fixture(scope="module")
def model():
  return nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(0), CFG))


@pytest.fixture
def corpus(tmp_path):
  texts = {
      "a.txt": b"hello world, " * 3,
      "b.txt": b"x" * 300,
      "c.txt": "caf\xe9 \u00fcber".encode() * 5,
      "d.txt": b"short",
      "e.txt": bytes(range(256)),
  }
  for name, body in texts.items():
    (tmp_path / name).write_bytes(body)
  cfg = data_lib.default_data_config()
  cfg.sources = [str(tmp_path / "*.txt")]
  cfg.validation_fraction = 0.0
  cfg.prefetch = 0
  return cfg, texts


def test_stored_entropies_equal_per_document_model_entropies(tmp_path, corpus, model):
  cfg, texts = corpus
  train, _ = pipeline.build_document_sources(cfg)
  entropy_store.write_entropy_store(str(tmp_path / "store"), train, model, CFG)
  annotated = entropy_store.EntropyAnnotatedSource(train, str(tmp_path / "store"))
  assert len(annotated) == len(texts)
  for i in range(len(annotated)):
    item = annotated[i]
    ids = tokenizer.encode(train[i])
    np.testing.assert_array_equal(item["ids"], ids)
    # Each document alone, context reset every max_seqlen tokens (b.txt has 302 tokens: three chunks).
    expected = np.asarray(compute_entropies(model, jnp.asarray(ids)[None], CFG))[0]
    np.testing.assert_allclose(item["entropies"], expected, atol=1e-5)


def test_entropies_travel_through_packing(tmp_path, corpus, model):
  cfg, _ = corpus
  train, _ = pipeline.build_document_sources(cfg)
  entropy_store.write_entropy_store(str(tmp_path / "store"), train, model, CFG)
  cfg.entropy_store = str(tmp_path / "store")
  it = data_lib.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, process_index=0, process_count=1)
  annotated = entropy_store.EntropyAnnotatedSource(train, cfg.entropy_store)
  docs = [annotated[i] for i in range(len(annotated))]
  checked = 0
  for _ in range(3):
    batch = next(it)
    assert batch["entropies"].shape == batch["tokens"].shape
    # Every document start in a window lines up with that document's stored entropies.
    for tokens, ents in zip(batch["tokens"], batch["entropies"]):
      for start in np.flatnonzero(tokens == tokenizer.BOS_ID):
        m_max = len(tokens) - start
        matches = [
            d for d in docs if np.array_equal(tokens[start : start + min(len(d["ids"]), m_max)], d["ids"][:m_max])
        ]
        assert matches, "a document start in the batch matches no document"
        m = min(len(matches[0]["ids"]), m_max)
        np.testing.assert_allclose(ents[start : start + m], matches[0]["entropies"][:m])
        checked += 1
  assert checked >= 3


def test_missing_or_stale_store_errors_are_clear(tmp_path, corpus, model):
  cfg, texts = corpus
  train, _ = pipeline.build_document_sources(cfg)
  with pytest.raises(FileNotFoundError, match="precompute_entropies"):
    entropy_store.EntropyAnnotatedSource(train, str(tmp_path / "nowhere"))
  entropy_store.write_entropy_store(str(tmp_path / "store"), train, model, CFG)
  (tmp_path / "f.txt").write_bytes(b"new document")
  grown, _ = pipeline.build_document_sources(cfg)
  with pytest.raises(ValueError, match="no entropies for document"):
    entropy_store.EntropyAnnotatedSource(grown, str(tmp_path / "store"))
  (tmp_path / "d.txt").write_bytes(b"a longer body than before")
  (tmp_path / "f.txt").unlink()
  changed, _ = pipeline.build_document_sources(cfg)
  annotated = entropy_store.EntropyAnnotatedSource(changed, str(tmp_path / "store"))
  stale = [i for i in range(len(changed)) if changed.key(i).endswith("d.txt")][0]
  with pytest.raises(ValueError, match="stale"):
    annotated[stale]


def test_store_at_a_url(tmp_path, corpus, model, fake_gcs):
  """gs:// end to end: arrays through tensorstore's gcs driver, the index through epath, both on the fake bucket."""
  cfg, _ = corpus
  train, _ = pipeline.build_document_sources(cfg)
  summary = entropy_store.write_entropy_store("gs://bucket/stores/s", train, model, CFG)
  objects = sorted(fake_gcs.store)
  assert "bucket/stores/s/index.json" in objects and "bucket/stores/s/entropies.zarr/.zarray" in objects
  assert not any(o.startswith("bucket/stores/s.") for o in objects)  # no temporary directory on the bucket
  entropy_store.write_entropy_store(str(tmp_path / "local"), train, model, CFG)
  remote = entropy_store.EntropyAnnotatedSource(train, "gs://bucket/stores/s")
  local = entropy_store.EntropyAnnotatedSource(train, str(tmp_path / "local"))
  assert summary["documents"] == len(remote) == len(local)
  for i in range(len(local)):
    np.testing.assert_array_equal(remote[i]["entropies"], local[i]["entropies"])
  # Training reads it (and its corpus) from the URL too.
  for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
    fake_gcs.pipe_file(f"bucket/corpus/{name}", (tmp_path / name).read_bytes())
  cfg.sources = ["gs://bucket/corpus/*.txt"]
  cfg.entropy_store = "gs://bucket/stores/s"
  batch = next(
      data_lib.make_train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0, process_index=0, process_count=1)
  )
  assert batch["entropies"].shape == (2, 64) and np.any(batch["entropies"] > 0)
  # Rewriting removes the index first: a store is complete exactly when its index is there.
  with pytest.raises(Exception):
    entropy_store.write_entropy_store("gs://bucket/stores/s", _Failing(train), model, CFG)
  assert not epath.Path("gs://bucket/stores/s/index.json").exists()
  with pytest.raises(FileNotFoundError, match="no index.json"):
    entropy_store.EntropyAnnotatedSource(train, "gs://bucket/stores/s")


class _Failing:
  """A source whose documents cannot be read (a write interrupted after it started)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def num_tokens(self, i):
    return self._source.num_tokens(i)

  def __getitem__(self, i):
    raise RuntimeError("interrupted")
