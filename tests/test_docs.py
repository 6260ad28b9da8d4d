"""Every command the README and docs/ show still exists and takes the flags they give it (so none goes stale).

Commands are read from the pages' code blocks and table cells: `python -m blt_jax.X ...`, `python scripts/X.py ...`.
A module's argparse command line parses the shown arguments (stopped right after parsing, nothing runs); a training
command's config file exists and its `--config.a.b=` keys are fields of it; a script exists, as does every
`configs/*.py` a command names.
"""

import argparse
import importlib
import pathlib
import re
import shlex

import pytest

from blt_jax import train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ARGPARSE_COMMANDS = ("blt_jax.score", "blt_jax.generate", "blt_jax.convert", "blt_jax.export", "blt_jax.calibrate")


def _commands(text: str) -> list:
  """Each `python -m blt_jax.X` / `python scripts/X.py` command of a page, continuation lines joined."""
  text = text.replace("\\\n", " ")
  found = []
  for match in re.finditer(r"python (?:-m blt_jax\.[\w.]+|scripts/\w+\.py)[^`\n|)]*", text):
    command = match.group(0).split("  #")[0].split(" # ")[0].strip()
    if "..." in command or "<" in command:  # a placeholder, not a command
      continue
    if " -" not in command.split(" ", 2)[-1]:  # a module named in prose, not a command line
      continue
    found.append(command)
  return found


def _split(command: str) -> list:
  try:
    return shlex.split(command)
  except ValueError:  # quotes nested in an ssh --command="..." string: the flags are still whole words
    return command.split()


ALL = sorted({(page.name, c) for page in PAGES for c in _commands(page.read_text())})


def test_the_pages_show_commands():
  names = {c.split()[2] if c.split()[1] == "-m" else c.split()[1] for _, c in ALL}
  assert {
      "blt_jax.train",
      "blt_jax.score",
      "blt_jax.generate",
      "blt_jax.convert",
      "blt_jax.harness",
      "blt_jax.calibrate",
      "scripts/aot_compile.py",
      "scripts/flop_matched_study.py",
  } <= names


class _Parsed(Exception):
  pass


@pytest.mark.parametrize("page, command", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_command_is_current(page, command, monkeypatch):
  argv = _split(command)[1:]
  for path in re.findall(r"configs/\w+\.py", command):
    assert (ROOT / path).is_file(), f"{page}: {command}: no {path}"
  if argv[0] != "-m":
    assert (ROOT / argv[0]).is_file(), f"{page}: {command}: no {argv[0]}"
    return
  module, args = argv[1], argv[2:]
  importlib.import_module(module if module != "blt_jax.convert" else "blt_jax.convert.__main__")
  if module == "blt_jax.train":
    config = args[args.index("--config") + 1]
    cfg = train_config.load_config_file(str(ROOT / config))
    for arg in args:
      if arg.startswith("--config."):
        key = arg[len("--config.") :].split("=")[0]
        assert train_config.unknown_key_error(cfg, key) is None, f"{page}: {command}: {key}"
    return
  if module not in ARGPARSE_COMMANDS:
    return  # lm-eval's own command line (blt_jax.harness): its flags are lm-eval's

  original = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, args=None, namespace=None):
    original(self, args, namespace)
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
  main = importlib.import_module(module if module != "blt_jax.convert" else "blt_jax.convert.__main__").main
  if module == "blt_jax.score":
    main = importlib.import_module("blt_jax.score_cli").main
  with pytest.raises(_Parsed):
    main(args)
