"""The tree is formatted by pyink with the project's settings (pyproject.toml: 2-space indent, 120 columns)."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("pyink", reason="the formatter is a test extra (requirements-test.txt)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tree_is_formatted():
  run = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--diff", "blt_jax", "tests", "scripts", "configs"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 0, f"run `pyink blt_jax tests scripts configs`:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
