"""Documents to score: every input kind hands the scorer the bytes it holds, unchanged."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest

from blt_jax import score_inputs

RAW = [b"\xff\xfe", b"caf\xe9", "naïve café".encode(), b"ok"]  # invalid UTF-8 first


def _data(inputs, **kwargs):
  return [r.data if isinstance(r, score_inputs.Document) else str(r) for r in score_inputs.read(inputs, **kwargs)]


def test_parquet_binary_and_string_columns_give_their_bytes(tmp_path):
  """Binary columns (plain and large) keep invalid UTF-8 as it is; string columns give their UTF-8."""
  texts = [r.decode() for r in RAW[2:]]
  table = pa.table(
      {
          "bin": pa.array(RAW, pa.binary()),
          "large_bin": pa.array(RAW, pa.large_binary()),
          "str": pa.array(texts + texts, pa.string()),
          "large_str": pa.array(texts + texts, pa.large_string()),
      }
  )
  pq.write_table(table, tmp_path / "docs.parquet")
  for column in ("bin", "large_bin"):
    assert _data([str(tmp_path / "docs.parquet")], text_field=column) == RAW
  for column in ("str", "large_str"):
    assert _data([str(tmp_path / "docs.parquet")], text_field=column) == RAW[2:] * 2


def test_txt_and_jsonl_give_their_bytes(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"\n".join(RAW) + b"\n")
  assert _data([str(tmp_path / "a.txt")]) == RAW
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": r.decode()}) + "\n" for r in RAW[2:]))
  assert _data([str(tmp_path / "b.jsonl")]) == RAW[2:]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet"])
def test_inputs_are_streamed_not_read_whole(tmp_path, suffix):
  """The first documents of a 9-16 MB file arrive with memory far below the file's size (it was read whole)."""
  import tracemalloc  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  texts = [f"document {i} " + rng.bytes(2000).hex() for i in range(4000)]  # incompressible enough for parquet
  path = tmp_path / f"big{suffix}"
  if suffix == ".jsonl":
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  elif suffix == ".txt":
    path.write_text("".join(t + "\n" for t in texts))
  else:
    pq.write_table(pa.table({"text": texts}), path, row_group_size=256)
  size = path.stat().st_size
  assert size > 8e6
  arrow_before = pa.total_allocated_bytes()
  tracemalloc.start()
  try:
    records = score_inputs.read([str(path)])
    first = [next(records) for _ in range(10)]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert [r.data for r in first] == [t.encode() for t in texts[:10]]
  assert peak < size / 3, (peak, size)  # Python objects
  assert pa.total_allocated_bytes() - arrow_before < size / 3  # arrow's own buffers (parquet)
