"""Tests for the byte data pipeline (blt_jax.data)."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from etils import epath
from test_paths import fake_gcs  # noqa: F401 (a fixture)

from blt_jax import data
from blt_jax import entropy_store
from blt_jax import tokenizer
from blt_jax.data import packing
from blt_jax.data import sources

SEQ_LEN = 16


def _docs(n=23, seed=0):
  """Small documents of varied length, one much longer than a window."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    length = int(rng.integers(0, 40)) if i != 5 else 5 * SEQ_LEN + 3
    body = bytes(rng.integers(32, 127, size=length, dtype=np.uint8))
    docs.append(b"doc%03d:" % i + body)
  return docs


def _write_txt(tmp_path, docs, sub="txt"):
  folder = tmp_path / sub
  folder.mkdir()
  for i, doc in enumerate(docs):
    (folder / f"{i:03d}.txt").write_bytes(doc)
  return folder


def _cfg(**overrides):
  cfg = data.default_data_config()
  cfg.num_threads = 2
  cfg.prefetch = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _stream(docs):
  return np.concatenate([tokenizer.encode(d) for d in docs])


def _split_docs(ids):
  """Splits a token stream at EOS into documents' raw bytes."""
  out, cur = [], []
  for t in ids.tolist():
    if t == tokenizer.EOS_ID:
      out.append(tokenizer.decode_bytes(cur))
      cur = []
    else:
      cur.append(t)
  return out


def _real_stream(batches):
  """Stream reconstructed from eval batches: real inputs plus last target."""
  tokens, last = [], None
  for b in batches:
    for row_t, row_y, row_m in zip(b["tokens"], b["targets"], b["loss_mask"]):
      n = int(row_m.sum())
      if n:
        tokens.append(row_t[:n])
        last = row_y[n - 1]
  return np.concatenate(tokens + [np.array([last])])


# ----------------------------------------------------------------- sources --


def test_stdlib_corpus_smoke():
  cfg = _cfg()
  train, val = data.build_sources(cfg)
  total = len(train) + len(val)
  assert total > 100 and 0 < len(val) < 0.1 * total
  keys_train = {train.key(i) for i in range(len(train))}
  keys_val = {val.key(i) for i in range(len(val))}
  assert not keys_train & keys_val
  assert not any("site-packages" in k for k in keys_train)
  # Deterministic: sorted relative paths, same split every time.
  train2, val2 = data.build_sources(cfg)
  assert [train2.key(i) for i in range(len(train2))] == [train.key(i) for i in range(len(train))]
  assert {val2.key(i) for i in range(len(val2))} == keys_val
  # Host defaults come from jax (one CPU process in tests).
  it = data.make_train_iterator(cfg, 64, 4, seed=0)
  for batch in _take(it, 2):
    assert batch["tokens"].shape == (4, 64)
    assert batch["tokens"].dtype == np.int32
    assert batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  it.close()
  ev = data.make_eval_iterator(_cfg(max_eval_batches=2), 64, 4, 0, 1)
  assert len(ev) == 2 and len(list(ev)) == 2


def test_split_disjoint_and_deterministic(tmp_path):
  docs = _docs(60)
  folder = _write_txt(tmp_path, docs)
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_fraction=0.3)
  train, val = data.build_sources(cfg)
  train_keys = [train.key(i) for i in range(len(train))]
  val_keys = [val.key(i) for i in range(len(val))]
  assert not set(train_keys) & set(val_keys)
  assert sorted(train_keys + val_keys) == [f"{i:03d}.txt" for i in range(60)]
  assert 5 < len(val) < 35
  train2, val2 = data.build_sources(cfg)
  assert [val2.key(i) for i in range(len(val2))] == val_keys
  # Keys are relative to the pattern root, so moving the data keeps the split.
  moved = tmp_path / "elsewhere"
  os.rename(folder, moved)
  _, val3 = data.build_sources(_cfg(sources=[str(moved / "*.txt")], validation_fraction=0.3))
  assert [val3.key(i) for i in range(len(val3))] == val_keys


def test_validation_sources_override_split(tmp_path):
  folder = _write_txt(tmp_path, _docs(10))
  vfolder = _write_txt(tmp_path, _docs(3, seed=1), sub="val")
  train, val = data.build_sources(_cfg(sources=[str(folder / "*.txt")], validation_sources=[str(vfolder / "*")]))
  assert len(train) == 10 and len(val) == 3


def test_readers_txt_jsonl_parquet_arrow_glob(tmp_path):
  texts = ["héllo wörld", "second\nline", "", "日本語", "x" * 100]
  (tmp_path / "a.txt").write_bytes(texts[0].encode())
  lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
  (tmp_path / "b.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
  table = pa.table({"body": texts, "n": list(range(len(texts)))})
  pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
  feather.write_feather(table, tmp_path / "d.feather")
  with pa.OSFile(str(tmp_path / "e.arrow"), "wb") as sink:  # IPC stream.
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=2)
  with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink:  # IPC file.
    with pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table)
  src = data.file_corpus([str(tmp_path / "a.txt"), str(tmp_path / "[b-f].*")], text_field="body")
  got = [src[i] for i in range(len(src))]
  want = [texts[0].encode()] + [t.encode() for t in texts] * 5
  assert got == want
  assert src.key(1) == "b.jsonl:1" and src.key(3) == "b.jsonl:4"
  assert src.key(7) == "c.parquet:1"
  assert [src.num_bytes(i) for i in range(len(src))] == [len(d) for d in want]
  # Binary columns and overlapping patterns (no duplicated documents).
  (tmp_path / "bin").mkdir()
  pq.write_table(pa.table({"text": pa.array([b"\xff\x00"], pa.binary())}), tmp_path / "bin" / "g.parquet")
  src = data.file_corpus([str(tmp_path / "bin" / "g.parquet"), str(tmp_path / "bin" / "*.parquet")])
  assert len(src) == 1 and src[0] == b"\xff\x00"


def test_recursive_glob(tmp_path):
  (tmp_path / "x" / "y").mkdir(parents=True)
  (tmp_path / "x" / "1.txt").write_bytes(b"one")
  (tmp_path / "x" / "y" / "2.txt").write_bytes(b"two")
  src = data.file_corpus(str(tmp_path / "**" / "*.txt"))
  assert [src[i] for i in range(len(src))] == [b"one", b"two"]
  assert src.key(1) == "x/y/2.txt"


def test_invalid_utf8_survives(tmp_path):
  raw = b"ok \xff\xfe\x80 \xc3( end"
  (tmp_path / "bad.txt").write_bytes(raw)
  src = data.file_corpus(str(tmp_path / "bad.txt"))
  assert src[0] == raw
  ev = data.EvalIterator(src, seq_len=64, batch_size=1, process_index=0, process_count=1, prefetch=0)
  (batch,) = list(ev)
  n = int(batch["loss_mask"][0].sum())
  stream = np.append(batch["tokens"][0, :n], batch["targets"][0, n - 1])
  np.testing.assert_array_equal(stream, tokenizer.encode(raw))


# ------------------------------------------------------------------ errors --


def _two_languages(tmp_path):
  """en/part-0000.jsonl and de/part-0000.jsonl: the same name under two roots."""
  for lang in ("en", "de"):
    (tmp_path / lang).mkdir()
    (tmp_path / lang / "part-0000.jsonl").write_text(
        "".join(json.dumps({"text": f"{lang} {i}"}) + "\n" for i in range(3))
    )
  return str(tmp_path / "en" / "*.jsonl"), str(tmp_path / "de" / "*.jsonl")


def test_error_keys_collide_across_patterns(tmp_path):
  en, de = _two_languages(tmp_path)
  # Each file's key is relative to its own pattern's root: both are
  # part-0000.jsonl, which would give one document's stored entropies (and
  # split) to the other.
  store = str(tmp_path / "store")
  for make in (  # Within sources; across sources and validation_sources
      # when they share an entropy store (read or written).
      lambda: data.make_train_iterator(_cfg(sources=[en, de]), SEQ_LEN, 2, 0),
      lambda: data.make_train_iterator(_cfg(sources=[en], validation_sources=[de], entropy_store=store), SEQ_LEN, 2, 0),
      lambda: entropy_store.write_corpus_store(store, _cfg(sources=[en], validation_sources=[de]), None, None),
  ):
    with pytest.raises(ValueError) as e:
      make()
    message = str(e.value)
    assert "\n" not in message
    assert "key 'part-0000.jsonl'" in message
    assert all(str(tmp_path / lang / "part-0000.jsonl") in message for lang in ("en", "de"))
  # Keys that do not collide are unchanged; one pattern over the common
  # parent keeps the directories in the keys.
  assert data.file_corpus(en).key(0) == "part-0000.jsonl:1"
  both = data.file_corpus(str(tmp_path / "*" / "*.jsonl"))
  assert [both.key(i) for i in (0, 3)] == ["de/part-0000.jsonl:1", "en/part-0000.jsonl:1"]
  # Without a store, training and validation keys never meet; the same file
  # as both is one document, not a collision.
  for val in (de, en):
    data.make_eval_iterator(_cfg(sources=[en], validation_sources=[val]), SEQ_LEN, 2, 0, 1)


def test_error_no_match_names_pattern(tmp_path):
  pattern = str(tmp_path / "nothing*.jsonl")
  with pytest.raises(ValueError, match="nothing\\*.jsonl.*matched no files"):
    data.file_corpus(pattern)
  with pytest.raises(ValueError, match="missing.txt.*does not exist"):
    data.file_corpus(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="is a directory"):
    data.file_corpus(str(tmp_path))


def test_error_unsupported_extension(tmp_path):
  (tmp_path / "notes.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="notes.csv.*unsupported file extension" " '.csv'"):
    data.file_corpus(str(tmp_path / "*"))


def test_error_jsonl_invalid_json(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "a"}\n\n{"text": oops}\n')
  with pytest.raises(ValueError, match="bad.jsonl:3: invalid JSON"):
    data.file_corpus(str(path))


def test_error_jsonl_missing_field(tmp_path):
  path = tmp_path / "nofield.jsonl"
  path.write_text('{"text": "a"}\n{"content": "b"}\n')
  with pytest.raises(ValueError, match="nofield.jsonl:2: missing text field 'text'.*content"):
    data.file_corpus(str(path))
  path.write_text('{"text": 3}\n')
  with pytest.raises(ValueError, match="nofield.jsonl:1: field 'text' must be"):
    data.file_corpus(str(path))


@pytest.mark.parametrize("ext", ["parquet", "arrow", "feather"])
def test_error_missing_column(tmp_path, ext):
  path = tmp_path / f"t.{ext}"
  table = pa.table({"content": ["a"], "id": [1]})
  if ext == "parquet":
    pq.write_table(table, path)
  else:
    feather.write_feather(table, path)
  with pytest.raises(ValueError, match=f"t.{ext}: no column 'text'; available" r" columns: \['content', 'id'\]"):
    data.file_corpus(str(path))
  with pytest.raises(ValueError, match="column 'id' has type int64"):
    data.file_corpus(str(path), text_field="id")


def test_error_batch_not_divisible(tmp_path):
  folder = _write_txt(tmp_path, _docs(4))
  cfg = _cfg(sources=[str(folder / "*.txt")])
  with pytest.raises(ValueError, match="global_batch_size=5.*process_count=2"):
    data.make_train_iterator(cfg, SEQ_LEN, 5, 0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="global_batch_size=5.*process_count=2"):
    data.make_eval_iterator(cfg, SEQ_LEN, 5, 0, 2)


def test_error_no_validation_documents(tmp_path):
  folder = _write_txt(tmp_path, _docs(4))
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_fraction=0.0)
  with pytest.raises(ValueError, match="no validation documents"):
    data.make_eval_iterator(cfg, SEQ_LEN, 2, 0, 1)


def _keys(source):
  return [source.key(i) for i in range(len(source))]


def test_small_corpus_holds_out_at_least_one_document(tmp_path, caplog):
  folder = _write_txt(tmp_path, _docs(20))
  # A positive fraction whose hash holds out none of these 20 keys.
  assert not any(sources.in_validation(f"{i:03d}.txt", 0.01) for i in range(20))
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_fraction=0.01)
  with caplog.at_level(logging.WARNING):
    train, val = data.build_sources(cfg)
  assert len(val) == 1 and len(train) == 19
  assert sorted(_keys(train) + _keys(val)) == [f"{i:03d}.txt" for i in range(20)]
  assert "holds out none of the 20 training documents: holding out 1 document" in caplog.text
  # Training skips it, on one process and on three; evaluation reads it.
  assert _keys(data.build_train_source(cfg)) == _keys(train)
  assert sum((_keys(data.build_train_source(cfg, i, 3)) for i in range(3)), []) == _keys(train)
  assert len(data.make_eval_iterator(cfg, SEQ_LEN, 2, 0, 1)) >= 1
  # One document cannot be split: one line saying what to do.
  one = _write_txt(tmp_path, _docs(1), sub="one")
  for build in (data.build_sources, data.build_train_source):
    with pytest.raises(ValueError, match="holds 1 document.*validation_sources.*validation_fraction=0") as e:
      build(_cfg(sources=[str(one / "*.txt")], validation_fraction=0.01))
    assert "\n" not in str(e.value)


def _mixed_good_and_bad(tmp_path):
  """A jsonl and a parquet file of good documents among bad records; returns (good documents, bad `file:line`s)."""
  good = [f"good document {i} ".encode() * (i + 1) for i in range(8)]
  lines = [
      json.dumps({"text": good[0].decode()}),
      json.dumps({"text": good[1].decode()}),
      json.dumps({"text": good[2].decode()}),
      '{"text": "cut sho',
      json.dumps({"content": "no text"}),
      json.dumps({"text": 5}),
      "",
      json.dumps({"text": good[3].decode()}),
      "[1, 2]",
      json.dumps({"text": good[4].decode()}),
      json.dumps({"text": good[5].decode()}),
  ]
  (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
  pq.write_table(pa.table({"text": [good[6].decode(), None, good[7].decode()]}), tmp_path / "mixed.parquet")
  bad = [
      ("mixed.jsonl:4", "invalid JSON"),
      ("mixed.jsonl:5", "missing text field 'text'"),
      ("mixed.jsonl:6", "field 'text' must be a string"),
      ("mixed.jsonl:9", "expected a JSON object"),
      ("mixed.parquet:1", "null 'text'"),
  ]
  return good, bad


def test_on_bad_record_error_stops_and_skip_reads_every_good_document(tmp_path, caplog):
  good, bad = _mixed_good_and_bad(tmp_path)
  cfg = _cfg(sources=[str(tmp_path / "mixed.*")], validation_fraction=0.0)
  assert cfg.on_bad_record == "error"  # the default stops, as before
  with pytest.raises(ValueError, match="mixed.jsonl:4: invalid JSON") as e:
    data.build_train_source(cfg)
  assert "\n" not in str(e.value)

  cfg.on_bad_record = "skip"
  with caplog.at_level(logging.WARNING):
    train = data.build_train_source(cfg)
  assert sorted(train[i] for i in range(len(train))) == sorted(good)
  report = [r.getMessage() for r in caplog.records if "bad record" in r.getMessage()]
  assert len(report) == 1 and "skipped 5 bad record(s)" in report[0]
  for where, reason in bad:
    assert f"{tmp_path / where}: {reason}" in report[0]
  # Three processes' shares: every good document once; the total counts every share's bad records.
  shares = [data.build_train_source(cfg, i, 3) for i in range(3)]
  assert sorted(s[i] for s in shares for i in range(len(s))) == sorted(good)
  assert data.make_train_iterator(cfg, SEQ_LEN, 3, 0, 1, 3).bad_records == 5
  # The hash split: training and validation hold the good documents between them.
  cfg.validation_fraction = 0.3
  train, val = data.build_sources(cfg)
  assert sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]) == sorted(good)
  assert len(val) and len(train)
  with pytest.raises(ValueError, match="on_bad_record='maybe': expected 'error' or 'skip'"):
    data.build_train_source(_cfg(sources=[str(tmp_path / "mixed.*")], on_bad_record="maybe"))


# ----------------------------------------------------------------- packing --


def test_eval_packing_invariants(tmp_path):
  docs = _docs(23)
  folder = _write_txt(tmp_path, docs)
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_fraction=0.0, validation_sources=[str(folder / "*.txt")])
  ev = data.make_eval_iterator(cfg, SEQ_LEN, 4, 0, 1)
  batches = list(ev)
  assert len(batches) == len(ev) == ev.num_batches
  stream = _stream(docs)
  num_windows = -(-(len(stream) - 1) // SEQ_LEN)
  assert sum(ev.num_real_rows) == num_windows
  for b, n_real in zip(batches, ev.num_real_rows):
    assert b["tokens"].shape == (4, SEQ_LEN)
    assert b["loss_mask"].dtype == np.float32
    assert int((b["loss_mask"].sum(axis=1) > 0).sum()) == n_real
  # The real parts rebuild the stream exactly (each token once, in order).
  np.testing.assert_array_equal(_real_stream(batches), stream)
  tokens = np.concatenate([b["tokens"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches])
  real = mask > 0
  np.testing.assert_array_equal(targets[real], stream[1:])
  # Mask is a prefix of ones; zeros exactly on BOE padding.
  assert np.all(np.diff(mask, axis=1) <= 0)
  assert np.all(tokens[~real] == tokenizer.BOE_ID)
  assert np.all(targets[~real] == tokenizer.BOE_ID)
  assert np.all(targets[real] != tokenizer.BOE_ID)
  # Within a row, targets are tokens shifted by one.
  np.testing.assert_array_equal(tokens[:, 1:][real[:, 1:]], targets[:, :-1][real[:, 1:]])
  # Re-iterating gives a fresh identical pass.
  for a, b in zip(batches, ev):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_train_packing_one_epoch_in_order(tmp_path):
  docs = _docs(23)
  folder = _write_txt(tmp_path, docs)
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_fraction=0.0)
  train, _ = data.build_sources(cfg)
  it = data.make_train_iterator(cfg, SEQ_LEN, 3, seed=7, process_index=0, process_count=1)
  stream = _stream(docs)
  batches = _take(it, 2 * len(stream) // (3 * SEQ_LEN) + 2)
  it.close()
  tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
  targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
  assert all(np.all(b["loss_mask"] == 1) for b in batches)
  # Targets are the concatenated token stream shifted by one.
  np.testing.assert_array_equal(targets[:-1], tokens[1:])
  # The stream is the documents in the shuffled order of the document dataset.
  order = data.document_dataset(train, seed=7, shuffle=True, repeat=True, process_index=0, process_count=1)
  expected = np.concatenate([order[i]["ids"] for i in range(3 * len(docs))])
  np.testing.assert_array_equal(tokens, expected[: len(tokens)])
  # Epoch 1: every document exactly once, bytes in order, EOS-separated.
  first_epoch = tokens[: len(stream)]
  assert first_epoch[0] == tokenizer.BOS_ID
  assert sorted(_split_docs(first_epoch)) == sorted(docs)
  assert _split_docs(first_epoch) != docs  # Shuffled.


def test_determinism_and_seed(tmp_path):
  folder = _write_txt(tmp_path, _docs(23))
  cfg = _cfg(sources=[str(folder / "*.txt")])

  def first(seed, n=6):
    it = data.make_train_iterator(cfg, SEQ_LEN, 2, seed, 0, 1)
    out = np.stack([b["tokens"] for b in _take(it, n)])
    it.close()
    return out

  np.testing.assert_array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))
  cfg.shuffle_seed = 1  # Overrides the seed argument.
  np.testing.assert_array_equal(first(0), first(1))


def test_extra_fields_carried_through_packing():
  class EntropySource:
    extra_fields = ("entropies",)

    def __init__(self, docs):
      self.docs = docs

    def __len__(self):
      return len(self.docs)

    def __getitem__(self, i):
      ids = tokenizer.encode(self.docs[i])
      return {"ids": ids, "entropies": ids * 0.5 + i}

  docs = _docs(9)
  src = EntropySource(docs)
  ev = data.EvalIterator(src, seq_len=SEQ_LEN, batch_size=2, process_index=0, process_count=1, prefetch=0)
  for b in ev:
    frac = b["entropies"] - b["tokens"] * 0.5  # == doc index where real.
    real = np.zeros_like(b["loss_mask"], bool)
    for r, n in enumerate(b["loss_mask"].sum(axis=1).astype(int)):
      real[r, :n] = True
    assert b["entropies"].dtype == np.float32
    np.testing.assert_array_equal(frac[real], np.round(frac[real]))
    assert np.all(b["entropies"][~real] == 0)
  ds = data.build_train_dataset(
      src, seq_len=SEQ_LEN, batch_size=2, seed=0, process_index=0, process_count=1, prefetch=0
  )
  it = iter(ds)
  _take(it, 7)
  state = data.state_from_bytes(data.state_to_bytes(it.get_state()))
  more = _take(it, 5)
  it2 = iter(ds)
  it2.set_state(state)
  for a, b in zip(more, _take(it2, 5)):
    np.testing.assert_array_equal(a["entropies"], b["entropies"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


# ---------------------------------------------------------------- sharding --


def test_two_hosts_disjoint_documents(tmp_path):
  docs = _docs(23)
  folder = _write_txt(tmp_path, docs)
  cfg = _cfg(sources=[str(folder / "*.txt")], validation_sources=[str(folder / "*.txt")])
  seen, evs = [], []
  for host in range(2):
    ev = data.make_eval_iterator(cfg, SEQ_LEN, 4, host, 2)
    evs.append(ev)
    seen.append(_split_docs(_real_stream(list(ev))))
  assert evs[0].num_batches == evs[1].num_batches  # Hosts stay in lock step.
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(docs)
  # Train: within each global epoch the hosts' documents partition the corpus.
  train, _ = data.build_sources(cfg)
  n = len(train)
  for epoch in range(2):
    keys = []
    for host in range(2):
      ds = data.document_dataset(train, seed=3, shuffle=True, repeat=True, process_index=host, process_count=2)
      positions = [j for j in range(n) if epoch * n <= j * 2 + host < (epoch + 1) * n]
      keys.append([tokenizer.decode_bytes(ds[j]["ids"]) for j in positions])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(docs)
  # Train iterators of two hosts differ.
  a = next(data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 0, 2))
  b = next(data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 1, 2))
  assert a["tokens"].shape == (2, SEQ_LEN)
  assert not np.array_equal(a["tokens"], b["tokens"])


def test_eval_hosts_padded_to_same_length(tmp_path):
  # One long and several tiny documents: host 0 has far more windows.
  docs = [b"L" * (10 * SEQ_LEN)] + [b"s"] * 5
  folder = _write_txt(tmp_path, docs)
  cfg = _cfg(validation_sources=[str(folder / "*.txt")], sources=[str(folder / "*.txt")])
  # Host 0: 162 + 3 + 3 tokens -> 11 windows -> 6 batches of 2; host 1: 1.
  evs = [data.make_eval_iterator(cfg, SEQ_LEN, 4, h, 2) for h in range(2)]
  assert evs[0].num_batches == evs[1].num_batches == 6
  assert evs[0].num_real_rows == [2, 2, 2, 2, 2, 1]
  batches = list(evs[1])
  assert len(batches) == 6 and evs[1].num_real_rows == [1, 0, 0, 0, 0, 0]
  assert batches[0]["loss_mask"][0].sum() == 8  # 9 tokens, 8 targets.
  assert batches[0]["loss_mask"][1].sum() == 0
  assert all(np.all(b["loss_mask"] == 0) for b in batches[1:])
  cfg.max_eval_batches = 2
  capped = data.make_eval_iterator(cfg, SEQ_LEN, 4, 0, 2)
  assert len(list(capped)) == 2


# ------------------------------------------------------------------ resume --


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state(tmp_path, prefetch):
  folder = _write_txt(tmp_path, _docs(23))
  cfg = _cfg(sources=[str(folder / "*.txt")], prefetch=prefetch)
  it = data.make_train_iterator(cfg, SEQ_LEN, 3, 5, 0, 1)
  _take(it, 11)  # Crosses an epoch and sits inside the long document.
  state = it.get_state()
  assert isinstance(state, dict)
  blob = data.state_to_bytes(state)
  assert json.loads(blob) == state  # JSON-native.
  expected = _take(it, 9)
  it.close()
  fresh = data.make_train_iterator(cfg, SEQ_LEN, 3, 5, 0, 1)
  fresh.set_state(data.state_from_bytes(blob))
  assert fresh.get_state() == state
  for a, b in zip(expected, _take(fresh, 9)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  fresh.close()


def test_resume_at_every_position(tmp_path):
  folder = _write_txt(tmp_path, _docs(7))
  src = data.file_corpus(str(folder / "*.txt"))
  ds = data.build_train_dataset(
      src, seq_len=5, batch_size=1, seed=1, process_index=0, process_count=1, prefetch=0, num_threads=0
  )
  it = iter(ds)
  states, rows = [], []
  for _ in range(60):
    states.append(data.state_to_bytes(it.get_state()))
    rows.append(next(it)["tokens"])
  for k in range(0, 60, 7):
    it2 = iter(ds)
    it2.set_state(data.state_from_bytes(states[k]))
    for j in range(k, min(k + 8, 60)):
      np.testing.assert_array_equal(next(it2)["tokens"], rows[j])
  # The state of a huge document stays small (offset, not its tokens).
  assert max(len(s) for s in states) < 1500


def test_resume_rejects_mismatched_state(tmp_path):
  folder = _write_txt(tmp_path, _docs(6))
  cfg = _cfg(sources=[str(folder / "*.txt")], prefetch=0)
  it = data.make_train_iterator(cfg, SEQ_LEN, 2, 0, 0, 1)
  next(it)
  state = it.get_state()
  other_len = data.make_train_iterator(cfg, SEQ_LEN * 2, 2, 0, 0, 1)
  with pytest.raises(ValueError, match="seq_len"):
    other_len.set_state(state)
  other_host = data.make_train_iterator(cfg, SEQ_LEN, 2, 0, 1, 2)
  with pytest.raises(ValueError, match="different data setup"):
    other_host.set_state(state)


def test_packer_directly_on_known_stream():
  import grain  # pylint: disable=g-import-not-at-top

  docs = [b"abc", b"", b"defghijklmnop"]
  ds = grain.MapDataset.source(docs).map(packing.to_token_doc)
  packed = packing.PackedWindowsIterDataset(ds.to_iter_dataset(), 4, pad_final=True)
  windows = list(packed)
  stream = _stream(docs)
  assert len(windows) == -(-(len(stream) - 1) // 4)
  for k, w in enumerate(windows):
    seg = stream[4 * k : 4 * k + 5]
    n = len(seg) - 1
    np.testing.assert_array_equal(w["tokens"][:n], seg[:-1])
    np.testing.assert_array_equal(w["targets"][:n], seg[1:])
    np.testing.assert_array_equal(w["loss_mask"], np.arange(4) < n)


# ------------------------------------------------- shares and start-up work --


def _mixed_corpus(root, n_lines=40):
  """A jsonl, a parquet and txt files under `root` (an epath.Path, any
  backend); returns the sorted-order texts of every document."""
  rng = np.random.default_rng(1)
  texts = [("line %d " % i) + "y" * int(rng.integers(0, 60)) for i in range(n_lines)]
  (root / "sub").mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"text": t}) for t in texts]
  lines.insert(7, "")  # A blank line: no document, but it counts in keys.
  (root / "a.jsonl").write_text("\n".join(lines) + "\n")
  (root / "b.txt").write_bytes(b"a whole text file")
  with (root / "sub" / "c.parquet").open("wb") as f:
    pq.write_table(pa.table({"text": texts[:25]}), f, row_group_size=4)
  (root / "sub" / "d.txt").write_bytes(b"another")
  return [t.encode() for t in texts] + [b"a whole text file"] + [t.encode() for t in texts[:25]] + [b"another"]


def _all(src):
  """(documents, keys) of a source."""
  n = len(src)
  return [src[i] for i in range(n)], [src.key(i) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 7])
def test_shares_partition_the_corpus_in_order(tmp_path, n):
  want = _mixed_corpus(epath.Path(tmp_path))
  pattern = str(tmp_path / "**" / "*.*")
  whole_docs, whole_keys = _all(data.file_corpus(pattern))
  assert whole_docs == want
  assert whole_keys[6:8] == ["a.jsonl:7", "a.jsonl:9"]  # Past the blank.
  docs, keys = [], []
  for i in range(n):  # Shares are contiguous runs: together, the corpus.
    share_docs, share_keys = _all(data.file_corpus(pattern, shard=(i, n)))
    docs += share_docs
    keys += share_keys
  assert docs == whole_docs and keys == whole_keys


def test_train_source_shares_partition_the_training_split(tmp_path):
  _mixed_corpus(epath.Path(tmp_path), n_lines=200)
  cfg = _cfg(sources=[str(tmp_path / "**" / "*.*")], validation_fraction=0.2)
  train, val = data.build_sources(cfg)
  assert len(val) > 10
  keys = []
  for i in range(3):
    share = data.build_train_source(cfg, i, 3)
    keys += [share.key(j) for j in range(len(share))]
  assert keys == [train.key(j) for j in range(len(train))]
  one = data.build_train_source(cfg)  # One process: the training split.
  assert [one.key(j) for j in range(len(one))] == keys


class _CountingFile:
  """A file object that adds the bytes read through it to `counter`."""

  def __init__(self, f, counter):
    self._f, self._counter = f, counter

  def read(self, n=-1):
    data_ = self._f.read(n)
    self._counter["bytes"] += len(data_)
    return data_

  def readinto(self, buf):
    n = self._f.readinto(buf)
    self._counter["bytes"] += n
    return n

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()

  def __getattr__(self, name):
    return getattr(self._f, name)


def test_startup_reads_and_parses_only_its_share(tmp_path, monkeypatch):
  from blt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from blt_jax.data import sources  # pylint: disable=g-import-not-at-top

  texts = [f"document {i:05d}" for i in range(2000)]  # Equal lines.
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  size = corpus.stat().st_size
  val = tmp_path / "val.txt"
  val.write_bytes(b"held out")
  counter = {"bytes": 0, "parsed": 0}
  path_cls = type(epath.Path(tmp_path))
  original_open, original_parse = path_cls.open, sources._jsonl_text
  monkeypatch.setattr(sources, "_READ_BLOCK", 4096)
  monkeypatch.setattr(path_cls, "open", lambda self, *a, **k: _CountingFile(original_open(self, *a, **k), counter))

  def parse(line, field):
    counter["parsed"] += 1
    return original_parse(line, field)

  monkeypatch.setattr(sources, "_jsonl_text", parse)
  share_tokens = pipeline._share_tokens

  def all_gather(*args):  # The other processes' counts, read by them.
    saved = dict(counter)
    tokens = share_tokens(*args)
    counter.update(saved)
    return tokens

  monkeypatch.setattr(pipeline, "_share_tokens", all_gather)
  share_summaries = pipeline._share_summaries

  def gather_summaries(*args):  # The split's summaries, likewise.
    saved = dict(counter)
    summaries = share_summaries(*args)
    counter.update(saved)
    return summaries

  monkeypatch.setattr(pipeline, "_share_summaries", gather_summaries)
  for n in (1, 4):
    for i in range(n):
      counter.update(bytes=0, parsed=0)
      # Held-out files of their own: no split keys, so no line numbers.
      cfg = _cfg(sources=[str(corpus)], validation_sources=[str(val)])
      share = data.build_train_source(cfg, i, n)
      assert counter["parsed"] == len(share) <= len(texts) // n + 1
      assert counter["bytes"] <= size // n + 2 * 4096, (n, i, counter)
      # The hash split needs keys: line numbers count the newlines before
      # the share (read, not parsed). Held-out lines unbalance the shares'
      # tokens, so a process also reads the neighbour share its token range
      # reaches into (at most its own and its two neighbours').
      counter.update(bytes=0, parsed=0)
      share = data.build_train_source(_cfg(sources=[str(corpus)]), i, n)
      assert counter["parsed"] <= 3 * (len(texts) // n + 1)
  # Documents are read only when the iterator reaches them.
  it = data.make_train_iterator(
      _cfg(sources=[str(corpus)], validation_sources=[str(val)], prefetch=0, num_threads=0), SEQ_LEN, 4, 0, 3, 4
  )
  counter.update(bytes=0, parsed=0)
  next(it)
  assert counter["parsed"] <= 4 and counter["bytes"] < 4 * 200


def test_share_iterators_resume_and_reject_other_shares(tmp_path):
  folder = _write_txt(tmp_path, _docs(23))
  cfg = _cfg(sources=[str(folder / "*.txt")], prefetch=0)
  it = data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 1, 2)
  _take(it, 5)
  state = data.state_from_bytes(data.state_to_bytes(it.get_state()))
  expected = _take(it, 4)
  again = data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 1, 2)
  again.set_state(state)
  for a, b in zip(expected, _take(again, 4)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  with pytest.raises(ValueError, match="different data setup"):
    data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 0, 2).set_state(state)


def _tokens(src):
  return sum(src.num_tokens(i) for i in range(len(src)))


def test_shares_hold_equal_tokens_not_equal_bytes(tmp_path):
  # jsonl escapes CJK text (6 file bytes per character, 3 UTF-8 bytes): equal
  # byte shares gave one process ~1.7x the other's tokens, so its documents
  # repeated less often and the en:zh mix depended on the process count.
  rng = np.random.default_rng(0)
  for lang, chars in (("en", "abcdefgh "), ("zh", "字节潜变换器模型")):
    with open(tmp_path / f"{lang}.jsonl", "w") as f:
      for _ in range(150):
        text = "".join(rng.choice(list(chars), int(rng.integers(20, 60))))
        f.write(json.dumps({"text": text}) + "\n")
  cfg = _cfg(sources=[str(tmp_path / "*.jsonl")], validation_fraction=0.1)
  train, _ = data.build_sources(cfg)
  total = _tokens(train)
  longest = max(train.num_tokens(i) for i in range(len(train)))
  for n in (2, 3):
    shares = [data.build_train_source(cfg, i, n) for i in range(n)]
    for share in shares:  # T/n tokens each, give or take one document.
      assert abs(_tokens(share) - total / n) <= longest, (n, _tokens(share))
    keys = [s.key(j) for s in shares for j in range(len(s))]
    assert keys == [train.key(j) for j in range(len(train))]  # A partition.
  # Simulated processes: each host's train iterator reads its token share.
  it = data.make_train_iterator(cfg, SEQ_LEN, 4, 0, 1, 2)
  assert next(it)["tokens"].shape == (2, SEQ_LEN)


def test_process_inside_one_huge_document_reads_it(tmp_path):
  # Process 1's bytes (and tokens) fall inside big.txt: it used to stop the
  # job at start; it now reads that document (the one its tokens lie in).
  (tmp_path / "big.txt").write_bytes(b"B" * 5000)
  (tmp_path / "small.txt").write_bytes(b"small")
  cfg = _cfg(sources=[str(tmp_path / "*.txt")], validation_fraction=0.0)
  shares = [data.build_train_source(cfg, i, 3) for i in range(3)]
  assert [[s.key(j) for j in range(len(s))] for s in shares] == [["big.txt"], ["big.txt"], ["small.txt"]]
  for host in range(3):
    batch = next(data.make_train_iterator(cfg, SEQ_LEN, 3, 0, host, 3))
    assert batch["tokens"].shape == (1, SEQ_LEN)
  # One document, two processes: both read it.
  one = _cfg(sources=[str(tmp_path / "small.txt")], validation_fraction=0.0)
  assert len(data.build_train_source(one, 1, 2)) == 1


# ------------------------------------------------------------ cloud storage --


def test_sources_at_a_url(tmp_path, fake_gcs):
  want = _mixed_corpus(epath.Path("gs://bucket/corpus"))
  src = data.file_corpus("gs://bucket/corpus/**/*.*")
  docs, keys = _all(src)
  assert docs == want
  assert keys[0] == "a.jsonl:1" and keys[-1] == "sub/d.txt"
  assert repr(src) == f"DocumentSource('files', {len(want)} documents)"
  # The same files on a local disk: the same documents, keys and batches.
  for key in fake_gcs.store:
    local = tmp_path / key
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(fake_gcs.cat_file(key))
  assert _all(data.file_corpus(str(tmp_path / "bucket" / "corpus" / "**" / "*.*"))) == (docs, keys)
  for i in range(2):
    batches = []
    for root in ("gs://bucket/corpus", str(tmp_path / "bucket" / "corpus")):
      cfg = _cfg(sources=[root + "/*.jsonl", root + "/sub/*.parquet"], validation_sources=[root + "/b.txt"])
      it = data.make_train_iterator(cfg, SEQ_LEN, 4, 0, i, 2)
      batches.append(_take(it, 3))
      it.close()
    for a, b in zip(*batches):
      np.testing.assert_array_equal(a["tokens"], b["tokens"])
  with pytest.raises(ValueError, match="matched no files"):
    data.file_corpus("gs://bucket/corpus/*.parquet")
  with pytest.raises(ValueError, match="does not exist"):
    data.file_corpus("gs://bucket/corpus/missing.jsonl")
