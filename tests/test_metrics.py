"""TensorBoard scalars and console progress lines."""

import re
import struct

import jax.numpy as jnp
import numpy as np
from etils import epath
from tensorboardX.proto import event_pb2
from test_paths import fake_gcs  # noqa: F401 (a fixture)

from blt_jax import metrics


def _read_scalars(logdir):
  """{tag: [(step, value)]} from every event file: TFRecord framing (len, crc, data, crc) around Event protos.

  `logdir` is a pathlib or epath path (local or URL).
  """
  out = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      record = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_format_console_line():
  line = metrics.format_console_line(120, {"loss": 2.345678, "lr": 4e-4, "tokens": 1024, "bpb": 0.0}, total_steps=1000)
  assert line == "step 120/1000 (12.0%) | loss 2.3457 | lr 4.000e-04 | tokens 1024 | bpb 0.0000"
  assert metrics.format_console_line(5, {"grad_norm": 123456.0}) == "step 5 | grad_norm 1.235e+05"
  assert metrics.format_value(float("nan")) == "nan"
  line = metrics.format_console_line(3, {"loss": 1.0}, total_steps=10, elapsed_s=125.4, eta_s=7 * 3600 + 61)
  assert line == "step 3/10 (30.0%) | elapsed 2m05s | eta 7h01m | loss 1.0000"
  assert [metrics.format_duration(s) for s in (0.4, 59.6, 3599, 86400 * 2 + 3600 * 5)] == [
      "0s",
      "1m00s",
      "59m59s",
      "2d05h",
  ]


class _Clock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_console_lines_carry_elapsed_and_eta(tmp_path):
  # Step 0 (eval before training), step 10 after a 60 s compile, then 2 s per step: the ETA uses the 2 s pace.
  clock, lines = _Clock(), []
  writer = metrics.MetricsWriter(tmp_path, enabled=True, total_steps=100, print_fn=lines.append, clock=clock)
  for step, now in [(0, 1005.0), (10, 1085.0), (20, 1105.0), (30, 1125.0), (30, 1127.0)]:
    clock.now = now
    writer.write_scalars(step, {"loss": 1.0})
  writer.close()
  assert lines[0] == "step 0/100 (0.0%) | elapsed 5s | loss 1.0000"
  assert lines[1].startswith("step 10/100 (10.0%) | elapsed 1m25s | loss 1.0000")  # no pace known yet
  assert lines[2].startswith("step 20/100 (20.0%) | elapsed 1m45s | eta 2m40s | loss 1.0000")  # 80 steps x 2 s
  assert lines[3].startswith("step 30/100 (30.0%) | elapsed 2m05s | eta 2m20s | loss")
  assert lines[4].startswith("step 30/100 (30.0%) | elapsed 2m07s | eta 2m27s | loss")  # an eval line at step 30


def test_writer_events_and_console(tmp_path):
  lines = []
  writer = metrics.MetricsWriter(tmp_path, enabled=True, total_steps=100, print_fn=lines.append)
  writer.write_scalars(10, {"loss": 3.5, "lr": jnp.float32(1e-4)})
  writer.write_scalars(20, {"loss": np.float32(2.25), "lr": 2e-4})
  writer.write_text(0, "config", "lr: 4e-4")
  writer.close()
  assert re.fullmatch(r"step 10/100 \(10.0%\) \| elapsed \d+s \| loss 3.5000 \| lr 1.000e-04", lines[0]), lines[0]
  assert re.match(r"step 20/100 \(20.0%\) \| elapsed \d+s \| loss 2.2500 \| lr 2.000e-04 \| steps_per_s ", lines[1])
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert files and files[0].stat().st_size > 0
  scalars = _read_scalars(tmp_path)
  assert scalars["loss"] == [(10, 3.5), (20, 2.25)]
  np.testing.assert_allclose([v for _, v in scalars["lr"]], [1e-4, 2e-4], rtol=1e-6)


def test_disabled_writer_is_a_noop(tmp_path):
  lines = []
  writer = metrics.MetricsWriter(tmp_path / "off", enabled=False, print_fn=lines.append)
  assert writer.write_scalars(1, {"loss": 1.0}) is None
  writer.flush()
  writer.close()
  assert not lines and not (tmp_path / "off").exists()


def test_default_enabled_on_process_zero(tmp_path):
  with metrics.MetricsWriter(tmp_path, print_fn=lambda _: None) as writer:
    assert writer.enabled


def test_events_arrive_at_a_url(fake_gcs):
  """A gs:// workdir: events are written locally and copied whole to the URL at flush, on close and every
  `upload_secs`; TensorBoard reading the URL sees the same scalars as a local run's."""
  writer = metrics.MetricsWriter(
      "gs://bucket/runs/x", enabled=True, total_steps=10, print_fn=lambda _: None, upload_secs=3600
  )
  local_dir = writer._local  # pylint: disable=protected-access
  writer.write_scalars(1, {"loss": 3.5})
  assert not epath.Path("gs://bucket/runs/x").exists() or not list(epath.Path("gs://bucket/runs/x").iterdir())
  writer.flush()
  assert _read_scalars(epath.Path("gs://bucket/runs/x")) == {"loss": [(1, 3.5)]}
  writer._upload_secs = 0.0  # pylint: disable=protected-access
  writer.write_scalars(2, {"loss": 2.5})  # copied on the write: the interval has passed
  assert _read_scalars(epath.Path("gs://bucket/runs/x"))["loss"] == [(1, 3.5), (2, 2.5)]
  writer.write_text(0, "config", "lr: 1e-3")
  writer.close()
  remote = list(epath.Path("gs://bucket/runs/x").iterdir())
  assert len(remote) == 1 and remote[0].name.startswith("events.out.tfevents.")
  assert _read_scalars(epath.Path("gs://bucket/runs/x"))["loss"] == [(1, 3.5), (2, 2.5)]
  assert not local_dir.exists()  # the local copy is gone
