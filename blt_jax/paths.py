"""One rule for every path the package takes: local paths (relative or absolute) and URLs (`gs://`, ...).

Orbax and tensorstore refuse relative paths, and `os.path` cannot reach object stores; every CLI and library entry
point turns what the user typed into an absolute `etils.epath.Path` here, once, and works with that.
"""
from __future__ import annotations

import os
from typing import Union

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
