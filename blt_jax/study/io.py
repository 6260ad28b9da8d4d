"""Atomic json/text writes (tmp + rename): an interrupted study never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str) -> Optional[Any]:
  """The json at `path`, or None when the file does not exist (a stage not yet done)."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
