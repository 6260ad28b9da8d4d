"""TensorBoard scalars and console progress lines."""
import struct

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from blt_jax import metrics


def _read_scalars(logdir):
  """{tag: [(step, value)]} from every event file: TFRecord framing (len, crc, data, crc) around Event protos."""
  out = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_format_console_line():
  line = metrics.format_console_line(120, {"loss": 2.345678, "lr": 4e-4, "tokens": 1024, "bpb": 0.0},
                                     total_steps=1000)
  assert line == "step 120/1000 (12.0%) | loss 2.3457 | lr 4.000e-04 | tokens 1024 | bpb 0.0000"
  assert metrics.format_console_line(5, {"grad_norm": 123456.0}) == "step 5 | grad_norm 1.235e+05"
  assert metrics.format_value(float("nan")) == "nan"


def test_writer_events_and_console(tmp_path):
  lines = []
  writer = metrics.MetricsWriter(tmp_path, enabled=True, total_steps=100, print_fn=lines.append)
  writer.write_scalars(10, {"loss": 3.5, "lr": jnp.float32(1e-4)})
  writer.write_scalars(20, {"loss": np.float32(2.25), "lr": 2e-4})
  writer.write_text(0, "config", "lr: 4e-4")
  writer.close()
  assert lines[0] == "step 10/100 (10.0%) | loss 3.5000 | lr 1.000e-04"
  assert lines[1].startswith("step 20/100 (20.0%) | loss 2.2500 | lr 2.000e-04 | steps_per_s ")
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
