"""The BPE baseline: a byte-level BPE tokenizer (Hugging Face `tokenizers`) and a loop that trains a token LM.

Ids 0-3 are the package's special ids (BOE/pad, BOS, EOS, BPE; `blt_jax.tokenizer`), so a BPE document is
`[BOS] ids [EOS]` exactly like a byte document and the package's packing, document masks and steps apply unchanged.
The model is the package's causal transformer (`EntropyModel`) with a vocabulary-sized head, trained with the
package's steps and optimizer; the trainer itself reads bytes, hence this small loop.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Dict, List, Sequence

import flax.linen as nn
import jax
import numpy as np

from blt_jax import checkpoint as ckpt_lib
from blt_jax import data as data_lib
from blt_jax import optimizer as optimizer_lib
from blt_jax import steps, tokenizer
from blt_jax.config import EntropyModelConfig
from blt_jax.study import heldout

# Rare strings: the tokenizer splits special tokens out of raw text, so they must never occur in it.
SPECIAL_TOKENS = ("<|blt:boe|>", "<|blt:bos|>", "<|blt:eos|>", "<|blt:bpe|>")


def train_tokenizer(texts: Sequence[str], num_merges: int, path: str):
  """Byte-level BPE with `num_merges` merges over 256 byte symbols and the 4 special ids; saved to `path`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=len(SPECIAL_TOKENS) + 256 + num_merges,
      min_frequency=2,
      special_tokens=list(SPECIAL_TOKENS),
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  _check_special_ids(tok)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return tok


def load_tokenizer(path: str):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  tok = Tokenizer.from_file(path)
  _check_special_ids(tok)
  return tok


def _check_special_ids(tok) -> None:
  got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
  want = [tokenizer.BOE_ID, tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.BPE_ID]
  if got != want:
    raise RuntimeError(f"BPE special ids {got} differ from the package's {want}")


def encode_documents(tok, texts: Sequence[str], add_eos: bool) -> List[np.ndarray]:
  """`[BOS] ids (+ [EOS])` per text; raises if any text does not decode back to itself (bpb needs lossless)."""
  out = []
  for enc, text in zip(tok.encode_batch(list(texts), add_special_tokens=False), texts):
    if tok.decode(enc.ids, skip_special_tokens=False) != text:
      raise RuntimeError(f"BPE round trip changed a document ({text[:60]!r}...)")
    tail = [tokenizer.EOS_ID] if add_eos else []
    out.append(np.asarray([tokenizer.BOS_ID] + enc.ids + tail, np.int32))
  return out


def heldout_scores(
    tok, model: EntropyModelConfig, params, texts: Sequence[str], row_len: int, rows_per_batch: int
) -> Dict[str, float]:
  """bpb of `texts` (clean or noised) under the token LM: each text tokenized by `tok`, as a user's text would be,
  then its total token NLL in bits / the texts' UTF-8 bytes. Also the bytes per token of these texts."""
  docs = encode_documents(tok, texts, add_eos=False)
  scores = heldout.lm_scores(params, model, docs, heldout.utf8_bytes(texts), row_len, rows_per_batch)
  return dict(scores, bytes_per_token=scores["n_bytes"] / scores["n_scored"])


def save_export(path: str, model: EntropyModelConfig, params) -> None:
  """The trained token LM's params and config in `path` (a `save_params` dir that `train.load_entropy_model` and
  `heldout.load_lm_export` read): the noise scoring of a finished run needs them."""
  meta = {"format": "blt_jax", "model_type": "entropy_model", "model": model.to_dict()}
  ckpt_lib.save_params(path, params, meta, overwrite=True)


def bytes_per_token(texts: Sequence[str], token_docs: Sequence[np.ndarray]) -> float:
  """Byte-model positions per BPE position over the same documents (`[BOS] bytes [EOS]` vs `[BOS] ids [EOS]`):
  a byte model's FLOPs per position and this model's FLOPs per token / this ratio count the same text."""
  byte_positions = sum(len(t.encode("utf-8")) + 2 for t in texts)
  return byte_positions / sum(len(d) for d in token_docs)


@dataclasses.dataclass
class TokenRun:
  """What `train_token_lm` needs besides the model: data order, shapes and schedule."""

  seq_len: int  # tokens per row
  batch_size: int  # rows per step
  num_steps: int
  seed: int  # params init
  data_seed: int  # document order
  eval_steps: Sequence[int]  # steps after which `evaluate` runs


def train_token_lm(
    model: EntropyModelConfig,
    opt_cfg,
    run: TokenRun,
    token_docs: Sequence[np.ndarray],
    evaluate: Callable[[object, int], None],
    log: Callable[[str], None] = print,
) -> Dict:
  """Trains a causal token LM on packed `token_docs`; calls `evaluate(params, step)` at `run.eval_steps`.

  Returns wall time, the last logged training loss, and the final params (`params`).
  """
  sc = steps.StepConfig(model)
  tx = optimizer_lib.make_optimizer(opt_cfg, run.num_steps)
  schedule = optimizer_lib.lr_schedule(opt_cfg, run.num_steps)
  state = jax.jit(lambda: nn.meta.unbox(steps.make_init_fn(sc, tx, jax.random.PRNGKey(run.seed))()))()
  train_step = jax.jit(steps.make_train_step(sc, tx, schedule), donate_argnums=0)
  source = [{"ids": d} for d in token_docs]
  batches = iter(
      data_lib.build_train_dataset(
          source, seq_len=run.seq_len, batch_size=run.batch_size, seed=run.data_seed, process_index=0, process_count=1
      )
  )
  start, losses = time.perf_counter(), []
  for step in range(1, run.num_steps + 1):
    batch = {k: v[None] for k, v in next(batches).items()}  # one micro-batch: [1, B, N]
    state, metrics = train_step(state, batch)
    if step % max(1, run.num_steps // 10) == 0 or step == run.num_steps:
      host = jax.device_get(metrics)
      if not bool(host["finite"]):
        raise RuntimeError(f"BPE transformer: non-finite loss at step {step}")
      losses.append(float(host["loss"]))
      log(
          f"  bpe step {step}/{run.num_steps} loss {losses[-1]:.3f} nats/token " f"({time.perf_counter() - start:.0f}s)"
      )
    if step in run.eval_steps:
      evaluate(state.params, step)
  return dict(
      wall_s=time.perf_counter() - start, final_train_loss_per_token=losses[-1] if losses else None, params=state.params
  )


def measure_step_rate(
    model: EntropyModelConfig, opt_cfg, run: TokenRun, token_docs: Sequence[np.ndarray], steps_timed: int
) -> Dict[str, float]:
  """Seconds per step after compilation (median of `steps_timed`) and the first step's compile overhead."""
  times: List[float] = []
  t0 = time.perf_counter()

  def note(params, _step):
    jax.block_until_ready(params)
    times.append(time.perf_counter())

  timed = dataclasses.replace(run, num_steps=steps_timed + 1, eval_steps=range(1, steps_timed + 2))
  train_token_lm(model, opt_cfg, timed, token_docs, note, log=lambda _: None)
  deltas = np.diff(times)
  step_s = float(np.median(deltas))
  return dict(step_s=step_s, compile_s=max(0.0, times[0] - t0 - step_s))
