"""Batch scoring: equal to a direct forward, invariant to packing/batching/buckets, long documents, the CLI."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from blt_jax import loading, patching, score, tokenizer
from blt_jax.config import PatchingConfig, blt_config_from_reference, entropy_config_from_reference
from blt_jax.convert.mapping import params_from_state_dict
from blt_jax.entropy_model import compute_entropies, compute_entropies_jit
from blt_jax.model import BLT

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny BLT with entropy patching (threshold at the median entropy, so patches vary)."""
  model = helpers.tiny_entropy_blt(max_seqlen=64)
  return dict(
      model,
      path=helpers.save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", **model),
      direct=_direct_forward(model),
  )


def _direct_forward(t):
  """The slow obvious path, jitted once per module (one compile per distinct length): one document per row,
  N + 1 patch slots, BLT.apply; returns (logits `[B, N, V]`, per-target NLL `[B, N - 1]`)."""

  @jax.jit
  def fn(tokens_BN):
    ent = compute_entropies(t["ent_params"], tokens_BN, t["ent_cfg"])
    lengths = patching.patch(
        tokens_BN, ent, max_patches=tokens_BN.shape[1] + 1, **t["patch_cfg"].patch_kwargs()
    ).patch_lengths_BP
    logits = BLT(t["blt_cfg"]).apply({"params": t["blt_params"]}, tokens_BN, lengths)
    logp = jax.nn.log_softmax(logits, -1)
    return logits, -jnp.take_along_axis(logp[:, :-1], tokens_BN[:, 1:, None], -1)[..., 0]

  return fn


def _direct_nll(t, tokens):
  """Per-target NLL of one document alone."""
  return np.asarray(t["direct"](jnp.asarray([tokens], jnp.int32))[1][0], np.float64)


def _direct_logits(t, tokens_BN):
  """The direct forward's logits `[B, N, V]` (one document per row, N + 1 patch slots)."""
  return t["direct"](tokens_BN)[0]


def _direct_entropies_and_patch_counts(t, docs):
  """Per document alone: the entropy of the prediction of each byte (the entropy model's forward; position j
  predicts byte j + 1 of `[BOS] bytes`) and the number of patches starting inside it, [BOS] patch included (the
  patcher on `[BOS] bytes`, next-token position excluded). One compile: rows right-padded (causal rules)."""
  rows = [tokenizer.encode(d, add_eos=False) for d in docs]
  tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r

  @jax.jit
  def fn(tokens_BN):
    ent_BN = compute_entropies(t["ent_params"], tokens_BN, t["ent_cfg"])
    patches = patching.patch(tokens_BN, ent_BN, max_patches=tokens_BN.shape[1] + 1, **t["patch_cfg"].patch_kwargs())
    return ent_BN, patches.patch_ids_BT

  ent, ids = map(np.asarray, fn(jnp.asarray(tokens)))
  return [ent[b, : len(r) - 1] for b, r in enumerate(rows)], [int(ids[b, len(r) - 1]) + 1 for b, r in enumerate(rows)]


# Byte lengths of the short test documents: few distinct lengths (each is one compile of the direct forward); 32
# and 48 are also the last windows' lengths of the long documents below (as tokens: 33 and 49, with BOS).
LENGTHS = (6, 20, 32, 48)


def _docs_of_lengths(lengths, seed=0):
  """Documents of exactly these byte lengths (UTF-8 may be cut mid-character: they are bytes)."""
  rng = np.random.default_rng(seed)
  words = ["the", "cat", "sat", "on", "a", "mat", "und", "über", "naïve", "x", "42", "\n"]
  out = []
  for n in lengths:
    text = b""
    while len(text) < n:
      text += (" ".join(rng.choice(words, size=rng.integers(1, 6))) + " ").encode()
    out.append(text[:n])
  return out


def _docs(n, seed=0, max_len=60):
  rng = np.random.default_rng(seed)
  words = ["the", "cat", "sat", "on", "a", "mat", "und", "über", "naïve", "x", "42", "\n"]
  return [" ".join(rng.choice(words, size=rng.integers(1, max_len // 4 + 1))).encode()[:max_len] for _ in range(n)]


def test_scores_equal_direct_forward_whatever_the_packing(tiny):
  # 14 documents of 6 to 48 bytes: rows of 63 tokens hold up to three of them.
  docs = _docs_of_lengths([LENGTHS[i] for i in (3, 1, 0, 2, 1, 3, 0, 0, 2, 1, 3, 2, 0, 1)])
  direct = [_direct_nll(tiny, tokenizer.encode(d, add_eos=False)).sum() for d in docs]
  one_device = jax.local_devices()[:1]  # on the suite's 8 host devices a batch rounds up to 8 rows
  runs = [
      score.Scorer(tiny["path"], batch_bytes=128, devices=one_device).score_texts(docs),  # 2 rows per batch
      score.Scorer(tiny["path"], batch_bytes=4096).score_texts(docs),  # everything in one batch
      score.Scorer(tiny["path"], batch_bytes=128, row_bytes=62, devices=one_device).score_texts(docs[::-1])[::-1],
  ]
  for scores in runs:
    for d, s, ref in zip(docs, scores, direct):
      assert s.n_bytes == len(d)
      np.testing.assert_allclose(s.nll_nats, ref, rtol=RTOL)
      assert s.bpb == pytest.approx(s.nll_nats / math.log(2) / len(d))
  # Every document alone in its row (pack=False) against inside packed rows.
  alone = score.Scorer(tiny["path"], batch_bytes=256, pack=False, per_byte=True).score_texts(docs)
  for a, b, c in zip(alone, runs[0], runs[2]):
    np.testing.assert_allclose(a.nll_nats, b.nll_nats, rtol=RTOL)
    assert a.n_patches == b.n_patches == c.n_patches
  # Per-byte entropies and patch counts against the entropy model's forward and the patcher on each document.
  entropies, n_patches = _direct_entropies_and_patch_counts(tiny, docs)
  assert [s.n_patches for s in runs[0]] == n_patches
  for s, e in zip(alone, entropies):
    np.testing.assert_allclose(s.entropies, e, rtol=1e-5, atol=1e-6)


def test_score_arrays_and_eos_convention(tiny):
  scorer = score.Scorer(tiny["path"], with_eos=True)
  text = "über naïve café!".encode()  # with BOS and EOS as long as a 20-byte document: no new direct compile
  by_text = scorer.score_texts([text])[0]
  by_ids = scorer.score_arrays([tokenizer.encode(text, add_eos=True)])[0]
  assert by_text.n_bytes == by_ids.n_bytes == len(text) + 1  # the EOS is a scored target
  assert by_text.nll_nats == by_ids.nll_nats
  np.testing.assert_allclose(by_text.nll_nats, _direct_nll(tiny, tokenizer.encode(text)).sum(), rtol=RTOL)
  with pytest.raises(ValueError, match="BOS"):
    scorer.score_arrays([np.asarray([70, 71, 72])])


def test_long_document_is_scored_completely_in_windows(tiny):
  doc = b" ".join(_docs(40, seed=3))[:300]
  tokens = tokenizer.encode(doc, add_eos=False)
  scorer = score.Scorer(tiny["path"], per_byte=True, min_context=20)  # rows of 63 tokens
  s = scorer.score_texts([doc])[0]
  assert s.n_bytes == len(doc) and s.nll_per_byte.shape == (len(doc),) and s.entropies.shape == (len(doc),)
  windows = score.split_document(tokens, scorer.row_len, 20)
  assert len(windows) > 4
  expected = np.concatenate([_direct_nll(tiny, w)[start - 1 :] for w, start, _ in windows])
  np.testing.assert_allclose(s.nll_per_byte, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.nll_nats, expected.sum(), rtol=RTOL)
  # Each window's per-byte entropies: the entropy model's forward on the window (its scored bytes only).
  padded = np.zeros((len(windows), scorer.row_len), np.int32)  # one jitted forward (causal: padding is ignored)
  for i, (w, _, _) in enumerate(windows):
    padded[i, : len(w)] = w
  ent = np.asarray(compute_entropies_jit(tiny["ent_params"], jnp.asarray(padded), tiny["ent_cfg"]))
  np.testing.assert_allclose(
      s.entropies,
      np.concatenate([e[start - 1 : len(w) - 1] for e, (w, start, _) in zip(ent, windows)]),
      rtol=1e-5,
      atol=1e-6,
  )
  # Bytes of the first window have their whole context: equal to the full forward of the document prefix.
  prefix = _direct_nll(tiny, tokens[: scorer.row_len])
  np.testing.assert_allclose(s.nll_per_byte[: scorer.row_len - 1], prefix, rtol=1e-5, atol=1e-6)
  # Every later window had at least min_context bytes of left context.
  for w, start, first in windows[1:]:
    assert start - 1 >= 20 and len(w) <= scorer.row_len


def test_per_byte_argmax_is_the_greedy_byte_of_the_direct_forward(tiny):
  """`per_byte_argmax=True`: each scored byte's greedy id (ids 0/1/3 never), as the direct forward's argmax; a
  default scorer stores none and gives the same NLL."""
  docs = _docs_of_lengths(LENGTHS + (20,), seed=4) + [b" ".join(_docs(30, seed=6))[:200]]  # the last in windows
  scorer = score.Scorer(tiny["path"], per_byte=True, per_byte_argmax=True, min_context=20)
  scores = scorer.score_texts(docs)
  for d, s in zip(docs, scores):
    tokens = tokenizer.encode(d, add_eos=False)
    expected = []
    for w, start, _ in score.split_document(tokens, scorer.row_len, 20):
      lw = np.array(_direct_logits(tiny, jnp.asarray([w], jnp.int32))[0])
      lw[:, [tokenizer.BOE_ID, tokenizer.BOS_ID, tokenizer.BPE_ID]] = -np.inf
      expected.append(np.argmax(lw, -1)[start - 1 : len(w) - 1])
    assert s.greedy_per_byte.shape == (len(d),) and s.greedy_per_byte.dtype == np.int32
    np.testing.assert_array_equal(s.greedy_per_byte, np.concatenate(expected))
    assert not np.isin(s.greedy_per_byte, [tokenizer.BOE_ID, tokenizer.BOS_ID, tokenizer.BPE_ID]).any()
  plain = score.Scorer(tiny["path"], min_context=20).score_texts(docs)
  for a, b in zip(plain, scores):
    assert a.greedy_per_byte is None and a.nll_nats == pytest.approx(b.nll_nats, rel=RTOL)


def test_set_params_scores_like_a_fresh_scorer_and_compiles_nothing_new(tiny):
  texts = ["Scoring a later checkpoint of the same run.", "Second document."]
  scorer = score.Scorer(tiny["path"], batch_bytes=4096)
  before = scorer.score_texts(texts)
  other = jax.tree.map(lambda x: x * 1.5 if x.ndim == 2 else x, scorer.model.params)
  compiles = len(scorer.compiles)
  scorer.set_params(other)
  after = scorer.score_texts(texts)
  assert len(scorer.compiles) == compiles
  fresh = score.Scorer(dataclasses.replace(scorer.model, params=other), batch_bytes=4096).score_texts(texts)
  for a, b, c in zip(after, fresh, before):
    assert a.nll_nats == pytest.approx(b.nll_nats, rel=1e-6) and a.nll_nats != pytest.approx(c.nll_nats, rel=1e-3)
  with pytest.raises(ValueError, match="structure"):
    scorer.set_params({"not": jnp.zeros(3)})


def test_patch_slots_never_exceed_max_seqlen(tiny):
  """Rows longer than the global model's context (`row_bytes` above `max_seqlen`): the slot bucket is capped at
  max_seqlen (59 patches of a 57-byte document, byte patching, max_seqlen 60: 60 slots, not the bucket's 64)."""
  m = loading.load(tiny["path"])
  m = dataclasses.replace(m, config=dataclasses.replace(m.config, max_seqlen=60), patching=PatchingConfig(mode="byte"))
  scorer = score.Scorer(m, row_bytes=100, batch_bytes=64, devices=jax.local_devices()[:1])
  s = scorer.score_texts([b"x" * 57])[0]
  assert s.n_bytes == 57 and s.n_patches == 58 and np.isfinite(s.nll_nats)
  assert [shape for program, shape in scorer.compiles if program == "blt"] == [(1, 64, 60)]


def test_ten_thousand_documents_compile_a_bounded_number_of_programs(tiny):
  rng = np.random.default_rng(5)
  docs = [bytes(rng.integers(32, 127, size=rng.integers(1, 40)).astype(np.uint8)) for _ in range(10_000)]
  docs[123] = b"y" * 200  # one longer than a row
  scorer = score.Scorer(tiny["path"], batch_bytes=8192)
  scores = scorer.score_texts(docs)
  assert [s.n_bytes for s in scores] == [len(d) for d in docs]
  row_buckets = len(scorer.buckets)
  slot_buckets = len({score._slot_bucket(n, b + 1) for b in scorer.buckets for n in range(1, b + 2)})
  bound = row_buckets + row_buckets * slot_buckets
  print(f"compiled {len(scorer.compiles)} programs (bound {bound}): {scorer.compiles}")
  assert len(scorer.compiles) <= bound <= 10  # 2 row buckets x 4 slot buckets (quarter octaves) + 2 patchers
  assert all(np.isfinite(s.nll_nats) for s in scores)


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _cli_env(cwd, compile_cache=True):
  """The CLI's environment; the processes of one test share a persistent compilation cache in `cwd` (the same
  programs, compiled once: the same executables, only not compiled again)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  if compile_cache:
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(cwd) / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def _cli(args, cwd, timeout=300, **kwargs):
  return subprocess.run(
      [sys.executable, "-m", "blt_jax.score", *args],
      cwd=cwd,
      env=_cli_env(cwd),
      capture_output=True,
      text=True,
      timeout=timeout,
      **kwargs,
  )


def _lines(path):
  return {r["index"]: r for r in map(json.loads, pathlib.Path(path).read_text().splitlines())}


def test_golden_checkpoint_through_the_cli_reproduces_the_golden_nll(golden, tmp_path):
  arrays, meta = golden
  blt_cfg = blt_config_from_reference(meta["blt_args"])
  ent_cfg = entropy_config_from_reference(meta["entropy_model_args"])
  strip = lambda prefix: {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
  helpers.save_checkpoint(
      tmp_path / "golden",
      blt_cfg,
      params_from_state_dict(strip("blt/"), blt_cfg),
      PatchingConfig(mode="entropy", threshold=meta["threshold"]),
      ent_cfg,
      params_from_state_dict(strip("entropy_model/"), ent_cfg),
  )
  tokens, logits = arrays["tokens"], arrays["blt_logits"]
  expected = []
  for row in range(2):
    ids = tokens[row].tolist()
    body = ids[1:-1] if ids[-1] == tokenizer.EOS_ID else ids[1:]
    (tmp_path / f"row{row}.txt").write_bytes(tokenizer.decode_bytes(np.asarray(body)))
    # --with-eos: row 0 ends with EOS already; row 1's EOS target is predicted by its last golden logits.
    targets = ids[1:] + ([] if ids[-1] == tokenizer.EOS_ID else [tokenizer.EOS_ID])
    logp = jax.nn.log_softmax(jnp.asarray(logits[row][: len(targets)]), -1)
    expected.append(-float(np.sum(np.take_along_axis(np.asarray(logp), np.asarray(targets)[:, None], 1))))
  run = _cli(
      ["--checkpoint", "golden", "--input", "row*.txt", "--whole-file", "--with-eos", "--output", "out.jsonl"], tmp_path
  )
  assert run.returncode == 0, run.stderr
  out = _lines(tmp_path / "out.jsonl")
  for row in range(2):
    np.testing.assert_allclose(out[row]["nll_nats"], expected[row], rtol=1e-5)
  summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert summary["documents"] == 2 and summary["errors"] == 0
  assert summary["bpb"] == pytest.approx(sum(expected) / math.log(2) / summary["bytes"])


def test_cli_reports_bad_records_and_keeps_the_rest(tiny, tmp_path):
  docs = _docs(6, seed=9)
  with open(tmp_path / "a.jsonl", "w") as f:
    for i, d in enumerate(docs[:3]):
      f.write(json.dumps({"text": d.decode(), "id": f"doc{i}"}) + "\n")
    f.write("{not json\n")
    f.write(json.dumps({"content": "x"}) + "\n")
    f.write(json.dumps({"text": ""}) + "\n")
    f.write(json.dumps({"text": docs[3].decode()}) + "\n")
  docs[4] = docs[4].replace(b"\n", b" ")  # one line of b.txt
  (tmp_path / "b.txt").write_bytes(docs[4] + b"\n\xff\xferaw bytes\n")
  run = _cli(
      ["--checkpoint", tiny["path"], "--input", "a.jsonl", "--input", "b.txt", "--output", "o/out.jsonl"], tmp_path
  )
  assert run.returncode == 0, run.stderr
  for where in ("a.jsonl:4: malformed json", "a.jsonl:5: missing field 'text'", "a.jsonl:6: empty text"):
    assert where in run.stderr
  out = _lines(tmp_path / "o" / "out.jsonl")
  assert sorted(out) == [0, 1, 2, 6, 7, 8]
  assert [out[i]["id"] for i in (0, 1, 2, 6, 7, 8)] == ["doc0", "doc1", "doc2", "a.jsonl:7", "b.txt:1", "b.txt:2"]
  api = score.Scorer(tiny["path"]).score_texts(docs[:5] + [b"\xff\xferaw bytes"])
  for i, s in zip((0, 1, 2, 6, 7, 8), api):
    np.testing.assert_allclose(out[i]["nll_nats"], s.nll_nats, rtol=RTOL)
    assert out[i]["n_bytes"] == s.n_bytes and out[i]["n_patches"] == s.n_patches
  assert json.loads((tmp_path / "o" / "out.jsonl.summary.json").read_text())["errors"] == 3

  # One clear message, no traceback, nothing written.
  for args, message in (
      (["--checkpoint", tiny["path"], "--input", "nope.jsonl"], "nope.jsonl: no such file"),
      (["--checkpoint", "missing_ckpt", "--input", "a.jsonl"], "missing_ckpt does not exist"),
      (["--checkpoint", str(tmp_path), "--input", "a.jsonl"], "no config.json"),
  ):
    bad = _cli(args + ["--output", "bad.jsonl"], tmp_path)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad.jsonl").exists()
  exists = _cli(["--checkpoint", tiny["path"], "--input", "a.jsonl", "--output", "o/out.jsonl"], tmp_path)
  assert exists.returncode == 2 and "--resume" in exists.stderr


def test_bad_arguments_fail_before_the_first_document(tiny, tmp_path, capsys):
  """Row and window arguments are checked when the scorer is built, not when the first long document arrives: one
  line, nothing written."""
  for kwargs, message in (
      (dict(row_bytes=2), "row_bytes=2 must be"),  # no min_context could pass
      (dict(row_bytes=40, min_context=100), "min_context=100 must be .* = 38"),
      (dict(min_context=0), "min_context=0"),
      (dict(batch_bytes=0), "batch_bytes=0"),
  ):
    with pytest.raises(ValueError, match=message):
      score.Scorer(tiny["path"], **kwargs)
  (tmp_path / "in.txt").write_bytes(b"short\n" + b"long " * 20 + b"\n")  # the second longer than a row of 40
  args = ["--checkpoint", tiny["path"], "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.jsonl")]
  assert score.main(args + ["--row-bytes", "40", "--min-context", "100"]) == 2
  err = capsys.readouterr().err
  assert "min_context=100" in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "o.jsonl").exists()


def test_cli_killed_and_resumed_equals_an_uninterrupted_run(tiny, tmp_path):
  docs = _docs(400, seed=11)
  with open(tmp_path / "in.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d.decode()}) + "\n")
  args = ["--checkpoint", tiny["path"], "--input", "in.jsonl", "--batch-bytes", "64"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "blt_jax.score", *args, "--output", "killed.jsonl"],
      cwd=tmp_path,
      env=_cli_env(tmp_path, compile_cache=False),  # killed: none of its cache writes torn
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  out = tmp_path / "killed.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = out.read_text().count("\n")
  assert 20 <= done_before < len(docs)
  with open(out, "a") as f:
    f.write('{"index": 99999, "id": "torn')  # a line cut off mid-write
  resumed = _cli(args + ["--output", "killed.jsonl", "--resume"], tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  straight = _cli(args + ["--output", "straight.jsonl"], tmp_path)
  assert straight.returncode == 0, straight.stderr
  a, b = _lines(tmp_path / "killed.jsonl"), _lines(tmp_path / "straight.jsonl")
  assert sorted(a) == sorted(b) == list(range(len(docs)))
  assert len(out.read_text().splitlines()) == len(docs)  # nothing scored twice, the torn line gone
  for i in a:
    np.testing.assert_allclose(a[i]["nll_nats"], b[i]["nll_nats"], rtol=RTOL)
  summary = json.loads((tmp_path / "killed.jsonl.summary.json").read_text())
  assert summary["documents"] == len(docs)

  # Two processes' shares (index mod 2), merged by concatenation, are the whole run.
  merged = {}
  for i in range(2):
    part = _cli(args + ["--output", "multi.jsonl", "--process-index", str(i), "--process-count", "2"], tmp_path)
    assert part.returncode == 0, part.stderr
    lines = _lines(tmp_path / f"multi.jsonl.part-{i}-of-2")
    assert all(index % 2 == i for index in lines)
    merged.update(lines)
  assert sorted(merged) == list(range(len(docs)))
  for i in merged:
    np.testing.assert_allclose(merged[i]["nll_nats"], b[i]["nll_nats"], rtol=RTOL)


def _two_processes(args, cwd, port, slurm=False):
  """Runs the scoring CLI as two processes of one jax.distributed job (2 CPU devices each); returns both results.
  `slurm`: started as the two tasks of a Slurm step on one node (jax finds the coordinator itself)."""
  procs = []
  for i in range(2):
    env = dict(_cli_env(cwd), XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    if slurm:
      env.update(
          SLURM_JOB_ID=str(port),
          SLURM_PROCID=str(i),
          SLURM_LOCALID=str(i),
          SLURM_NTASKS="2",
          SLURM_STEP_NUM_TASKS="2",
          SLURM_STEP_NODELIST="localhost",
          SLURM_NODELIST="localhost",
          SLURM_NODEID="0",
      )
    else:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "blt_jax.score", *args],
            cwd=cwd,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
  return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_cli_one_job_over_two_processes_equals_one_process(tiny, tmp_path):
  """--mesh over two processes: params sharded across both, global batches; the merged parts equal one process's
  output, every document once; a resumed part gets back what it lost while the other process keeps in step."""
  docs = _docs(30, seed=5) + _docs_of_lengths([150], seed=6)  # the last is longer than a row: windows
  with open(tmp_path / "in.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d.decode("utf-8", "replace")}) + "\n")
  args = ["--checkpoint", tiny["path"], "--input", "in.jsonl", "--batch-bytes", "256", "--row-bytes", "63"]
  one = _cli(args + ["--output", "one.jsonl"], tmp_path)
  assert one.returncode == 0, one.stderr
  expected = _lines(tmp_path / "one.jsonl")
  runs = _two_processes(args + ["--output", "two.jsonl", "--mesh", "fsdp=4"], tmp_path, _free_port())
  assert all(rc == 0 for rc, _ in runs), runs
  assert "sharded over mesh data=1,fsdp=4,tensor=1" in runs[0][1]
  parts = [tmp_path / f"two.jsonl.part-{i}-of-2" for i in range(2)]
  merged = {}
  for i, part in enumerate(parts):
    lines = _lines(part)
    assert lines and all(index % 2 == i for index in lines)
    merged.update(lines)
  assert sorted(merged) == sorted(expected) == list(range(len(docs)))
  for i in expected:
    assert merged[i]["n_patches"] == expected[i]["n_patches"]
    np.testing.assert_allclose(merged[i]["nll_nats"], expected[i]["nll_nats"], rtol=RTOL)
  # Part 1 loses its last line; the resumed job scores it again and nothing else.
  kept = parts[1].read_text().splitlines()
  parts[1].write_text("\n".join(kept[:-1]) + "\n")
  before = parts[0].read_text()
  runs = _two_processes(args + ["--output", "two.jsonl", "--mesh", "fsdp=4", "--resume"], tmp_path, _free_port())
  assert all(rc == 0 for rc, _ in runs), runs
  assert parts[0].read_text() == before
  assert sorted(_lines(parts[1])) == sorted(json.loads(line)["index"] for line in kept)


def test_cli_under_srun_scores_each_document_once(tiny, tmp_path):
  """Two tasks of a (simulated) Slurm step: each starts jax.distributed and scores its share into its own part;
  before, every task scored every document into the same OUT."""
  docs = _docs(6, seed=8)
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d.decode("utf-8", "replace")}) + "\n" for d in docs))
  runs = _two_processes(
      ["--checkpoint", tiny["path"], "--input", "in.jsonl", "--output", "out.jsonl"],
      tmp_path,
      _free_port() % 10000,
      slurm=True,
  )
  assert all(rc == 0 for rc, _ in runs), runs
  assert not (tmp_path / "out.jsonl").exists()
  parts = [_lines(tmp_path / f"out.jsonl.part-{i}-of-2") for i in range(2)]
  assert sorted(parts[0]) == [0, 2, 4] and sorted(parts[1]) == [1, 3, 5]
