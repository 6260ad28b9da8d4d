"""Documents to score: every input kind hands the scorer the bytes it holds, unchanged."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from blt_jax import score_inputs

RAW = [b"\xff\xfe", b"caf\xe9", "naïve café".encode(), b"ok"]  # invalid UTF-8 first


def _data(inputs, **kwargs):
  return [r.data if isinstance(r, score_inputs.Document) else str(r) for r in score_inputs.read(inputs, **kwargs)]


def test_parquet_binary_and_string_columns_give_their_bytes(tmp_path):
  """Binary columns (plain and large) keep invalid UTF-8 as it is; string columns give their UTF-8."""
  texts = [r.decode() for r in RAW[2:]]
  table = pa.table({"bin": pa.array(RAW, pa.binary()), "large_bin": pa.array(RAW, pa.large_binary()),
                    "str": pa.array(texts + texts, pa.string()), "large_str": pa.array(texts + texts, pa.large_string())})
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
