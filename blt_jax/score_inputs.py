"""Documents to score, read from `.jsonl`, `.txt`, `.parquet` files or jsonl on stdin, with per-line errors.

Every document gets a global `index` (its position over all inputs, in the order given, files of a glob sorted), so
a resumed or multi-process run can tell which documents are done. A bad record (malformed json, missing field,
empty text) becomes an `InputError` naming the file and line, and reading goes on; a missing input stops before
anything is scored.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import json
import sys
from typing import Iterator, List, Sequence, Union

from blt_jax import paths

SUFFIXES = (".jsonl", ".txt", ".parquet")
STDIN = "-"


@dataclasses.dataclass(frozen=True)
class Document:
  index: int  # position over all inputs
  id: str  # the record's `id` field, else `file:line`
  data: bytes  # the UTF-8 (or raw) bytes to score


@dataclasses.dataclass(frozen=True)
class InputError:
  index: int
  source: str
  line: int  # 1-based line (jsonl, txt) or row (parquet); 0 for a whole file
  message: str

  def __str__(self) -> str:
    return f"{self.source}:{self.line}: {self.message}" if self.line else f"{self.source}: {self.message}"


Record = Union[Document, InputError]


class MissingInputError(FileNotFoundError):
  """An --input names nothing that exists or has an unsupported suffix."""


def expand(inputs: Sequence[str]) -> List[str]:
  """Input paths, globs expanded (sorted); fails, naming every bad input, before anything is read."""
  out, problems = [], []
  for spec in inputs:
    if spec == STDIN:
      out.append(spec)
      continue
    if any(ch in spec for ch in "*?["):
      if paths.is_url(spec):
        scheme_root, _, pattern = spec.partition("://")
        bucket, _, rest = pattern.partition("/")
        matches = sorted(str(p) for p in paths.epath.Path(f"{scheme_root}://{bucket}").glob(rest))
      else:
        matches = sorted(glob_lib.glob(spec, recursive=True))
      if not matches:
        problems.append(f"{spec}: the pattern matches no file")
      out.extend(matches)
    elif not paths.resolve(spec).exists():
      problems.append(f"{spec}: no such file")
    else:
      out.append(spec)
  for path in out:
    if path != STDIN and not path.endswith(SUFFIXES):
      problems.append(f"{path}: unsupported input type (expected {', '.join(SUFFIXES)}, or - for jsonl on stdin)")
  if problems:
    raise MissingInputError("; ".join(problems))
  return out


def _from_json_record(record, source: str, line: int, text_field: str, index: int) -> Record:
  if not isinstance(record, dict):
    return InputError(index, source, line, f"expected a json object, got {type(record).__name__}")
  if text_field not in record:
    return InputError(index, source, line, f"missing field {text_field!r} (fields: {sorted(record)[:8]})")
  text = record[text_field]
  if not isinstance(text, (str, bytes)):  # bytes: a parquet binary column
    return InputError(index, source, line, f"field {text_field!r} is {type(text).__name__}, not a string")
  if not text:
    return InputError(index, source, line, f"empty text in field {text_field!r}")
  doc_id = record.get("id")
  doc_id = f"{source}:{line}" if doc_id is None else str(doc_id)
  # Bytes are scored as they are; JSON's lone surrogates ("\udcff") become bytes, as in training (data/sources.py).
  data = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
  return Document(index, doc_id, data)


def _jsonl(lines: Iterator[bytes], source: str, text_field: str, start: int) -> Iterator[Record]:
  for i, raw in enumerate(lines):
    line = i + 1
    try:
      record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      yield InputError(start + i, source, line, f"malformed json ({e})")
      continue
    yield _from_json_record(record, source, line, text_field, start + i)


def _lines(path: str) -> Iterator[bytes]:
  """The lines of a file (newline and a trailing CR removed), read as they are needed: memory stays one line."""
  with paths.resolve(path).open("rb") as f:
    for raw in f:
      raw = raw[:-1] if raw.endswith(b"\n") else raw
      yield raw[:-1] if raw.endswith(b"\r") else raw


def _txt_lines(lines: Iterator[bytes], source: str, start: int) -> Iterator[Record]:
  for i, raw in enumerate(lines):
    if raw:
      yield Document(start + i, f"{source}:{i + 1}", raw)
    else:
      yield InputError(start + i, source, i + 1, "empty line (nothing to score)")


# Parquet rows read per batch: memory stays one batch of rows, not the whole file.
PARQUET_BATCH_ROWS = 256


def _parquet(path: str, text_field: str, start: int) -> Iterator[Record]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  with paths.resolve(path).open("rb") as f:
    parquet = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering a Python file object reads it whole
    names = parquet.schema_arrow.names
    if text_field not in names:
      yield InputError(start, path, 0, f"no column {text_field!r} (columns: {names})")
      return
    columns = [text_field] + (["id"] if "id" in names else [])
    i = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
      texts = batch.column(text_field).to_pylist()
      ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
      for text, doc_id in zip(texts, ids):
        yield _from_json_record({text_field: text, "id": doc_id}, path, i + 1, text_field, start + i)
        i += 1


def read(inputs: Sequence[str], text_field: str = "text", whole_file: bool = False) -> Iterator[Record]:
  """Documents and input errors of every input, in order, with consecutive indices.

  `.txt`: one document per line (`whole_file`: one per file). `.txt` and parquet binary columns give their bytes as
  they are (invalid UTF-8 included); jsonl and parquet string columns give their text's UTF-8. Files are streamed
  (a line, or a batch of parquet rows, at a time): memory does not grow with the file.
  """
  index = 0
  for path in expand(inputs):
    if path == STDIN:
      records = _jsonl(iter(sys.stdin.buffer.readline, b""), "stdin", text_field, index)
    elif path.endswith(".jsonl"):
      records = _jsonl(_lines(path), path, text_field, index)
    elif path.endswith(".txt") and whole_file:
      with paths.resolve(path).open("rb") as f:
        data = f.read()
      records = iter([Document(index, path, data) if data else InputError(index, path, 0, "empty file")])
    elif path.endswith(".txt"):
      records = _txt_lines(_lines(path), path, index)
    else:
      records = _parquet(path, text_field, index)
    count = 0
    for record in records:
      count += 1
      yield record
    index += count


def tokens_of(data: bytes, with_eos: bool) -> List[int]:
  """The scoring convention: `[BOS] + bytes (+ [EOS])` as model ids."""
  from blt_jax import tokenizer  # pylint: disable=g-import-not-at-top

  return tokenizer.encode(data, add_bos=True, add_eos=with_eos)
