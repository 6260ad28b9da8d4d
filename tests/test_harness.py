"""lm-evaluation-harness model: its numbers are the scorer's and the generator's; local tasks through lm_eval's CLI."""

import json
import math
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only: a download attempt fails instead
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # an optional extra (requirements-test.txt)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

import helpers  # noqa: E402
from blt_jax import generate, harness, score, tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# Local tasks (also the ones of the README's tiny-model table): multiple choice, generation, rolling perplexity.

MC = [  # (context, choices, answer): Python, as the tiny config's training corpus (the stdlib sources) is
    ("import os\nimport ", ["}{]", "sys", "9q9"], 1),
    ("def __init__(self", ["):", "]]]", ")("], 0),
    ("    return ", ["}}}", "0o0o", "self"], 2),
    ("for i in ", ["))):", "range(n):", "import("], 1),
    ("if __name__ == ", ['"__main__":', "for for", "]]"], 0),
    ("class Foo(", ["return(", "def:", "object):"], 2),
    ("raise ", ["ValueError(", "import", "}:"], 0),
    ("    except ", ["return:", "KeyError:", "]]]"], 1),
    ("from collections import ", ["if if", "))", "OrderedDict"], 2),
    ("        self.", ["}}}", "assertEqual(", "def"], 1),
]
GEN = [  # (prompt, target): generation until a newline
    ("import o", "s"),
    ("import sys\nimport o", "s"),
    ("if __name__ == '__main__", "':"),
    ("    def __init__(self", "):"),
    ("class Foo(objec", "t):"),
    ("from __future__ import annotations\nimport sy", "s"),
]
PPL = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd(), sys.argv)\n\n\nif __name__ == '__main__':\n"
    "    main()\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]

TASKS = {
    "blt_local_mc": (
        "mc.jsonl",
        [dict(context=c, choices=ch, answer=a) for c, ch, a in MC],
        """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    ),
    "blt_local_gen": (
        "gen.jsonl",
        [dict(prompt=p, target=t) for p, t in GEN],
        """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    ),
    "blt_local_ppl": (
        "ppl.jsonl",
        [dict(text=t) for t in PPL],
        """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    ),
}


def write_tasks(directory) -> str:
  """Writes the local tasks (jsonl data + lm_eval yaml, datasets' cache inside) into `directory`; returns it."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for name, (data_file, rows, body) in TASKS.items():
    (directory / data_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / data_file}\n"
        f"  cache_dir: {directory / 'hf_cache'}\ntest_split: test\n{body}metadata:\n  version: 1.0\n"
    )
  return str(directory)


# ---------------------------------------------------------------------------------------------------------------
# A tiny random BLT with entropy patching.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  model = helpers.tiny_entropy_blt(max_seqlen=128)
  # Random weights: logit 0 for EOS and the non-ASCII bytes (below the best of a hundred random logits), so greedy
  # rows run on in ASCII, which stop strings can name.
  out = model["blt_params"]["local_decoder"]["output"]
  out["kernel"] = out["kernel"].at[:, tokenizer.EOS_ID].set(0.0).at[:, tokenizer.OFFSET + 128 :].set(0.0)
  return helpers.save_checkpoint(tmp_path_factory.mktemp("harness") / "ckpt", **model)


@pytest.fixture(scope="module")
def lm(ckpt):
  """The model as lm_eval builds it from `--model blt_jax --model_args ...`."""
  return get_model("blt_jax").create_from_arg_string(
      f"checkpoint={ckpt},gen_batch=4,gen_chunk=8", {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
  )


@pytest.fixture(scope="module")
def plain(ckpt):
  """The package's own scorer with its defaults."""
  return score.Scorer(ckpt)


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_registered_with_the_byte_tokenizer_as_lm_evals_hooks(lm):
  assert get_model("blt_jax") is harness.BLTHarnessLM and isinstance(lm, harness.BLTHarnessLM)
  assert lm.tok_encode("aé") == [ord("a") + 4, 0xC3 + 4, 0xA9 + 4]
  assert lm.tok_encode("a", add_special_tokens=True) == [tokenizer.BOS_ID, ord("a") + 4]
  assert lm.tok_decode(lm.tok_encode("naïve café")) == "naïve café"
  assert (lm.prefix_token_id, lm.eot_token_id, lm.max_length) == (tokenizer.BOS_ID, tokenizer.EOS_ID, 128)


def test_loglikelihood_is_the_scorers_continuation_nll(lm, plain):
  """Harness = -(NLL(context + continuation) - NLL(context)) by the plain scorer, and = the sum of the scorer's
  last per-byte NLLs; an empty context reads [BOS] alone; texts longer than a row (127 bytes) too."""
  long_context = " ".join(["the cat sat on a mat"] * 12)  # 251 bytes: the scorer's windows
  pairs = [
      ("Question: is a BLT a sandwich?\nAnswer:", " no"),
      ("", "Hello world"),
      ("naïve ", "café"),
      ("The quick brown", " fox"),
      (long_context, " and the dog ran"),
      ("x" * 120, "yz" * 10),
      ("abc", ""),
  ]
  got = lm.loglikelihood(_requests("loglikelihood", pairs))
  whole = plain.score_texts([c + x for c, x in pairs])
  context = {c: s.nll_nats for c, s in zip([c for c, _ in pairs if c], plain.score_texts([c for c, _ in pairs if c]))}
  for (c, x), (ll, _), w in zip(pairs, got, whole):
    if not x:
      assert ll == 0.0
      continue
    np.testing.assert_allclose(ll, -(w.nll_nats - context.get(c, 0.0)), rtol=RTOL, atol=1e-4)
  per_byte = lm.scorer.score_texts([c + x for c, x in pairs[:-1]])  # the harness's own scorer (per byte)
  for (c, x), (ll, _), s in zip(pairs, got, per_byte):
    np.testing.assert_allclose(ll, -s.nll_per_byte[-len(x.encode()) :].astype(np.float64).sum(), rtol=RTOL)


def test_sharded_and_bfloat16_model_args(lm, ckpt):
  """`mesh=fsdp:4+tensor:2` (params sharded over the 8 devices): the loglikelihoods equal the replicated model's;
  `dtype=bfloat16`: close to them (both as lm_eval passes --model_args)."""
  pairs = [("Question: is a BLT a sandwich?\nAnswer:", " no"), ("The quick brown", " fox"), ("naïve ", "café")]
  want = lm.loglikelihood(_requests("loglikelihood", pairs))
  extra = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
  sharded = get_model("blt_jax").create_from_arg_string(f"checkpoint={ckpt},mesh=fsdp:4+tensor:2", extra)
  assert sharded.model.mesh is not None and dict(sharded.model.mesh.shape) == dict(data=1, fsdp=4, tensor=2)
  for (ll, greedy), (ll_want, greedy_want) in zip(sharded.loglikelihood(_requests("loglikelihood", pairs)), want):
    np.testing.assert_allclose(ll, ll_want, rtol=1e-6)
    assert greedy == greedy_want
  bf16 = get_model("blt_jax").create_from_arg_string(f"checkpoint={ckpt},dtype=bfloat16", extra)
  assert bf16.model.dtype == "bfloat16"
  for (ll, _), (ll_want, _) in zip(bf16.loglikelihood(_requests("loglikelihood", pairs)), want):
    np.testing.assert_allclose(ll, ll_want, rtol=0.05, atol=0.05)


def test_is_greedy_says_whether_the_generator_produces_the_continuation(lm):
  """Prefixes of the generator's greedy output are greedy, a changed byte is not; the empty context reads [BOS]."""
  contexts = ["def f(x):", "Hello", "naïve café, 42 words and more", ""]
  produced = generate.generate(lm.model, contexts, 12, chunk=8)
  requests, expected = [], []
  for c, r in zip(contexts, produced):
    ctx = lm.tok_encode(c)
    cont = tokenizer.encode(r.continuation, add_bos=False, add_eos=False).tolist()
    for n in (1, 5, 12):
      requests.append(((c, n), ctx, cont[:n]))
      expected.append(True)
    changed = cont[:6]
    changed[3] = tokenizer.OFFSET + (changed[3] - tokenizer.OFFSET + 1) % 128
    requests.append(((c, "changed"), ctx, changed))
    expected.append(False)
  got = lm._loglikelihood_tokens(requests)
  assert [g for _, g in got] == expected
  # The string interface agrees (the greedy bytes are ASCII here).
  text = produced[0].continuation[:5].decode()
  ll, is_greedy = lm.loglikelihood(_requests("loglikelihood", [(contexts[0], text)]))[0]
  assert is_greedy and ll == pytest.approx(got[1][0], rel=RTOL)


def test_loglikelihood_rolling_is_the_scorers_document_nll(lm, plain):
  texts = ["Hello world", "", "naïve café", " ".join(["the cat sat on a mat"] * 15)]  # the last one in windows
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
  assert got[1] == 0.0
  expected = plain.score_texts([t for t in texts if t])
  for g, s in zip([g for g, t in zip(got, texts) if t], expected):
    np.testing.assert_allclose(g, -s.nll_nats, rtol=RTOL)


def test_generation_arguments_as_lm_evals_hf_model(lm):
  greedy = generate.Sampling()
  assert lm._gen_settings({"until": "\n\n", "max_gen_toks": 7}) == (7, greedy, (b"\n\n",))
  # Default length: max_gen_bytes (256), at most half the byte context.
  assert lm._gen_settings({"do_sample": False, "temperature": 0.7, "until": ["a", ""]}) == (64, greedy, (b"a",))
  assert lm._gen_settings({"do_sample": True, "temperature": 0.0})[1] == greedy
  assert lm._gen_settings({"do_sample": True, "top_k": 5})[1] == generate.Sampling(1.0, 5, 1.0)
  with pytest.raises(ValueError, match="max_encoder_seq_length=128"):
    lm._gen_settings({"max_gen_toks": 127})


def test_generate_until_is_the_generator(lm):
  """Two settings groups; prompts of several lengths (batches of 3 + a filler row padding the prompt length to its
  bucket), one longer than the context (cut from the left), stop strings that do cut: the generator's own bytes."""
  prompts = ["Hi", "def f(x):", "a" * 70, "z" + "0123456789" * 13]
  greedy_ref = generate.generate(lm.model, [p.encode()[-(128 - 1 - 20) :] for p in prompts], 20, chunk=8)
  stops = [r.continuation[6:8].decode() for r in greedy_ref[:2]]  # two bytes each run really produces
  settings = [
      {"until": stops, "max_gen_toks": 20},
      {"until": "\n\n", "max_gen_toks": 12, "do_sample": True, "temperature": 0.8, "top_k": 20},
  ]
  got = lm.generate_until(_requests("generate_until", [(p, s) for s in settings for p in prompts]))
  assert len(got[0]) <= 6 and len(got[1]) <= 6  # cut by the stop strings
  for k, s in enumerate(settings):
    max_bytes = s["max_gen_toks"]
    cut = [p.encode()[-(128 - 1 - max_bytes) :] for p in prompts]
    assert len(cut[-1]) < len(prompts[-1])
    sampling = generate.Sampling(0.8, 20, 1.0) if s.get("do_sample") else generate.Sampling()
    until = [s["until"]] if isinstance(s["until"], str) else s["until"]
    streams = range(k * len(prompts), (k + 1) * len(prompts))  # each request's index in the list
    ref = generate.generate(
        lm.model, cut, max_bytes, sampling=sampling, stop=[u.encode() for u in until], chunk=8, streams=streams
    )
    assert got[k * len(prompts) : (k + 1) * len(prompts)] == [r.continuation.decode("utf-8", "replace") for r in ref]


def test_repeated_requests_get_samples_of_their_own(lm):
  """lm_eval sends `repeats` copies of a request (pass@k): copy i samples from stream i, its index in the list, so
  the copies differ, and each is the generator's output in that stream whatever its batch."""
  prompt = "a" * 70  # the shapes of the test above: its compiled programs serve here
  settings = {"until": "\n\n", "max_gen_toks": 12, "do_sample": True, "temperature": 0.8, "top_k": 20}
  got = lm.generate_until(_requests("generate_until", [(prompt, settings)] * 5))  # batches of 3 (gen_batch 4)
  assert len(set(got)) == 5, got
  other = "z" + "0123456789" * 11 + "0123"  # 115 bytes: [BOS] + 115, the filler's padded prompt length
  ref = generate.generate(
      lm.model,
      [prompt] * 3 + [other],
      12,
      sampling=generate.Sampling(0.8, 20, 1.0),
      stop=[b"\n\n"],
      chunk=8,
      streams=[3, 4, 0, 9],
  )
  assert got[3:] == [r.continuation.decode("utf-8", "replace") for r in ref[:2]]
  assert got[0] == ref[2].continuation.decode("utf-8", "replace")


def _run_cli(ckpt, tasks_dir, out_dir, extra=()):
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
      HF_DATASETS_OFFLINE="1",
      HF_HUB_OFFLINE="1",
  )
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "blt_jax.harness",
          "--model_args",
          f"checkpoint={ckpt},gen_batch=4",
          "--tasks",
          ",".join(TASKS),
          "--include_path",
          tasks_dir,
          "--output_path",
          str(out_dir),
          "--log_samples",
          *extra,
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )


def test_local_tasks_through_lm_evals_command_line(lm, plain, ckpt, tmp_path):
  """`python -m blt_jax.harness` on the local tasks (offline): every logged response and every metric is the one the
  scorer and the generator give for the same requests."""
  tasks_dir = write_tasks(tmp_path / "tasks")
  run = _run_cli(ckpt, tasks_dir, tmp_path / "out")
  assert run.returncode == 0, run.stderr[-4000:]
  assert "blt_local_mc" in run.stdout and "bits_per_byte" in run.stdout  # lm_eval's table
  results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
  samples = {
      name: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{name}_*.jsonl")).open()]
      for name in TASKS
  }

  # Multiple choice: each choice's (log-likelihood, is_greedy) is the scorer's; acc follows.
  mc = sorted(samples["blt_local_mc"], key=lambda s: s["doc_id"])
  wholes = plain.score_texts([c + x for c, choices, _ in MC for x in choices])
  contexts = plain.score_texts([c for c, _, _ in MC])
  greedy = lm.loglikelihood(_requests("loglikelihood", [(c, x) for c, choices, _ in MC for x in choices]))
  correct = []
  for i, (s, (c, choices, answer)) in enumerate(zip(mc, MC)):
    lls = [float(r[0][0]) for r in s["resps"]]
    for j, ll in enumerate(lls):
      np.testing.assert_allclose(ll, -(wholes[3 * i + j].nll_nats - contexts[i].nll_nats), rtol=RTOL, atol=1e-4)
      assert str(s["resps"][j][0][1]) == str(greedy[3 * i + j][1])
    correct.append(int(np.argmax(lls)) == answer)
  assert results["blt_local_mc"]["acc,none"] == pytest.approx(np.mean(correct))

  # Generation: the generator's greedy bytes, until "\n", 16 bytes.
  gen = sorted(samples["blt_local_gen"], key=lambda s: s["doc_id"])
  ref = generate.generate(lm.model, [p for p, _ in GEN], 16, stop=[b"\n"])
  assert [s["filtered_resps"][0] for s in gen] == [r.continuation.decode("utf-8", "replace") for r in ref]
  assert results["blt_local_gen"]["exact_match,none"] == pytest.approx(
      np.mean([r.continuation.decode() == t for r, (_, t) in zip(ref, GEN)])
  )

  # Rolling perplexity: bits per byte is the scorer's aggregate bpb.
  docs = plain.score_texts(PPL)
  bpb = sum(d.nll_nats for d in docs) / math.log(2) / sum(d.n_bytes for d in docs)
  assert results["blt_local_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=RTOL)
