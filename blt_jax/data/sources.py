"""Document sources: the Python stdlib corpus and user files (local or URLs).

A source is a grain random-access data source: `len(source)` documents and
`source[i] -> bytes`, the raw document. Documents are never decoded to `str`
on the way in (txt and stdlib files are read as raw bytes), so any byte
sequence, invalid UTF-8 included, reaches the model unchanged.

Every document also has a stable string key (a relative path, plus a line or
row number for jsonl/parquet/arrow) that decides the train/validation split.

A source can be built for one process's share of the corpus (`shard=(i, n)`):
the files, in their sorted order, are laid end to end, and process i takes
the documents that start in bytes [i*T/n, (i+1)*T/n) of those T bytes (a
text file by its first byte, a jsonl line by its first byte, a parquet/arrow
row by its file's bytes spread evenly over its rows). Building a share lists
and stats the files and reads only the share's bytes, so start-up work per
process falls as processes are added. The one exception: the keys of a jsonl
file split between processes count the newlines before the share's first
line (no parsing), read only when keys are asked for (the hash split, an
entropy store).
"""

from __future__ import annotations

import array
import bisect
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import sysconfig
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from etils import epath

from blt_jax import paths

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
# Bytes read at a time when scanning jsonl files.
_READ_BLOCK = 1 << 22
# Concurrent `stat` calls when listing files (a request each on object stores).
_STAT_THREADS = 16
# Skipped bad records named (as `file:line: reason`) per part; the rest only
# counted.
_BAD_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class _File:
  """One input file: where it is, its split key, its reader kind and size."""

  path: epath.Path
  key: str
  kind: str
  size: int


def shard_bounds(total: int, shard: tuple[int, int]) -> tuple[int, float]:
  """Bytes [lo, hi) of the corpus's `total` that process i of n owns.

  `shard` is (i, n); the last process's range runs to the end.
  """
  i, n = shard
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"invalid shard {shard}: expected (index, count), 0 <= index < count")
  return total * i // n, (total * (i + 1) // n if i < n - 1 else math.inf)


class _Part(Protocol):
  """A run of documents from one kind of file (internal)."""

  def __len__(self) -> int:
    ...

  def get(self, i: int) -> bytes:
    ...

  def key(self, i: int) -> str:
    ...

  def num_bytes(self, i: int) -> int:
    ...

  def sizes(self) -> np.ndarray:
    ...  # num_bytes of every document, int64

  bad: BadRecords  # Records skipped as unreadable.


@dataclasses.dataclass
class BadRecords:
  """Records skipped as unreadable (`on_bad_record="skip"`): how many, and
  the first few as `file:line: reason`."""

  count: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)

  def add(self, where: str, reason: str) -> None:
    self.count += 1
    if len(self.examples) < _BAD_EXAMPLES:
      self.examples.append(f"{where}: {reason}")

  def merge(self, other: BadRecords) -> None:
    self.count += other.count
    room = _BAD_EXAMPLES - len(self.examples)
    self.examples += other.examples[: max(room, 0)]


def _check_on_bad_record(on_bad_record: str) -> bool:
  """Whether bad records are skipped (else they are an error)."""
  if on_bad_record not in ("error", "skip"):
    raise ValueError(f"data.on_bad_record={on_bad_record!r}: expected 'error' or 'skip'")
  return on_bad_record == "skip"


class _WholeFiles:
  """Whole files, one document each, read as raw bytes."""

  def __init__(self, files: Sequence[_File]):
    self._files = list(files)

  def __len__(self) -> int:
    return len(self._files)

  def get(self, i: int) -> bytes:
    return self._files[i].path.read_bytes()

  def key(self, i: int) -> str:
    return self._files[i].key

  def num_bytes(self, i: int) -> int:
    return self._files[i].size

  def sizes(self) -> np.ndarray:
    return np.array([f.size for f in self._files], np.int64)

  bad = BadRecords()  # Raw bytes: a text file has no bad records.


class _BadLine(ValueError):
  """A jsonl line without document text (the reason, not the file:line)."""


def _jsonl_text(line: bytes, field: str) -> bytes:
  """Parses one jsonl line and returns its text field as UTF-8 bytes."""
  try:
    record = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
    raise _BadLine(f"invalid JSON ({e})") from None
  if not isinstance(record, dict):
    raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
  if field not in record:
    raise _BadLine(f"missing text field {field!r} (keys: {sorted(record)})")
  text = record[field]
  if not isinstance(text, str):
    raise _BadLine(f"field {field!r} must be a string, got {type(text).__name__}")
  # JSON may hold lone surrogates ("\ud800"); keep them as bytes, not an error.
  return text.encode("utf-8", "surrogatepass")


def _lines(f, start: int, stop: float) -> Iterator[tuple[int, bytes]]:
  """(offset, line with its newline) of every line starting in [start, stop).

  The line that holds byte `start - 1` starts before `start`: it is read up
  to its newline and dropped (it belongs to the share before).
  """
  pos = max(start - 1, 0)
  f.seek(pos)
  skip = start > 0
  head = []  # The pieces read so far of the line at `pos`.
  while pos < stop:
    block = f.read(_READ_BLOCK)
    if not block:
      if head:
        yield pos, b"".join(head)
      return
    begin = 0
    while pos < stop:
      j = block.find(b"\n", begin)
      if j < 0:
        if skip:
          pos += len(block) - begin
        else:
          head.append(block[begin:])
        break
      if skip:
        pos += j + 1 - begin
        skip = False
      else:
        head.append(block[begin : j + 1])
        line = b"".join(head)
        head = []
        yield pos, line
        pos += len(line)
      begin = j + 1


def _count_newlines(f, size: int) -> int:
  """Newlines in the next `size` bytes of `f`.

  Reads into one reused buffer: twice as fast as `read` at ~1 GB/s.
  """
  buf = bytearray(min(_READ_BLOCK, size))
  view, count = memoryview(buf), 0
  while size > 0:
    n = f.readinto(view[: min(len(buf), size)])
    if not n:
      break
    block = buf if n == len(buf) else view[:n].tobytes()
    count += block.count(b"\n")
    size -= n
  return count


class _JsonlLines:
  """One document per non-blank line of a jsonl file starting in [start, stop).

  An index of byte offsets; line numbers (for keys and errors) count from the
  file's first line, whose newlines before `start` are counted only when a
  line number is first needed.
  """

  def __init__(
      self,
      file: _File,
      field: str,
      start: int = 0,
      stop: float = math.inf,
      skip_bad: bool = False,
  ):
    self._file = file
    self._field = field
    self.bad = BadRecords()
    self._base_lock = threading.Lock()
    self._base = None  # line number of the first line at or after `start`
    offsets, lengths, line_indices, sizes = (array.array("q") for _ in range(4))
    # One eager scan of the share validates every line, so bad data fails
    # (or, with `skip_bad`, is left out and counted) before training starts,
    # with file and line, and records where each document lives.
    self._first = 0  # Offset of the first line: k counts lines from there.
    with file.path.open("rb") as f:
      for k, (offset, line) in enumerate(_lines(f, start, stop)):
        if k == 0:
          self._first = offset
        if not line.strip():
          continue
        try:
          text = _jsonl_text(line, field)
        except _BadLine as e:
          if not skip_bad:
            raise ValueError(f"{self._where(k)}: {e}") from None
          self.bad.add(self._where(k), str(e))
          continue
        offsets.append(offset)
        lengths.append(len(line))
        line_indices.append(k)
        sizes.append(len(text))
    self._offsets = np.frombuffer(offsets, np.int64)
    self._lengths = np.frombuffer(lengths, np.int64)
    self._line_indices = np.frombuffer(line_indices, np.int64)
    self._sizes = np.frombuffer(sizes, np.int64)

  def _line_number(self, k: int) -> int:
    """1-based line number in the file of this part's k-th line."""
    with self._base_lock:
      if self._base is None:
        newlines = 0
        if self._first:
          with self._file.path.open("rb") as f:
            newlines = _count_newlines(f, self._first)
        self._base = newlines + 1
    return self._base + k

  def _where(self, k: int) -> str:
    return f"{self._file.path}:{self._line_number(k)}"

  def __len__(self) -> int:
    return len(self._offsets)

  def get(self, i: int) -> bytes:
    with self._file.path.open("rb") as f:
      f.seek(int(self._offsets[i]))
      line = f.read(int(self._lengths[i]))
    try:
      return _jsonl_text(line, self._field)
    except _BadLine as e:
      raise ValueError(f"{self._where(int(self._line_indices[i]))}: {e}") from None

  def key(self, i: int) -> str:
    return f"{self._file.key}:{self._line_number(int(self._line_indices[i]))}"

  def num_bytes(self, i: int) -> int:
    return int(self._sizes[i])

  def sizes(self) -> np.ndarray:
    return self._sizes


def _row_range(size: int, num_rows: int, start: int, stop: float) -> tuple[int, int]:
  """The rows [lo, hi) of a file in its bytes [start, stop).

  Row r counts as sitting at byte `size * r // num_rows`: a file's rows are
  spread evenly over its bytes.
  """
  if not num_rows:
    return 0, 0
  size = max(size, 1)

  def first_at_or_after(b):
    return num_rows if b >= size else max(0, -(-b * num_rows // size))

  return first_at_or_after(start), first_at_or_after(stop)


def _read_parquet(file: _File, column: str, start: int, stop: float):
  """(first row, column) of a parquet file's rows in its bytes [start, stop).

  Reads the footer, then only the row groups holding those rows.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    with file.path.open("rb") as f:
      pf = pq.ParquetFile(f)
      names = pf.schema_arrow.names
      if column not in names:
        raise ValueError(f"{file.path}: no column {column!r}; available columns: {names}")
      lo, hi = _row_range(file.size, pf.metadata.num_rows, start, stop)
      groups, group_start, first = [], 0, None
      for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if group_start < hi and group_start + n > lo:
          groups.append(g)
          first = group_start if first is None else first
        group_start += n
      if not groups:
        return lo, None
      table = pf.read_row_groups(groups, columns=[column])
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{file.path}: cannot read as parquet ({e})") from None
  return lo, table.column(column).slice(lo - first, hi - lo)


def _read_arrow(file: _File, column: str, start: int, stop: float):
  """(first row, column) of an Arrow IPC file or stream's (feather v1 too)
  rows in its bytes [start, stop)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.feather as feather  # pylint: disable=g-import-not-at-top
  import pyarrow.ipc as ipc  # pylint: disable=g-import-not-at-top

  # A local file is memory-mapped, so a large uncompressed one costs no RAM
  # up front; a URL's is read once (IPC needs random access).
  remote = None
  if paths.is_url(file.path):
    remote = pa.py_buffer(file.path.read_bytes())

  def source():
    if remote is not None:
      return pa.BufferReader(remote)
    return pa.memory_map(str(file.path), "r")

  table, errors = None, []
  for read in (
      lambda: ipc.open_file(source()).read_all(),
      lambda: ipc.open_stream(source()).read_all(),
      lambda: feather.read_table(source()),
  ):
    try:
      table = read()
      break
    except (pa.ArrowException, OSError) as e:
      errors.append(str(e))
  if table is None:
    raise ValueError(f"{file.path}: cannot read as an Arrow IPC file/stream or feather" f" file ({'; '.join(errors)})")
  if column not in table.column_names:
    raise ValueError(f"{file.path}: no column {column!r}; available columns:" f" {table.column_names}")
  lo, hi = _row_range(file.size, table.num_rows, start, stop)
  return lo, table.column(column).slice(lo, hi - lo)


class _ArrowColumn:
  """One document per row of a string/binary column (parquet or arrow).

  Holds the rows in the file bytes [start, stop) (see `_row_range`).
  """

  def __init__(
      self,
      file: _File,
      column: str,
      start: int = 0,
      stop: float = math.inf,
      skip_bad: bool = False,
  ):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top

    read = _read_parquet if file.kind == "parquet" else _read_arrow
    self._first_row, array = read(file, column, start, stop)
    if array is None:
      array = pa.chunked_array([], pa.binary())
    if pa.types.is_string(array.type):
      array = array.cast(pa.binary())  # Same layout, so no copy.
    elif pa.types.is_large_string(array.type):
      array = array.cast(pa.large_binary())
    elif not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
      raise ValueError(f"{file.path}: column {column!r} has type {array.type}; expected" " string or binary")
    self.bad = BadRecords()
    self._rows = None  # Rows of `array` that hold documents, if not all.
    if array.null_count:
      nulls = array.is_null().to_numpy()
      first_null = self._first_row + int(np.flatnonzero(nulls)[0])
      if not skip_bad:
        raise ValueError(
            f"{file.path}: column {column!r} has {array.null_count} null" f" value(s), first at row {first_null}"
        )
      for row in np.flatnonzero(nulls)[:_BAD_EXAMPLES]:
        self.bad.add(f"{file.path}:{self._first_row + int(row)}", f"null {column!r}")
      self.bad.count = int(array.null_count)
      self._rows = np.flatnonzero(~nulls)
    self._key_prefix = file.key
    self._chunks = [c for c in array.chunks if len(c)]
    self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
    self._sizes = np.zeros(0, np.int64)
    if len(array):
      lengths = pc.binary_length(array).to_numpy()
      if self._rows is not None:
        lengths = lengths[self._rows]
      self._sizes = lengths.astype(np.int64)

  def _row(self, i: int) -> int:
    """The row of `array` (from the share's first) of document `i`."""
    return i if self._rows is None else int(self._rows[i])

  def __len__(self) -> int:
    return len(self._sizes)

  def get(self, i: int) -> bytes:
    i = self._row(i)
    c = bisect.bisect_right(self._starts, i) - 1
    return self._chunks[c][i - int(self._starts[c])].as_py()

  def key(self, i: int) -> str:
    return f"{self._key_prefix}:{self._first_row + self._row(i)}"

  def num_bytes(self, i: int) -> int:
    return int(self._sizes[i])

  def sizes(self) -> np.ndarray:
    return self._sizes


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
    self._indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
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

  def token_counts(self) -> np.ndarray:
    """`num_tokens` of every document (int64), without reading any."""
    sizes = [p.sizes() for p in self._parts] + [np.zeros(0, np.int64)]
    return np.concatenate(sizes)[self._indices] + _NUM_SPECIALS_PER_DOC

  def select(self, positions: np.ndarray, name: str) -> DocumentSource:
    """Returns the documents at `positions` (indices into this source)."""
    return DocumentSource(self._parts, self._indices[positions], name)

  def bad_records(self) -> BadRecords:
    """The bad records skipped in the files of this source's parts (of the
    whole share or corpus it was selected from)."""
    bad = BadRecords()
    for part in self._parts:
      bad.merge(part.bad)
    return bad

  def key_hashes(self) -> list[int]:
    """`key_hash` of every document's key (Python ints: exact 64 bits)."""
    return [key_hash(self.key(i)) for i in range(len(self))]

  def split(self, validation_fraction: float) -> tuple[DocumentSource, DocumentSource]:
    """Deterministic (train, validation) split by a stable hash of each key."""
    return self.split_by_hash(validation_fraction * 2.0**64)

  def split_by_hash(
      self, threshold: float, hashes: Sequence[int] | None = None
  ) -> tuple[DocumentSource, DocumentSource]:
    """(train, validation): validation holds the keys hashing below
    `threshold` (`hashes`: this source's `key_hashes()`, if already known)."""
    hashes = self.key_hashes() if hashes is None else hashes
    is_val = np.array([h < threshold for h in hashes], dtype=bool)
    return (
        self.select(np.flatnonzero(~is_val), f"{self.name}[train]"),
        self.select(np.flatnonzero(is_val), f"{self.name}[validation]"),
    )

  def __repr__(self) -> str:
    return f"DocumentSource({self.name!r}, {len(self)} documents)"


def concat(sources: Sequence[DocumentSource], name: str) -> DocumentSource:
  """The documents of `sources`, one after the other, as one source."""
  parts, indices, offset = [], [np.zeros(0, np.int64)], 0
  for source in sources:
    parts += source._parts  # pylint: disable=protected-access
    indices.append(source._indices + offset)  # pylint: disable=protected-access
    offset += int(source._starts[-1])  # pylint: disable=protected-access
  return DocumentSource(parts, np.concatenate(indices), name)


def in_validation(key: str, validation_fraction: float) -> bool:
  """Whether the document with `key` belongs to the validation split.

  Uses blake2b (not Python's salted `hash`) so the split is the same in every
  process, run and machine.
  """
  return key_hash(key) < validation_fraction * 2.0**64


def key_hash(key: str) -> int:
  """A document key's stable 64-bit hash, which places it in the split."""
  digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
  return int.from_bytes(digest, "big")


def _stat_sizes(files: Sequence[epath.Path]) -> list[int]:
  """Sizes of `files`; concurrently, as each is a request on object stores."""
  if len(files) < 2:
    return [f.stat().length for f in files]
  with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
    return list(pool.map(lambda f: f.stat().length, files))


def stdlib_files(include_tests: bool = False) -> list[tuple[epath.Path, str]]:
  """(path, relative posix path) of each stdlib `*.py`, sorted by the latter."""
  root = epath.Path(sysconfig.get_paths()["stdlib"])
  skip = _STDLIB_THIRD_PARTY_DIRS | (frozenset() if include_tests else _STDLIB_TEST_DIRS)
  found = []
  for dirpath, dirnames, filenames in root.walk():
    dirnames[:] = [d for d in dirnames if d not in skip and d != "__pycache__"]
    for filename in filenames:
      if filename.endswith(".py"):
        path = dirpath / filename
        found.append((path, path.relative_to(root).as_posix()))
  found.sort(key=lambda item: item[1])
  return found


def stdlib_corpus(include_tests: bool = False, shard: tuple[int, int] = (0, 1)) -> DocumentSource:
  """The running Python's standard library sources, one document per file.

  With `shard=(i, n)`, process i's share (see the module docstring).
  """
  found = stdlib_files(include_tests)
  if not found:
    raise ValueError(f"no *.py files under the stdlib {sysconfig.get_paths()['stdlib']!r}")
  sizes = _stat_sizes([path for path, _ in found])
  files = [_File(path, key, "text", size) for (path, key), size in zip(found, sizes)]
  return _corpus(files, "", "stdlib", shard)


def _check_unique_key(owners: dict[str, tuple[str, str]], key: str, path: epath.Path, pattern: str) -> None:
  """Records `key` for `path`; a key already naming another file is an error.

  Keys decide the split and find a document's stored entropies, so two files
  with one key would silently share them.
  """
  if key not in owners:
    owners[key] = (str(path), pattern)
    return
  other, other_pattern = owners[key]
  parts = [a.split("/") for a in (other, str(path))]
  common = []
  for a, b in zip(*parts):
    if a != b:
      break
    common.append(a)
  hint = "/".join(common + ["**", "*" + path.suffix])
  raise ValueError(
      f"data sources: document key {key!r} names two files, {other} (from"
      f" {other_pattern!r}) and {path} (from {pattern!r}); keys are paths"
      " relative to each pattern's fixed leading directory, so give such"
      f" files one pattern from their common directory (e.g. {hint!r})"
  )


def list_files(patterns: str | Sequence[str]) -> list[_File]:
  """Expands paths and glob patterns (local or URLs) to the files they name.

  Keys are paths relative to the pattern's fixed leading directory, so the
  split does not depend on where the data is mounted. Two files with one key
  (`en/*.jsonl` and `de/*.jsonl` both holding `part-0000.jsonl`) are an
  error; a file named by several patterns is listed once.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  found, seen, owners = [], set(), {}
  for pattern in patterns:
    text = os.fspath(pattern)
    if paths.has_magic(text):
      root, matches = paths.glob(text)
      matches = [m for m in matches if not m.is_dir()]
      if not matches:
        raise ValueError(f"data source pattern {text!r} matched no files")
    else:
      path = paths.resolve(text)
      if not path.exists():
        raise ValueError(f"data source {text!r} does not exist")
      if path.is_dir():
        raise ValueError(
            f"data source {text!r} is a directory; give files or a glob" f" such as {str(path / '**' / '*.txt')!r}"
        )
      root, matches = path.parent, [path]
    for path in matches:
      ext = path.suffix.lower()
      if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unsupported file extension {ext!r} (from source"
            f" {text!r}); supported: {sorted(SUPPORTED_EXTENSIONS)}"
        )
      if str(path) in seen:  # Overlapping patterns: no duplicate documents.
        continue
      seen.add(str(path))
      key = path.relative_to(root).as_posix()
      _check_unique_key(owners, key, path, text)
      found.append((path, key, ext))
  sizes = _stat_sizes([path for path, _, _ in found])
  return [_File(path, key, SUPPORTED_EXTENSIONS[ext], size) for (path, key, ext), size in zip(found, sizes)]


def _corpus(
    files: Sequence[_File],
    text_field: str,
    name: str,
    shard: tuple[int, int],
    skip_bad: bool = False,
) -> DocumentSource:
  """The documents of `files` that start in the byte share of `shard`."""
  lo, hi = shard_bounds(sum(f.size for f in files), shard)
  parts: list[_Part] = []
  whole: list[_File] = []

  def flush_whole():
    if whole:
      parts.append(_WholeFiles(list(whole)))
      whole.clear()

  offset = 0
  for file in files:
    start, stop = lo - offset, hi - offset  # The share in this file's bytes.
    offset += file.size
    if file.kind == "text":
      if start <= 0 < stop:  # A whole file goes where its first byte is.
        whole.append(file)
      continue
    # A file of 0 bytes still goes to one process, which reports it.
    if stop <= 0 or start >= max(file.size, 1):
      continue
    flush_whole()
    start = max(start, 0)
    if file.kind == "jsonl":
      parts.append(_JsonlLines(file, text_field, start, stop, skip_bad))
    else:
      parts.append(_ArrowColumn(file, text_field, start, stop, skip_bad))
  flush_whole()
  parts = [p for p in parts if len(p) or p.bad.count]
  if shard[1] > 1:
    name = f"{name}[share {shard[0]} of {shard[1]}]"
  return DocumentSource(parts, name=name)


def file_corpus(
    patterns: str | Sequence[str],
    text_field: str = "text",
    name: str = "files",
    shard: tuple[int, int] = (0, 1),
    on_bad_record: str = "error",
) -> DocumentSource:
  """Documents from txt/jsonl/parquet/arrow files given as paths or globs.

  Args:
    patterns: paths and/or glob patterns (`**` recurses), possibly mixed;
      local or URLs (`gs://bucket/data/*.jsonl`, any epath backend).
    text_field: the jsonl field / parquet or arrow column holding the text.
    name: a label for error messages and reprs.
    shard: (i, n): only process i's share of the documents (see the module
      docstring); (0, 1), the default, is the whole corpus.
    on_bad_record: "error" stops at the first record without document text
      (invalid JSON, a missing or non-string field, a null row) naming its
      file and line; "skip" leaves such records out and counts them
      (`DocumentSource.bad_records`).

  Returns:
    A DocumentSource; `.txt` files are one document each, jsonl files one per
    non-blank line, parquet/arrow files one per row.
  """
  skip_bad = _check_on_bad_record(on_bad_record)
  files = list_files(patterns)
  if not files:
    raise ValueError(f"no data sources given for {name!r}")
  return _corpus(files, text_field, name, shard, skip_bad)
