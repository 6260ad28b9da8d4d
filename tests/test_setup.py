"""The README's set-up is the whole set-up (.ci/run runs exactly its two lines), and the package installs on its own."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import numpy as np
from packaging.requirements import Requirement

import helpers
from blt_jax import score

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_setup_lines():
  readme = (ROOT / "README.md").read_text()
  block = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
  setup = [line for line in block.splitlines() if line.strip()]
  assert len(setup) == 2 and setup[1].endswith("python -m pytest -q -n 2 tests")
  # `-n 2` needs pytest-xdist, which the same line installs.
  assert setup[1].startswith("pip install -r requirements-test.txt")
  assert any(line.startswith("pytest-xdist") for line in (ROOT / "requirements-test.txt").read_text().splitlines())
  ci = [
      line
      for line in (ROOT / ".ci" / "run").read_text().splitlines()
      if line.strip() and not line.startswith(("#", "set ", "cd "))
  ]
  assert ci == setup


def _requirements(text: str) -> set:
  """The requirement lines of a requirements file (no comments, no `-r` includes), spaces removed."""
  lines = (line.split(" #")[0].strip() for line in text.splitlines())
  return {line.replace(" ", "") for line in lines if line and not line.startswith(("#", "-"))}


def test_one_list_of_dependencies_and_extras_that_match_the_test_requirements():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  # The runtime list is requirements.txt itself: pyproject reads it, so there is nothing to keep in step.
  assert project["project"]["dynamic"] == ["dependencies"]
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
  extras = project["project"]["optional-dependencies"]
  assert set(extras) >= {"test", "hf", "eval", "tpu-aot", "study"}
  # `pip install .[test]` gets what `pip install -r requirements-test.txt` gets, with the same pins.
  in_extras = {r.replace(" ", "") for deps in extras.values() for r in deps if not r.startswith("blt_jax[")}
  assert in_extras == _requirements((ROOT / "requirements-test.txt").read_text())
  assert extras["test"][-1] == "blt_jax[" + ",".join(name for name in extras if name != "test") + "]"
  assert "torch==2.13.0" in extras["hf"]  # a bare `torch` would pull a CUDA build
  assert set(project["project"]["scripts"]) == {f"blt-{name}" for name in COMMANDS}
  for name, target in project["project"]["scripts"].items():
    module, function = target.split(":")
    assert module.split(".")[1] == COMMANDS[name[4:]] and function == "main"


COMMANDS = {
    "train": "train",
    "score": "score",
    "generate": "generate",
    "convert": "convert",
    "export": "export",
    "harness": "harness",
    "calibrate": "calibrate",
}


def _venv_with_the_package(tmp_path) -> pathlib.Path:
  """A fresh venv that sees the installed jax etc. (system site-packages, so nothing is downloaded) and holds
  blt_jax installed from a copy of the project's files (the build writes build/ and *.egg-info beside them)."""
  src = tmp_path / "src"
  shutil.copytree(ROOT / "blt_jax", src / "blt_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "requirements.txt"):
    shutil.copy(ROOT / name, src / name)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
  # pip itself comes from the system site-packages; --no-index: no network.
  subprocess.run(
      [
          str(venv / "bin" / "python"),
          "-m",
          "pip",
          "install",
          "-q",
          "--no-deps",
          "--no-build-isolation",
          "--no-index",
          str(src),
      ],
      check=True,
      cwd=tmp_path,
      env=_env_without_the_repository(),
  )
  return venv


def _env_without_the_repository() -> dict:
  return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_installed_package_runs_a_console_command_without_the_repository(tmp_path):
  venv = _venv_with_the_package(tmp_path)
  python, env = str(venv / "bin" / "python"), _env_without_the_repository()
  where = subprocess.run(
      [
          python,
          "-c",
          "import blt_jax, importlib.metadata as m; print(blt_jax.__file__); "
          "print('\\n'.join(m.requires('blt_jax')))",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout.splitlines()
  assert where[0].startswith(str(venv)), where[0]  # the installed copy, not the repository
  # `pip install .` pulls the runtime dependencies: they are the wheel's Requires-Dist.
  required = {str(Requirement(r)) for r in where[1:] if "extra ==" not in r}
  assert required == {str(Requirement(r)) for r in _requirements((ROOT / "requirements.txt").read_text())}

  model = helpers.tiny_entropy_blt(max_seqlen=64)
  ckpt = helpers.save_checkpoint(tmp_path / "ckpt", **model)
  texts = ["the cat sat on the mat", "naïve über 42\nand a second line"]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  run = subprocess.run(
      [str(venv / "bin" / "blt-score"), "--checkpoint", ckpt, "--input", "in.jsonl", "--output", "out.jsonl"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  expected = score.Scorer(ckpt).score_texts(texts)
  assert len(out) == len(texts)
  for line, s in zip(out, expected):
    np.testing.assert_allclose(line["nll_nats"], s.nll_nats, rtol=1e-6)
