"""Scalar metrics: TensorBoard event files in the workdir plus one concise console line per write.

Events are written synchronously (tensorboardX's `EventsWriter`, flushed after every write; its `SummaryWriter` queues
them to a thread, so that its `flush()` does not promise they are on disk). The workdir may be a URL
(`gs://bucket/runs/x`, any epath backend): the event file is then written to a local temporary directory and copied
whole to the URL at every `flush()`, at `close()` and at the first write `upload_secs` after the last copy (event files
are small, and an object store cannot append; TensorBoard reads the URL as the run goes).

A console line reads `step 120/1000 (12.0%) | elapsed 2m03s | eta 16m50s | loss 2.3456 | ...`: the time since the
writer was made (the run's start) and the time the remaining steps will take at the pace measured since the first
written step after the run's first one (so the first step's compilation does not inflate it).
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import numpy as np
from etils import epath

from blt_jax import paths


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


def format_duration(seconds: float) -> str:
  """'42s', '7m05s', '3h02m', '2d04h': two units at most, enough for a progress line."""
  s = max(int(round(seconds)), 0)
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_console_line(
    step: int,
    scalars: Mapping[str, Any],
    total_steps: Optional[int] = None,
    elapsed_s: Optional[float] = None,
    eta_s: Optional[float] = None,
) -> str:
  """'step 120/1000 (12.0%) | elapsed 1m02s | eta 8m40s | loss 2.3456 | lr 4.000e-04' (keys in the given order)."""
  if total_steps:
    head = [f"step {step}/{total_steps} ({100.0 * step / total_steps:.1f}%)"]
  else:
    head = [f"step {step}"]
  if elapsed_s is not None:
    head.append(f"elapsed {format_duration(elapsed_s)}")
  if eta_s is not None:
    head.append(f"eta {format_duration(eta_s)}")
  return " | ".join(head + [f"{k} {format_value(v)}" for k, v in scalars.items()])


def _print_flushed(line: str) -> None:
  print(line, flush=True)  # progress must reach log files (Slurm, nohup) as it happens, not in 4 KiB blocks


class MetricsWriter:
  """Writes scalars to `workdir` (tensorboardX) and prints a progress line; a no-op where not `enabled`.

  `enabled` defaults to "this is process 0", so every process may call it unconditionally. `workdir` may be local or
  a URL (see the module docstring; `upload_secs` bounds how stale the URL's copy gets between flushes).
  """

  def __init__(
      self,
      workdir: paths.PathLike,
      enabled: Optional[bool] = None,
      total_steps: Optional[int] = None,
      print_fn: Callable[[str], Any] = _print_flushed,
      clock: Callable[[], float] = time.perf_counter,
      upload_secs: float = 60.0,
  ):
    self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
    self.total_steps = total_steps
    self._print = print_fn
    self._clock = clock
    self._start = clock()
    self._events = None  # tensorboardX EventsWriter
    self._last = None  # (step, time) of the previous write, for steps/s
    self._first_step = None  # the run's first written step (its time includes compiling the step)
    self._pace_from = None  # (step, time) of the first write after it: the ETA's reference point
    self._remote: Optional[epath.Path] = None  # the URL the local event files are copied to
    self._local: Optional[epath.Path] = None
    self._uploaded: Dict[str, int] = {}  # event file name -> size at its last copy
    self._upload_secs = upload_secs
    self._last_upload = time.monotonic()
    if self.enabled:
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top

      logdir = paths.resolve(workdir)
      logdir.mkdir(parents=True, exist_ok=True)
      if paths.is_url(logdir):
        self._remote = logdir
        self._local = logdir = epath.Path(tempfile.mkdtemp(prefix="blt_jax_events_"))
      self._events = EventsWriter(str(logdir / "events"))  # events.out.tfevents.<time>.<host>

  def write_scalars(self, step: int, scalars: Mapping[str, Any], console: bool = True) -> Optional[str]:
    """Logs `scalars` (host numbers or jax scalars) at `step`; returns the console line (None if disabled)."""
    if not self.enabled:
      return None
    values = {k: np.asarray(jax.device_get(v)).item() for k, v in scalars.items()}
    now = self._clock()
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      values.setdefault("steps_per_s", (step - self._last[0]) / (now - self._last[1]))
    self._last = (step, now)
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top

    for key, value in values.items():
      self._write_event(int(step), summary.scalar(key, value))
    self._events.flush()
    line = format_console_line(
        int(step), values, self.total_steps, elapsed_s=now - self._start, eta_s=self._eta(int(step), now)
    )
    if console:
      self._print(line)
    if self._remote is not None and time.monotonic() - self._last_upload >= self._upload_secs:
      self.flush()
    return line

  def _eta(self, step: int, now: float) -> Optional[float]:
    """Seconds left at the pace since `_pace_from`; None until two steps after the first are known."""
    if self._first_step is None:
      self._first_step = step
    elif self._pace_from is None and step > self._first_step:
      self._pace_from = (step, now)
    if not self.total_steps or self._pace_from is None or step <= self._pace_from[0]:
      return None
    seconds_per_step = (now - self._pace_from[1]) / (step - self._pace_from[0])
    return max(self.total_steps - step, 0) * seconds_per_step

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text blob (e.g. the run config) shown in TensorBoard's text tab."""
    if self.enabled:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top

      self._write_event(int(step), summary.text(tag, text))
      self._events.flush()

  def write_tensorboard(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars for TensorBoard only: no console line, and the ETA's pace is left alone (facts of the start-up)."""
    if self.enabled:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top

      for key, value in scalars.items():
        self._write_event(int(step), summary.scalar(key, float(value)))
      self._events.flush()

  def _write_event(self, step: int, summary_proto) -> None:
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_proto))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()
      self._upload()

  def _upload(self) -> None:
    """Copies every local event file that grew since its last copy to the URL workdir."""
    if self._remote is None:
      return
    for local in sorted(self._local.iterdir(), key=str):
      size = local.stat().length
      if self._uploaded.get(local.name) != size:
        (self._remote / local.name).write_bytes(local.read_bytes())
        self._uploaded[local.name] = size
    self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._upload()
      self._events = None
      if self._local is not None:
        self._local.rmtree()
    self.enabled = False

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
