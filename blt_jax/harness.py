"""lm-evaluation-harness model `blt_jax`: the field's benchmarks on a BLT checkpoint, with bytes as the unit.

  python -m blt_jax.harness --model_args checkpoint=CKPT --tasks arc_easy,piqa,hellaswag --output_path results/

runs lm_eval's own command line (every `lm-eval run` flag works) with `--model blt_jax` filled in. In Python,
`import blt_jax.harness` registers the model: `lm_eval.api.registry.get_model("blt_jax")(checkpoint=CKPT)`, or
`lm_eval.simple_evaluate(model="blt_jax", model_args={"checkpoint": CKPT}, tasks=[...])`. Needs `pip install
lm-eval` (requirements-test.txt pins the tested version).

The three request types run on the package's own drivers, so their numbers are the scorer's and the generator's:
  * loglikelihood(context, continuation): the Scorer (per-byte, with greedy ids) on `[BOS] + context +
    continuation`; the result is minus the sum of the last len(continuation) per-byte NLLs, and is_greedy says whether
    every continuation byte is the greedy byte at its position (the generator's greedy: ids 0/1/3 never). An empty
    context reads `[BOS]` alone. No space moves from the context to the continuation (a BPE-only concern).
  * loglikelihood_rolling(text): minus the Scorer's `nll_nats` of `[BOS] + text` (no EOS), every byte scored once.
  * generate_until(context, gen_kwargs): `generate.generate` with `until` as stop strings, `max_gen_toks` bytes
    (default `max_gen_bytes`, at most half the byte context), greedy unless `do_sample` (then temperature / top_k /
    top_p, seed `seed`; request i of the list samples from stream i, so the `repeats` copies of a request differ and
    no output depends on its batch).
Bytes everywhere: a "token" of lm_eval is one byte (UTF-8), its tokenizer hooks are the byte tokenizer (`tok_encode`
gives byte ids without BOS, `prefix_token_id` is BOS, `eot_token_id` EOS), `max_gen_toks` counts bytes.

Requests of any length. Scoring never truncates: a text longer than a Scorer row is scored with the Scorer's window
rule (every byte once, each with at least `min_context` bytes of left context). Window boundaries depend only on the
row length and the text's start, not on where it ends, and the model is causal, so the context's bytes score the
same alone as inside `context + continuation`: loglikelihood equals NLL(context) - NLL(context + continuation) at
every length. A generation prompt is cut from the left to the last `max_encoder_seq_length - 1 - max_gen_toks` bytes
(the generator's byte context; a warning counts the cuts).

Batched and bucketed: every loglikelihood (or rolling) call is one Scorer stream (packed rows, a few row and
patch-slot buckets); generation sorts prompts by length and runs `gen_batch` rows at a time, whose padded prompt
length is rounded up to a power of two (at least 64) by a filler row (the batch's longest prompt, left-padded with
spaces; its output is discarded), so a whole task compiles a few generation programs. lm_eval's `batch_size` and
`device` are ignored: sizes come from the model args below, devices are JAX's local devices. Single process.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import lm_eval.models  # noqa: F401  (lm_eval's own lazy model table, before ours joins the registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm import tqdm

from blt_jax import generate, loading, placement, tokenizer
from blt_jax.score import MIN_ROW_BUCKET, Scorer

NAME = "blt_jax"
log = logging.getLogger(__name__)


class BLTHarnessLM(TemplateLM):
  """A BLT checkpoint as an lm_eval model (see the module docstring for the conventions).

  `checkpoint`: a path `loading.load` accepts, or a LoadedModel. `row_bytes`, `min_context`, `batch_bytes`: the
  Scorer's. `gen_batch`: generation rows per batch; `gen_chunk`: bytes per jitted generation call between stop-string
  checks; `max_gen_bytes`: the default `max_gen_toks` (at most half the byte context); `seed`: the sampling seed.
  `dtype` ("float32" | "bfloat16") and `mesh` ("fsdp:4+tensor:2", the `--mesh` of `python -m blt_jax.score` written
  without `=` and `,`, which `--model_args` reserve): how the params are stored and sharded (`blt_jax.placement`).
  """

  def __init__(
      self,
      checkpoint: Union[str, loading.LoadedModel],
      *,
      row_bytes: Optional[int] = None,
      min_context: Optional[int] = None,
      batch_bytes: int = 16384,
      gen_batch: int = 16,
      gen_chunk: int = 32,
      max_gen_bytes: int = 256,
      seed: int = 0,
      batch_size: Any = None,
      max_batch_size: Any = None,
      device: Any = None,
      dtype: Optional[str] = None,
      mesh: Optional[str] = None,
  ):
    super().__init__()
    del batch_size, max_batch_size, device  # lm_eval's torch-oriented knobs; see the module docstring
    mesh = placement.make_mesh(placement.parse_mesh(mesh)) if mesh else None
    self.model = loading.as_model(checkpoint, dtype, mesh)
    self.scorer = Scorer(
        self.model,
        row_bytes=row_bytes,
        min_context=min_context,
        batch_bytes=batch_bytes,
        per_byte=True,
        per_byte_argmax=True,
    )
    if gen_batch < 2:
      raise ValueError(f"gen_batch={gen_batch} must be at least 2 (one row may be the bucket's filler)")
    self.gen_batch, self.gen_chunk, self.seed = int(gen_batch), int(gen_chunk), int(seed)
    self._max_gen_bytes = int(max_gen_bytes)

  # -------------------------------------------------------------------------------------------------------------
  # lm_eval's tokenizer hooks: the byte tokenizer.

  @property
  def eot_token_id(self) -> int:
    return tokenizer.EOS_ID

  @property
  def prefix_token_id(self) -> int:
    return tokenizer.BOS_ID

  @property
  def max_length(self) -> int:
    return self.model.config.max_encoder_seq_length

  @property
  def max_gen_toks(self) -> int:
    return min(self._max_gen_bytes, self.max_length // 2)

  @property
  def tokenizer_name(self) -> str:
    return "blt_jax-bytes"

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
    return tokenizer.encode(string, add_bos=bool(add_special_tokens), add_eos=False).tolist()

  def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
    return tokenizer.decode_bytes(tokens).decode("utf-8", "replace")

  def get_model_info(self) -> Dict[str, Any]:
    return {
        "model_name": NAME,
        "checkpoint": self.model.path,
        "row_bytes": self.scorer.row_len,
        "min_context": self.scorer.min_context,
        "patching": self.model.patching.mode,
    }

  # -------------------------------------------------------------------------------------------------------------
  # Scoring.

  def _score(self, rows: List[np.ndarray], disable_tqdm: bool, desc: str) -> List[Any]:
    """DocScores of `[BOS] ...` id arrays in input order: one Scorer stream, with a progress bar."""
    out: List[Any] = [None] * len(rows)
    with tqdm(total=len(rows), desc=desc, disable=disable_tqdm) as bar:
      for s in self.scorer.score_stream((i, str(i), r) for i, r in enumerate(rows)):
        out[s.index] = s
        bar.update(1)
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
    return self._loglikelihood_tokens(
        [((c, x), self.tok_encode(c), self.tok_encode(x)) for c, x in (r.args for r in requests)],
        disable_tqdm=disable_tqdm,
    )

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
    """(key, context ids, continuation ids) -> (log p(continuation | [BOS] context), is_greedy)."""
    rows, wanted = [], []
    for i, (_, context, continuation) in enumerate(requests):
      context = [int(t) for t in context]
      if not context or context[0] != tokenizer.BOS_ID:  # byte ids are >= 4: a leading 1 is the prefix token
        context = [tokenizer.BOS_ID] + context
      if len(continuation):
        rows.append(np.asarray(context + [int(t) for t in continuation], np.int32))
        wanted.append(i)
    out: List[Tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation: log 1, and greedy
    for i, s in zip(wanted, self._score(rows, disable_tqdm, "blt_jax loglikelihood")):
      continuation = np.asarray(requests[i][2], np.int32)
      n = len(continuation)
      out[i] = (
          -float(np.sum(s.nll_per_byte[-n:], dtype=np.float64)),
          bool(np.array_equal(s.greedy_per_byte[-n:], continuation)),
      )
    for (key, _, _), result in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
    texts = [r.args[0] for r in requests]
    data = [t.encode("utf-8") for t in texts]
    wanted = [i for i, d in enumerate(data) if d]
    out = [0.0] * len(texts)  # the empty text: log 1
    rows = [tokenizer.encode(data[i], add_eos=False) for i in wanted]
    for i, s in zip(wanted, self._score(rows, disable_tqdm, "blt_jax loglikelihood_rolling")):
      out[i] = -s.nll_nats
    for text, result in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
    return out

  # -------------------------------------------------------------------------------------------------------------
  # Generation.

  def _gen_settings(self, gen_kwargs: Dict[str, Any]) -> Tuple[int, generate.Sampling, Tuple[bytes, ...]]:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_bytes = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0) or 0.0)
    top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
    # As lm_eval's HF model: without do_sample (or at temperature 0) decoding is greedy.
    sampling = generate.Sampling(temperature, top_k, top_p) if do_sample and temperature > 0 else generate.Sampling()
    if kwargs:
      log.warning("blt_jax: ignoring generation arguments %s", sorted(kwargs))
    limit = self.max_length - 2  # [BOS] and at least one prompt byte
    if not 1 <= max_bytes <= limit:
      raise ValueError(
          f"max_gen_toks={max_bytes} bytes must be in [1, {limit}] (the model's byte context "
          f"max_encoder_seq_length={self.max_length}, less [BOS] and one prompt byte)"
      )
    return max_bytes, sampling, tuple(u.encode("utf-8") for u in until if u)

  def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
    groups: Dict[Tuple[int, generate.Sampling, Tuple[bytes, ...]], List[int]] = {}
    prompts: List[bytes] = []
    cut = 0
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args
      settings = self._gen_settings(gen_kwargs)
      prompt = context.encode("utf-8")
      keep = self.max_length - 1 - settings[0]
      if len(prompt) > keep:
        prompt, cut = prompt[len(prompt) - keep :], cut + 1
      prompts.append(prompt)
      groups.setdefault(settings, []).append(i)
    if cut:
      log.warning("blt_jax: %d of %d prompts cut from the left to fit the byte context", cut, len(requests))
    out: List[Optional[str]] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="blt_jax generate_until", disable=disable_tqdm)
    for (max_bytes, sampling, stop), members in groups.items():
      members = sorted(members, key=lambda i: len(prompts[i]))
      keep = self.max_length - 1 - max_bytes
      for start in range(0, len(members), self.gen_batch - 1):
        batch = members[start : start + self.gen_batch - 1]
        rows = [prompts[i] for i in batch]
        longest = max(rows, key=len)
        filler = b" " * (_gen_bucket(len(longest) + 1, keep + 1) - 1 - len(longest)) + longest
        fillers = self.gen_batch - len(rows)
        rows += [filler] * fillers
        # Each request samples from the stream of its index in the whole list (a filler's output is discarded).
        results = generate.generate(
            self.model,
            rows,
            max_bytes,
            sampling=sampling,
            seed=self.seed,
            stop=stop,
            chunk=min(self.gen_chunk, max_bytes),
            streams=batch + [batch[-1]] * fillers,
        )
        for i, res in zip(batch, results):
          if res.stopped in generate.ERRORS.values():
            log.warning("blt_jax: a generation stopped early: %s", res.stopped)
          out[i] = res.continuation.decode("utf-8", "replace")
        bar.update(len(batch))
    bar.close()
    for r, text in zip(requests, out):
      self.cache_hook.add_partial("generate_until", r.args, text)
    return out


def _gen_bucket(length: int, cap: int) -> int:
  """The padded prompt length (`[BOS]` + bytes) of a generation batch: a power of two >= 64, at most `cap`."""
  b = MIN_ROW_BUCKET
  while b < length:
    b *= 2
  return max(length, min(b, cap))


if NAME not in model_registry:  # a lazy entry naming the module, so `python -m blt_jax.harness` registers one class
  model_registry.register(NAME, target="blt_jax.harness:BLTHarnessLM")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """lm_eval's command line with `--model blt_jax` (and its `run` subcommand) filled in."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] not in ("run", "ls", "validate"):
    args = ["run"] + args
  if args[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
    args[1:1] = ["--model", NAME]
  sys.argv = ["python -m blt_jax.harness"] + args
  try:
    cli_evaluate()
  except loading.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
