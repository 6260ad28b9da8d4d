"""One rule for every path the package takes: local paths (relative or absolute) and URLs (`gs://`, ...).

Orbax and tensorstore refuse relative paths, and `os.path` cannot reach object stores; every CLI and library entry
point turns what the user typed into an absolute `etils.epath.Path` here, once, and works with that.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_url(path: PathLike) -> bool:
  """`gs://bucket/x`, `s3://...`, `memory://...`: anything with a scheme (handled by epath's backends)."""
  return "://" in os.fspath(path) if not isinstance(path, epath.Path) else "://" in str(path)


def resolve(path: PathLike) -> epath.Path:
  """An absolute epath.Path: URLs unchanged, local paths expanded (`~`) and made absolute against the cwd."""
  if isinstance(path, epath.Path) and is_url(path):
    return path
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def has_magic(text: str) -> bool:
  """Whether `text` holds glob wildcards (`*`, `?`, `[`)."""
  return any(c in text for c in "*?[")


def _split(path: epath.Path) -> tuple[str, list[str]]:
  """('gs://', ['bucket', 'a', 'b']) or ('/', ['a', 'b']): the anchor and the components after it."""
  text = str(path)
  if is_url(text):
    scheme, rest = text.split("://", 1)
    return scheme + "://", [p for p in rest.split("/") if p]
  return "/", [p for p in text.split("/") if p]


def _match(pattern: list[str], names: list[str]) -> bool:
  """Component-wise glob match; `**` is any number of directories. Hidden names need a pattern starting with '.'."""
  if not pattern:
    return not names
  head = pattern[0]
  if head == "**":
    if _match(pattern[1:], names):
      return True
    return bool(names) and not names[0].startswith(".") and _match(pattern, names[1:])
  if not names or (names[0].startswith(".") and not head.startswith(".")):
    return False
  return fnmatch.fnmatchcase(names[0], head) and _match(pattern[1:], names[1:])


def _walk_files(top: epath.Path):
  """Every file under `top` (any backend), as (path, components relative to top)."""
  top_text = str(top).rstrip("/")
  # fsspec backends yield walk roots without their scheme (`bucket/dir`), the local one as given.
  bare = top_text.split("://", 1)[1] if is_url(top_text) else top_text
  for root, _, files in top.walk():
    root_text = str(root).rstrip("/")
    rel = root_text[len(top_text) :] if root_text.startswith(top_text) else root_text[len(bare) :]
    rel_parts = [p for p in rel.split("/") if p]
    for name in files:
      yield top.joinpath(*rel_parts, name), rel_parts + [name]


def glob(pattern: PathLike) -> tuple[epath.Path, list[epath.Path]]:
  """(root, sorted matches) of a glob on any epath backend, local or URL.

  `*`, `?` and `[...]` match within one path component and `**` any number of directories (as `glob.glob` with
  `recursive=True`, hidden names excluded); `root` is the pattern's leading directories without wildcards. Matches
  may include directories unless the pattern uses `**`, which lists files only.
  """
  path = resolve(pattern)
  anchor, parts = _split(path)
  fixed = 0
  while fixed < len(parts) - 1 and not has_magic(parts[fixed]):
    fixed += 1
  root = epath.Path(anchor + "/".join(parts[:fixed]))
  rest = parts[fixed:]
  if "**" in rest:  # epath's glob refuses `**` (one listing per directory on object stores): walk once instead
    if not root.is_dir():
      return root, []
    matches = [p for p, names in _walk_files(root) if _match(rest, names)]
  else:
    matches = list(root.glob("/".join(rest))) if root.is_dir() else []
  return root, sorted(matches, key=str)


def kvstore_spec(path: PathLike) -> dict:
  """The tensorstore kvstore spec of a directory: `file` for local paths, tensorstore's own URL parser otherwise.

  tensorstore reads `gs://` (its `gcs` driver), `s3://`, `memory://` and `file://` URLs; any other scheme is an error
  naming the path, since tensorstore cannot reach epath's fsspec backends.
  """
  if not is_url(path):
    return {"driver": "file", "path": str(resolve(path)).rstrip("/") + "/"}
  text = str(path).rstrip("/") + "/"  # not through epath: tensorstore knows schemes (memory://) that epath may not
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  try:
    return ts.KvStore.Spec(text).to_json()
  except ValueError as e:
    raise ValueError(
        f"{path}: tensorstore cannot store arrays at this URL ({e}); use a local path, gs://, s3:// " "or memory://"
    ) from None


@contextlib.contextmanager
def staged_dir(out: epath.Path, suffix: str) -> Iterator[epath.Path]:
  """Yields an empty staging directory `.{out.name}.{suffix}` beside `out`; `out` appears only once it is written.

  When the block ends without an error the staging directory replaces `out` (a directory or file there is removed
  first); in any case no staging directory is left behind. A leftover of an interrupted run is removed first.
  """
  staging = out.parent / f".{out.name}.{suffix}"
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  try:
    yield staging
    _remove(out)
    staging.rename(out)
  finally:
    if staging.exists():
      staging.rmtree()


def _remove(path: epath.Path) -> None:
  """Removes `path`, a directory tree or a file, if it exists."""
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()
