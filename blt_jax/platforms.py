"""Which accelerator platforms jax should probe, decided before jax starts its backends.

libtpu is installed beside jax on CPU machines too (the test extras use it to compile for TPU slices ahead of
time). Left alone, jax then loads it on every start and it prints half a dozen lines of warnings (`could not
determine TPU worker hostnames`, `INVALID_ARGUMENT: unexpected worker hostname`) and spends seconds probing for
chips that are not there. On a machine without TPU chips (the rule jax itself uses: a Google TPU device on the PCI
bus) and without a GPU plugin, `JAX_PLATFORMS=cpu` is set, unless the user set JAX_PLATFORMS or asked for a TPU
(TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, JAX_FORCE_TPU_INIT). A TPU VM, a GPU machine and every explicit
choice are left as they are.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x and an unnamed one), as jax's hardware_utils lists them.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_TPU_REQUEST_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins")


def tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> int:
  """TPU chips on this machine's PCI bus."""
  count = 0
  for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
    try:
      if pathlib.Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
        continue
      device = (pathlib.Path(vendor).parent / "device").read_text().strip()
    except OSError:
      continue
    count += device in _TPU_PCI_DEVICES
  return count


def _gpu_plugin_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS)


def cpu_only_platforms(environ=os.environ, pci_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether jax should be told to use the CPU alone (see the module docstring for the rule)."""
  if environ.get("JAX_PLATFORMS") or any(environ.get(name) for name in _TPU_REQUEST_ENV):
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False  # nothing would print; leave jax's own choice
  return tpu_chips(pci_root) == 0 and not _gpu_plugin_installed()


def quiet_start() -> None:
  """Sets JAX_PLATFORMS=cpu where `cpu_only_platforms` says so; call before jax initialises its backends."""
  if cpu_only_platforms():
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported first (a script's `import jax`): its config read the environment already
      sys.modules["jax"].config.update("jax_platforms", "cpu")
