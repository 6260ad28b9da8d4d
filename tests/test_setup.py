"""The README's set-up is the whole set-up: .ci/run runs exactly its two lines."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_setup_lines():
  readme = (ROOT / "README.md").read_text()
  block = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
  setup = [line for line in block.splitlines() if line.strip()]
  assert len(setup) == 2 and setup[1].endswith("python -m pytest -q -n 2 tests")
  # `-n 2` needs pytest-xdist, which the same line installs.
  assert setup[1].startswith("pip install -r requirements-test.txt")
  assert any(line.startswith("pytest-xdist") for line in (ROOT / "requirements-test.txt").read_text().splitlines())
  ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))]
  assert ci == setup
