"""No libtpu start-up noise on machines without TPUs; a TPU VM (by jax's own PCI rule) is left alone."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from blt_jax import platforms

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("libtpu", "TPU worker", "INVALID_ARGUMENT", "TPU accelerator type")


def _start_jax(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}  # as a user's shell
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="the noise comes from libtpu")
def test_package_commands_start_jax_without_libtpu_noise():
  if platforms.tpu_chips():
    pytest.skip("this machine has TPU chips")
  # Without the package's rule libtpu prints its lines (unless another process holds libtpu's lock at that moment,
  # which quiets it too: so the rule itself is checked, jax told to use the CPU alone, not only the quiet stderr).
  # The package first (python -m blt_jax.X), or jax first and then the package (the scripts).
  for code in (
      "import blt_jax.score, jax; print(jax.config.jax_platforms, jax.devices()[0].platform)",
      "import jax, blt_jax.score; print(jax.config.jax_platforms, jax.devices()[0].platform)",
  ):
    run = _start_jax(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["cpu", "cpu"], (code, run.stdout)
    assert not any(n in run.stderr for n in NOISE), run.stderr


def _pci(tmp_path, *devices):
  tmp_path.mkdir()
  for i, (vendor, device) in enumerate(devices):
    d = tmp_path / f"0000:00:0{i}.0"
    d.mkdir()
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(tmp_path)


def test_the_rule_leaves_tpu_vms_and_explicit_choices_alone(tmp_path, monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name != "libtpu" else object())
  tpu_vm = _pci(tmp_path / "tpu", ("0x1ae0", "0x0042"), ("0x1ae0", "0x0063"), ("0x1ae0", "0x0063"))
  gce_vm = _pci(tmp_path / "gce", ("0x1ae0", "0x0042"), ("0x8086", "0x1237"))  # gVNIC: Google, not a TPU
  assert platforms.tpu_chips(tpu_vm) == 2 and platforms.tpu_chips(gce_vm) == 0
  assert not platforms.cpu_only_platforms({}, tpu_vm)
  assert platforms.cpu_only_platforms({}, gce_vm)
  assert not platforms.cpu_only_platforms({"JAX_PLATFORMS": "cuda"}, gce_vm)
  assert not platforms.cpu_only_platforms({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, gce_vm)
  # A GPU plugin installed: jax's own choice stands.
  monkeypatch.setattr(
      importlib.util, "find_spec", lambda name: object() if name in ("libtpu", "jax_cuda12_plugin") else None
  )
  assert not platforms.cpu_only_platforms({}, gce_vm)
