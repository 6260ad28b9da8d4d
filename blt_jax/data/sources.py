"""Document sources: the Python stdlib corpus and user files.

A source is a grain random-access data source: `len(source)` documents and
`source[i] -> bytes`, the raw document. Documents are never decoded to `str`
on the way in (txt and stdlib files are read as raw bytes), so any byte
sequence, invalid UTF-8 included, reaches the model unchanged.

Every document also has a stable string key (a relative path, plus a line or
row number for jsonl/parquet/arrow) that decides the train/validation split.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from typing import Protocol

import numpy as np

# File extension -> reader kind.
SUPPORTED_EXTENSIONS = {
    ".txt": "text",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
}
# Specials added around every document by `tokenizer.encode` (BOS, EOS).
_NUM_SPECIALS_PER_DOC = 2
# Directories never read from the stdlib: third-party packages, and the test
# suites (optional, they double the corpus with fixtures of odd encodings).
_STDLIB_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


class _Part(Protocol):
  """A run of documents from one kind of file (internal)."""

  def __len__(self) -> int: ...
  def get(self, i: int) -> bytes: ...
  def key(self, i: int) -> str: ...
  def num_bytes(self, i: int) -> int: ...


class _WholeFiles:
  """Whole files, one document each, read as raw bytes."""

  def __init__(self, paths: Sequence[str], keys: Sequence[str]):
    self._paths = list(paths)
    self._keys = list(keys)

  def __len__(self) -> int:
    return len(self._paths)

  def get(self, i: int) -> bytes:
    with open(self._paths[i], "rb") as f:
      return f.read()

  def key(self, i: int) -> str:
    return self._keys[i]

  def num_bytes(self, i: int) -> int:
    return os.path.getsize(self._paths[i])


def _jsonl_text(line: bytes, path: str, line_number: int, field: str) -> bytes:
  """Parses one jsonl line and returns its text field as UTF-8 bytes."""
  try:
    record = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
    raise ValueError(f"{path}:{line_number}: invalid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(
        f"{path}:{line_number}: expected a JSON object, got"
        f" {type(record).__name__}"
    )
  if field not in record:
    raise ValueError(
        f"{path}:{line_number}: missing text field {field!r} (keys:"
        f" {sorted(record)})"
    )
  text = record[field]
  if not isinstance(text, str):
    raise ValueError(
        f"{path}:{line_number}: field {field!r} must be a string, got"
        f" {type(text).__name__}"
    )
  # JSON may hold lone surrogates ("\ud800"); keep them as bytes, not an error.
  return text.encode("utf-8", "surrogatepass")


class _JsonlLines:
  """One document per non-blank line of a jsonl file (index of offsets)."""

  def __init__(self, path: str, key_prefix: str, field: str):
    self._path = path
    self._key_prefix = key_prefix
    self._field = field
    offsets, line_numbers, sizes = [], [], []
    offset = 0
    # One eager scan validates every line, so bad data fails before training
    # starts (with file and line), and records where each document lives.
    with open(path, "rb") as f:
      for line_number, line in enumerate(f, start=1):
        if line.strip():
          text = _jsonl_text(line, path, line_number, field)
          offsets.append(offset)
          line_numbers.append(line_number)
          sizes.append(len(text))
        offset += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    self._line_numbers = np.asarray(line_numbers, np.int64)
    self._sizes = np.asarray(sizes, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def get(self, i: int) -> bytes:
    with open(self._path, "rb") as f:
      f.seek(int(self._offsets[i]))
      line = f.readline()
    line_number = int(self._line_numbers[i])
    return _jsonl_text(line, self._path, line_number, self._field)

  def key(self, i: int) -> str:
    return f"{self._key_prefix}:{int(self._line_numbers[i])}"

  def num_bytes(self, i: int) -> int:
    return int(self._sizes[i])


def _read_arrow_table(path: str, kind: str):
  """Reads a parquet file or an Arrow IPC file/stream (feather v1 too)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.feather as feather  # pylint: disable=g-import-not-at-top
  import pyarrow.ipc as ipc  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  if kind == "parquet":
    try:
      return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"{path}: cannot read as parquet ({e})") from None
  # Memory-mapped, so a large uncompressed Arrow file costs no RAM up front.
  errors = []
  for open_fn in (ipc.open_file, ipc.open_stream):
    try:
      with pa.memory_map(path, "r") as source:
        return open_fn(source).read_all()
    except (pa.ArrowException, OSError) as e:
      errors.append(str(e))
  try:
    return feather.read_table(path)
  except (pa.ArrowException, OSError) as e:
    errors.append(str(e))
  raise ValueError(
      f"{path}: cannot read as an Arrow IPC file/stream or feather file"
      f" ({'; '.join(errors)})"
  )


class _ArrowColumn:
  """One document per row of a string/binary column (parquet or arrow)."""

  def __init__(self, path: str, key_prefix: str, column: str, kind: str):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top

    table = _read_arrow_table(path, kind)
    if column not in table.column_names:
      raise ValueError(
          f"{path}: no column {column!r}; available columns:"
          f" {table.column_names}"
      )
    array = table.column(column)
    if pa.types.is_string(array.type):
      array = array.cast(pa.binary())  # Same layout, so no copy.
    elif pa.types.is_large_string(array.type):
      array = array.cast(pa.large_binary())
    elif not (
        pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)
    ):
      raise ValueError(
          f"{path}: column {column!r} has type {array.type}; expected string"
          " or binary"
      )
    if array.null_count:
      first_null = int(np.flatnonzero(array.is_null().to_numpy())[0])
      raise ValueError(
          f"{path}: column {column!r} has {array.null_count} null value(s),"
          f" first at row {first_null}"
      )
    self._key_prefix = key_prefix
    self._chunks = [c for c in array.chunks if len(c)]
    self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
    self._sizes = pc.binary_length(array).to_numpy().astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def get(self, i: int) -> bytes:
    c = bisect.bisect_right(self._starts, i) - 1
    return self._chunks[c][i - int(self._starts[c])].as_py()

  def key(self, i: int) -> str:
    return f"{self._key_prefix}:{i}"

  def num_bytes(self, i: int) -> int:
    return int(self._sizes[i])


class DocumentSource:
  """Random-access documents (raw bytes) over several files.

  Implements grain's RandomAccessDataSource protocol. `select` gives views on
  a subset (the train/validation split) without re-reading anything.
  """

  # Names of extra per-token float arrays this source provides (none here; a
  # precomputed-entropy source would list e.g. ("entropies",)).
  extra_fields: tuple[str, ...] = ()

  def __init__(
      self,
      parts: Sequence[_Part],
      indices: np.ndarray | None = None,
      name: str = "documents",
  ):
    self._parts = list(parts)
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])
    total = int(self._starts[-1])
    self._indices = (
        np.arange(total, dtype=np.int64)
        if indices is None
        else np.asarray(indices, np.int64)
    )
    self.name = name

  def __len__(self) -> int:
    return len(self._indices)

  def _locate(self, i: int) -> tuple[_Part, int]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range [0, {len(self)})")
    flat = int(self._indices[i])
    p = bisect.bisect_right(self._starts, flat) - 1
    return self._parts[p], flat - int(self._starts[p])

  def __getitem__(self, i: int) -> bytes:
    part, j = self._locate(i)
    return part.get(j)

  def key(self, i: int) -> str:
    part, j = self._locate(i)
    return part.key(j)

  def num_bytes(self, i: int) -> int:
    part, j = self._locate(i)
    return part.num_bytes(j)

  def num_tokens(self, i: int) -> int:
    """Length of document `i` once encoded as `[BOS] bytes [EOS]`."""
    return self.num_bytes(i) + _NUM_SPECIALS_PER_DOC

  def select(self, positions: np.ndarray, name: str) -> DocumentSource:
    """Returns the documents at `positions` (indices into this source)."""
    return DocumentSource(self._parts, self._indices[positions], name)

  def split(
      self, validation_fraction: float
  ) -> tuple[DocumentSource, DocumentSource]:
    """Deterministic (train, validation) split by a stable hash of each key."""
    keys = (self.key(i) for i in range(len(self)))
    is_val = np.array(
        [in_validation(k, validation_fraction) for k in keys], dtype=bool
    )
    return (
        self.select(np.flatnonzero(~is_val), f"{self.name}[train]"),
        self.select(np.flatnonzero(is_val), f"{self.name}[validation]"),
    )

  def __repr__(self) -> str:
    return f"DocumentSource({self.name!r}, {len(self)} documents)"


def in_validation(key: str, validation_fraction: float) -> bool:
  """Whether the document with `key` belongs to the validation split.

  Uses blake2b (not Python's salted `hash`) so the split is the same in every
  process, run and machine.
  """
  digest = hashlib.blake2b(
      key.encode("utf-8", "surrogateescape"), digest_size=8
  ).digest()
  return int.from_bytes(digest, "big") < validation_fraction * 2.0**64


def stdlib_files(include_tests: bool = False) -> list[tuple[str, str]]:
  """(path, relative posix path) of each stdlib `*.py`, sorted by the latter."""
  root = sysconfig.get_paths()["stdlib"]
  skip = _STDLIB_THIRD_PARTY_DIRS | (
      frozenset() if include_tests else _STDLIB_TEST_DIRS
  )
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip and d != "__pycache__"]
    for filename in filenames:
      if filename.endswith(".py"):
        path = os.path.join(dirpath, filename)
        found.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
  found.sort(key=lambda item: item[1])
  return found


def stdlib_corpus(include_tests: bool = False) -> DocumentSource:
  """The running Python's standard library sources, one document per file."""
  files = stdlib_files(include_tests)
  if not files:
    raise ValueError(
        f"no *.py files under the stdlib {sysconfig.get_paths()['stdlib']!r}"
    )
  paths, keys = zip(*files)
  return DocumentSource([_WholeFiles(paths, keys)], name="stdlib")


def _has_magic(s: str) -> bool:
  return any(c in s for c in "*?[")


def _glob_root(pattern: str) -> str:
  """The leading directories of `pattern` that contain no wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if _has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or "."


def resolve_paths(patterns: str | Sequence[str]) -> list[tuple[str, str]]:
  """Expands paths and glob patterns to (file path, split key) pairs.

  Keys are paths relative to the pattern's fixed leading directory, so the
  split does not depend on where the data is mounted.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  resolved, seen = [], set()
  for pattern in patterns:
    pattern = os.path.expanduser(os.fspath(pattern))
    if _has_magic(pattern):
      matches = sorted(
          p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)
      )
      if not matches:
        raise ValueError(f"data source pattern {pattern!r} matched no files")
      root = _glob_root(pattern)
    else:
      if not os.path.exists(pattern):
        raise ValueError(f"data source {pattern!r} does not exist")
      if os.path.isdir(pattern):
        raise ValueError(
            f"data source {pattern!r} is a directory; give files or a glob"
            f" such as {os.path.join(pattern, '**', '*.txt')!r}"
        )
      matches = [pattern]
      root = os.path.dirname(pattern) or "."
    for path in matches:
      ext = os.path.splitext(path)[1].lower()
      if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file extension {ext!r} (from source"
            f" {pattern!r}); supported: {sorted(SUPPORTED_EXTENSIONS)}"
        )
      real = os.path.realpath(path)
      if real in seen:  # Overlapping patterns must not duplicate documents.
        continue
      seen.add(real)
      key = os.path.relpath(path, root).replace(os.sep, "/")
      resolved.append((path, key))
  return resolved


def file_corpus(
    patterns: str | Sequence[str], text_field: str = "text", name: str = "files"
) -> DocumentSource:
  """Documents from txt/jsonl/parquet/arrow files given as paths or globs.

  Args:
    patterns: paths and/or glob patterns (`**` recurses), possibly mixed.
    text_field: the jsonl field / parquet or arrow column holding the text.
    name: a label for error messages and reprs.

  Returns:
    A DocumentSource; `.txt` files are one document each, jsonl files one per
    non-blank line, parquet/arrow files one per row.
  """
  files = resolve_paths(patterns)
  if not files:
    raise ValueError(f"no data sources given for {name!r}")
  parts: list[_Part] = []
  text_paths, text_keys = [], []

  def flush_text():
    if text_paths:
      parts.append(_WholeFiles(list(text_paths), list(text_keys)))
      text_paths.clear()
      text_keys.clear()

  for path, key in files:
    kind = SUPPORTED_EXTENSIONS[os.path.splitext(path)[1].lower()]
    if kind == "text":
      text_paths.append(path)
      text_keys.append(key)
      continue
    flush_text()
    if kind == "jsonl":
      parts.append(_JsonlLines(path, key, text_field))
    else:
      parts.append(_ArrowColumn(path, key, text_field, kind))
  flush_text()
  return DocumentSource(parts, name=name)
