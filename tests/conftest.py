"""Test setup: eight emulated CPU devices, set before jax is imported anywhere."""

import os

# Low backend optimisation: tests are dominated by XLA compile time, not by run time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
GOLDEN_DIR = DATA_DIR / "golden"
FIXTURES_DIR = DATA_DIR / "fixtures"


@pytest.fixture(scope="session")
def golden():
  """(arrays, meta) of the reference's tiny fp32 run (see tests/data/README.md)."""
  arrays = dict(np.load(GOLDEN_DIR / "tiny_reference_fp32.npz"))
  meta = json.loads((GOLDEN_DIR / "tiny_reference_fp32.json").read_text())
  return arrays, meta


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES_DIR
