"""scripts/flop_matched_study.py --smoke end to end: every variant trains a few steps, the outputs are real.

The module's smoke study runs twice against one OUT, as round two is meant to be run on round one's OUT: every
variant at seed 0 without noise; then two variants (a filter: the BPE model and an entropy-patched BLT, the two
scoring paths that differ most) at seeds 0 and 1 under every noise type, the seed-0 runs scored from the exports the
first invocation left. The second must reuse what the first finished. `--budget-scale` is checked without training
(its steps, its flags, and its rows and points in the report), which keeps the file under 3 minutes on 2 cores."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from blt_jax import train_config
from blt_jax.study import bpe, corpus, heldout, noise, report, runner, variants

ROOT = pathlib.Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("flop_matched_study", ROOT / "scripts" / "flop_matched_study.py")
flop_matched_study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flop_matched_study)


FIRST = ("--noise", "none")
NOISED = ("bpe", "blt_entropy_long")
SECOND = ("--seeds", "0,1", "--variants", ",".join(NOISED), "--noise", "all")


def _run_smoke(out, *flags: str) -> None:
  """The CLI in a process of its own on one CPU device (the suite's eight emulated devices would make every
  program an eight-way SPMD one: slower to compile, and nothing here is about sharding). A persistent compilation
  cache next to OUT: the BLT variants share one model config, so their init, evaluation and scoring programs are
  the same programs, compiled once."""
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_backend_optimization_level=0",
      JAX_COMPILATION_CACHE_DIR=f"{out}-jax-cache",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  done = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "flop_matched_study.py"), "--smoke", "--out", str(out), *flags],
      env=env,
      capture_output=True,
      text=True,
      timeout=1800,
      check=False,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _mtimes(out) -> dict:
  return {p.parent.name: os.stat(p).st_mtime_ns for p in (out / "runs").glob("*/result.json")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("study")
  _run_smoke(out, *FIRST)
  first = json.loads((out / "study.json").read_text())
  mtimes = [_mtimes(out)]
  _run_smoke(out, *SECOND)
  mtimes.append(_mtimes(out))
  return out, json.loads((out / "study.json").read_text()), dict(first=first, mtimes=mtimes)


def _runs(study, seed=0, scale=1.0):
  return [r for r in study["runs"] if r["seed"] == seed and r["budget_scale"] == scale]


def test_every_variant_ran_and_scored(smoke):
  _, study, _ = smoke
  names = [r["name"] for r in _runs(study)]
  assert names == [v.name for v in variants.VARIANTS]
  for r in _runs(study):
    bpb = r["heldout"]["bpb"]
    assert math.isfinite(bpb) and bpb > 0, r["name"]
    assert r["steps"] >= 2 and r["inference_flops_per_byte"] > 0
    assert r["curve"] and r["curve"][-1]["step"] == r["steps"]


def test_training_flops_are_matched(smoke):
  _, study, _ = smoke
  budget = study["plan"]["flops_per_run"]
  for r in _runs(study) + _runs(study, seed=1):
    per_step = study["plan"]["runs"][r["name"]]["flops_per_step"]
    # Whole steps: a run is within half a step of the budget.
    assert abs(r["planned_flops"] - budget) <= 0.5 * per_step + 1e-6 * budget, r["name"]
    # Measured patch lengths move a BLT's FLOPs a little off the plan.
    assert abs(r["train_flops"] - budget) / budget < 0.35, r["name"]


def test_entropy_thresholds_give_two_patch_lengths(smoke):
  _, study, _ = smoke
  short, long = study["patching"]["blt_entropy_short"], study["patching"]["blt_entropy_long"]
  assert short["threshold"] < long["threshold"]
  assert short["train_mean_patch_length"] < long["train_mean_patch_length"]
  assert study["entropy_model"]["train_flops"] > 0


def test_outputs_and_provenance(smoke):
  out, study, _ = smoke
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


def test_later_runs_reuse_finished_runs(smoke):
  _, _, extra = smoke
  first, second = extra["mtimes"]
  assert set(first) == {v.name for v in variants.VARIANTS} | {"entropy_model"}
  assert set(second) - set(first) == {f"{name}_seed1" for name in NOISED}
  assert all(second[k] == t for k, t in first.items())  # finished runs (and their results) were left alone


def test_selected_runs_are_scored_under_every_noise(smoke):
  out, study, extra = smoke
  assert not any(r["noise"] for r in extra["first"]["runs"]) and not extra["first"]["noise"]  # --noise none
  scored = [r for r in study["runs"] if r["noise"]]
  assert sorted((r["name"], r["seed"]) for r in scored) == sorted((n, s) for n in NOISED for s in (0, 1))
  for r in scored:
    assert set(r["noise"]) == {"clean"} | {n.name for n in noise.NOISES}, r["run_id"]
    # The export, read back and scored on the clean text, gives the score taken during training.
    assert r["noise"]["clean"]["bpb"] == pytest.approx(r["heldout"]["bpb"], rel=1e-4), r["name"]
    for name, scores in r["noise"].items():
      if name != "clean":
        assert math.isfinite(scores["bpb"]) and scores["bpb"] > 0
        assert scores["n_bytes"] == study["noise"][name]["bytes"], (r["run_id"], name)  # noised bytes: denominator
        assert scores["rate"] == noise.noise(name).rate
  bpe_run = _runs(study)[0]
  assert bpe_run["kind"] == "bpe" and bpe_run["noise"]["spell"]["bytes_per_token"] > 0
  assert study["noise"]["spell"]["bytes"] > study["data"]["heldout"]["bytes"]  # spaces were added
  md = (out / "study.md").read_text()
  assert "## Noised held-out text" in md and "degradation" in md
  for name in NOISED:
    row = next(line for line in md.splitlines() if line.startswith(f"| `{name}` | 1x | `caps` |"))
    assert "s0 " in row and " / s1 " in row  # the degradation of each seed


def test_second_seed_is_its_own_run(smoke):
  out, study, _ = smoke
  seed1 = _runs(study, seed=1)
  assert [r["name"] for r in seed1] == list(NOISED)  # the filter: only those two
  for r in seed1:
    zero = next(x for x in _runs(study) if x["name"] == r["name"])
    assert r["run_id"] == f"{r['name']}_seed1" and (out / "runs" / r["run_id"] / "export").is_dir()
    data_seed = r["config"]["data_seed"] if r["kind"] == "bpe" else r["config"]["data"]["shuffle_seed"]
    assert r["config"]["seed"] == 1 and data_seed == 1
    assert r["steps"] == zero["steps"] and r["heldout"]["bpb"] != zero["heldout"]["bpb"]
  md = (out / "study.md").read_text()
  row = next(line for line in md.splitlines() if line.startswith("| BPE-token transformer (`bpe`) | 1x |"))
  assert "s0 " in row and " / s1 " in row
  a, b = [x["heldout"]["bpb"] for x in study["runs"] if x["name"] == "bpe" and x["budget_scale"] == 1]
  assert f"**{(a + b) / 2:.4f}** | {abs(a - b):.4f} |" in row  # mean and spread


def test_budget_scale_runs_land_beside_round_one(smoke, tmp_path):
  out, study, _ = smoke
  byte = next(r for r in _runs(study) if r["name"] == "byte")
  key = runner.RunKey(variants.variant("byte"), 0, 2.0)
  steps = runner.Study(runner.Settings(out=str(tmp_path), budget_minutes=1)).steps_for(key, study["plan"])
  per_step = study["plan"]["runs"]["byte"]["flops_per_step"]
  assert abs(steps - 2 * study["plan"]["flops_per_run"] / per_step) <= 0.5
  # A finished 2x run, as run_variant would record it, beside round one's runs in the same report.
  scaled = dict(
      byte,
      run_id=key.id,
      budget_scale=2.0,
      steps=steps,
      train_flops=2 * byte["train_flops"],
      noise={},
      curve=[dict(p, flops=2 * p["flops"], bpb=p["bpb"] - 1) for p in byte["curve"]],
  )
  both = dict(study, runs=study["runs"] + [scaled])
  report.write(str(tmp_path), both)
  md = (tmp_path / "study.md").read_text()
  assert "| byte-level transformer (`byte`) | 2x |" in md and "| byte-level transformer (`byte`) | 1x |" in md
  assert (tmp_path / "study.png").stat().st_size > 10_000
  args = flop_matched_study.parse_args(
      [
          "--out",
          str(out),
          "--budget-scale",
          "3",
          "--variants",
          "bpe,blt_space",
          "--seeds",
          "0,1",
          "--noise",
          "caps,spell",
      ]
  )
  s = flop_matched_study.settings(args)
  assert (s.budget_scale, s.variants, s.seeds, s.noise) == (3.0, ("bpe", "blt_space"), (0, 1), ("caps", "spell"))
  assert flop_matched_study.main(["--out", str(tmp_path / "x"), "--variants", "bpe,nope"]) == 1


def test_old_layout_is_read_as_seed0_at_the_plan_budget(tmp_path):
  """Round one's result.json names neither seed nor budget."""
  run = tmp_path / "runs" / "blt_space"
  run.mkdir(parents=True)
  (run / "result.json").write_text(json.dumps(dict(name="blt_space", label="x", kind="blt", heldout=dict(bpb=4.0))))
  (tmp_path / "runs" / "entropy_model").mkdir()
  (tmp_path / "runs" / "entropy_model" / "result.json").write_text("{}")
  (r,) = runner.Study(runner.Settings(out=str(tmp_path), budget_minutes=1)).collect_runs()
  assert (r["seed"], r["budget_scale"], r["run_id"], r["noise"]) == (0, 1.0, "blt_space", {})
  assert runner.RunKey(variants.variant("bpe"), 1, 3.0).id == "bpe_seed1_x3"
  assert runner.RunKey(variants.variant("bpe")).id == "bpe"


def _zero_params(config):
  """A model that predicts every id uniformly: its NLL is ln(V) per scored id, whatever it reads."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from blt_jax.entropy_model import init_entropy_model  # pylint: disable=g-import-not-at-top

  shapes = nn.meta.unbox(jax.eval_shape(lambda: init_entropy_model(jax.random.PRNGKey(0), config)))
  return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def test_noised_scores_divide_by_the_noised_bytes(tmp_path):
  texts = ["def f(x):\n    return x + 1\n", "caf\u00e9 na\u00efve " * 30]
  spelled = noise.apply(noise.noise("spell"), texts, seed=0)
  byte_cfg = train_config.model_config(
      variants.byte_lm_config(variants.SMOKE, dict(train="", heldout=""), num_steps=1, seed=0, data_seed=0, evals=1)
  )
  params = _zero_params(byte_cfg)
  for t in (texts, spelled):
    got = heldout.lm_scores(params, byte_cfg, heldout.byte_docs(t), heldout.utf8_bytes(t), 64, 4)
    assert got["n_bytes"] == got["n_scored"] == heldout.utf8_bytes(t)
    assert got["bpb"] == pytest.approx(math.log2(byte_cfg.vocab_size), rel=1e-5)
  tok = bpe.train_tokenizer(texts * 10, 30, str(tmp_path / "tok.json"))
  bpe_cfg = variants.bpe_model_config(variants.SMOKE, tok.get_vocab_size())
  params = _zero_params(bpe_cfg)
  got = bpe.heldout_scores(tok, bpe_cfg, params, spelled, 32, 4)
  n_tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in spelled)  # the noised text's own tokens
  assert got["n_scored"] == n_tokens and got["n_bytes"] == heldout.utf8_bytes(spelled)
  assert got["bpb"] == pytest.approx(n_tokens * math.log2(bpe_cfg.vocab_size) / heldout.utf8_bytes(spelled), rel=1e-5)


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
  page = (
      b"<html><head><title>t</title><style>x{}</style></head><body><h2>Title</h2><div class='para'>One  two\n"
      b"\t three &amp; four</div><p>Five</p></body></html>"
  )
  paragraphs = corpus.html_paragraphs(page)
  assert paragraphs == ["Title", "One two\nthree & four", "Five"]
  assert corpus.group_paragraphs(paragraphs, 20) == ["Title", "One two\nthree & four", "Five"]
  assert corpus.group_paragraphs(paragraphs, 100) == ["Title\n\nOne two\nthree & four\n\nFive"]
