"""scripts/flop_matched_study.py --smoke end to end: every variant trains a few steps, the outputs are real."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from blt_jax.study import bpe, corpus, report, variants

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_smoke(out) -> None:
  """The CLI in a process of its own on one CPU device (the suite's eight emulated devices would make every
  program an eight-way SPMD one: slower to compile, and nothing here is about sharding). A persistent compilation
  cache next to OUT: the BLT variants share one model config, so their init, evaluation and scoring programs are
  the same programs, compiled once."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=f"{out}-jax-cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  done = subprocess.run([sys.executable, str(ROOT / "scripts" / "flop_matched_study.py"), "--smoke", "--out", str(out)],
                        env=env, capture_output=True, text=True, timeout=1800, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("study")
  _run_smoke(out)
  return out, json.loads((out / "study.json").read_text())


def test_every_variant_ran_and_scored(smoke):
  _, study = smoke
  names = [r["name"] for r in study["runs"]]
  assert names == [v.name for v in variants.VARIANTS]
  for r in study["runs"]:
    bpb = r["heldout"]["bpb"]
    assert math.isfinite(bpb) and bpb > 0, r["name"]
    assert r["steps"] >= 2 and r["inference_flops_per_byte"] > 0
    assert r["curve"] and r["curve"][-1]["step"] == r["steps"]


def test_training_flops_are_matched(smoke):
  _, study = smoke
  budget = study["plan"]["flops_per_run"]
  for r in study["runs"]:
    per_step = study["plan"]["runs"][r["name"]]["flops_per_step"]
    # Whole steps: a run is within half a step of the budget.
    assert abs(r["planned_flops"] - budget) <= 0.5 * per_step + 1e-6 * budget, r["name"]
    # Measured patch lengths move a BLT's FLOPs a little off the plan.
    assert abs(r["train_flops"] - budget) / budget < 0.35, r["name"]


def test_entropy_thresholds_give_two_patch_lengths(smoke):
  _, study = smoke
  short, long = study["patching"]["blt_entropy_short"], study["patching"]["blt_entropy_long"]
  assert short["threshold"] < long["threshold"]
  assert short["train_mean_patch_length"] < long["train_mean_patch_length"]
  assert study["entropy_model"]["train_flops"] > 0


def test_outputs_and_provenance(smoke):
  out, study = smoke
  assert all(0 < bpb < 8 for bpb in study["compressors"].values())
  png = (out / "study.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  table = (out / "study.md").read_text()
  assert all(f"`{v.name}`" in table for v in variants.VARIANTS)
  files = study["data"]["files"]
  train = {f["path"] for f in files if f["split"] == "train"}
  held = {f["path"] for f in files if f["split"] == "heldout"}
  assert train and held and not train & held
  assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files)
  assert sum(f["bytes_used"] for f in files if f["split"] == "heldout") == study["data"]["heldout"]["bytes"]


def test_rerun_reuses_finished_runs(smoke):
  out, _ = smoke
  result = out / "runs" / "byte" / "result.json"
  before = os.stat(result).st_mtime_ns
  _run_smoke(out)
  assert os.stat(result).st_mtime_ns == before


def test_compressors_rank_random_bytes_as_incompressible():
  rates = report.compressors(os.urandom(20_000))
  assert all(rate > 7.9 for rate in rates.values())
  text = report.compressors(b"the quick brown fox jumps over the lazy dog. " * 500)
  assert all(rate < 1.0 for rate in text.values())


def test_bpe_round_trips_and_keeps_the_special_ids(tmp_path):
  texts = ["def f(x):\n    return x + 1\n", "caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9", "x" * 50] * 20
  tok = bpe.train_tokenizer(texts, 40, str(tmp_path / "tok.json"))
  docs = bpe.encode_documents(tok, texts, add_eos=True)
  assert all(d[0] == 1 and d[-1] == 2 and (d[1:-1] >= 4).all() for d in docs)
  assert bpe.bytes_per_token(texts, docs) > 1.0


def test_html_text_and_paragraph_groups():
  page = b"<html><head><title>t</title><style>x{}</style></head><body><h2>Title</h2><div class='para'>One  two\n" \
         b"\t three &amp; four</div><p>Five</p></body></html>"
  paragraphs = corpus.html_paragraphs(page)
  assert paragraphs == ["Title", "One two\nthree & four", "Five"]
  assert corpus.group_paragraphs(paragraphs, 20) == ["Title", "One two\nthree & four", "Five"]
  assert corpus.group_paragraphs(paragraphs, 100) == ["Title\n\nOne two\nthree & four\n\nFive"]
