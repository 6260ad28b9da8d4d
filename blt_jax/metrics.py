"""Scalar metrics: TensorBoard event files in the workdir plus one concise console line per write."""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np


def format_value(value: Any) -> str:
  """Compact number: ints as is, floats with 4 decimals, tiny/huge ones (learning rates) in e-notation."""
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  v = float(value)
  if math.isnan(v) or math.isinf(v):
    return str(v)
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{v:.3e}"
  return f"{v:.4f}"


def format_console_line(step: int, scalars: Mapping[str, Any], total_steps: Optional[int] = None) -> str:
  """'step 120/1000 (12.0%) | loss 2.3456 | lr 4.000e-04' (keys in the given order)."""
  if total_steps:
    head = f"step {step}/{total_steps} ({100.0 * step / total_steps:.1f}%)"
  else:
    head = f"step {step}"
  return " | ".join([head] + [f"{k} {format_value(v)}" for k, v in scalars.items()])


class MetricsWriter:
  """Writes scalars to `workdir` (tensorboardX) and prints a progress line; a no-op where not `enabled`.

  `enabled` defaults to "this is process 0", so every process may call it unconditionally.
  """

  def __init__(self, workdir: Union[str, os.PathLike], enabled: Optional[bool] = None,
               total_steps: Optional[int] = None, print_fn: Callable[[str], Any] = print):
    self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
    self.total_steps = total_steps
    self._print = print_fn
    self._writer = None
    self._last = None  # (step, time) of the previous write, for steps/s
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(os.fspath(workdir), exist_ok=True)
      self._writer = SummaryWriter(logdir=os.fspath(workdir), flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any], console: bool = True) -> Optional[str]:
    """Logs `scalars` (host numbers or jax scalars) at `step`; returns the console line (None if disabled)."""
    if not self.enabled:
      return None
    values = {k: np.asarray(jax.device_get(v)).item() for k, v in scalars.items()}
    now = time.perf_counter()
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      values.setdefault("steps_per_s", (step - self._last[0]) / (now - self._last[1]))
    self._last = (step, now)
    for key, value in values.items():
      self._writer.add_scalar(key, value, global_step=int(step))
    line = format_console_line(int(step), values, self.total_steps)
    if console:
      self._print(line)
    return line

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text blob (e.g. the run config) shown in TensorBoard's text tab."""
    if self.enabled:
      self._writer.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    self.enabled = False

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
