"""Runs the FLOP-matched study in stages, each saved under OUT and reused when the study is run again.

  data -> BPE tokenizer -> entropy model -> patching (thresholds, patch slots) -> calibration (seconds per step)
  -> plan (one training-FLOP budget for every variant, from --budget-minutes) -> one run per variant and seed
  -> its held-out scores under each noise type (`noise`) -> report (every finished run under OUT)

FLOPs come from `blt_jax.flops` for every variant: per byte of training text, times the bytes each run sees. The
plan divides the time left after the fixed costs (entropy model, compiles, held-out scoring) so that every variant
gets the same FLOPs: F = T / sum_v(1 / FLOP rate_v), steps_v = F / FLOPs per step_v. The plan is written once, so
a resumed study keeps its budget; runs resume from their own checkpoints (the BPE loop restarts its run).

Round two (issue 27) adds, each runnable on its own against the same OUT: run seeds (`seeds`: seed k inits the
params with k and orders the training documents with data_seed + k; the entropy model, thresholds, calibration and
plan are shared), runs at a multiple of the plan's budget (`budget_scale`, same schedule shape over more steps), a
variant filter, and noised held-out scoring of every finished run from its export. A run lives in
`runs/<variant>[_seed<k>][_x<scale>]/`, so round one's `runs/<variant>/` is seed 0 at the plan's budget, as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from blt_jax import data as data_lib
from blt_jax import flops, steps, tokenizer, train, train_config
from blt_jax.config import PatchingConfig
from blt_jax.entropy_model import compute_entropies_jit
from blt_jax.study import bpe, corpus, heldout, io, noise, report, variants
from blt_jax.study.variants import Variant

CALIBRATION_STEPS = 5  # timed steps per variant (the first two are left out of the median)
SHARED_SEED = 0  # params init of the shared stages (entropy model, calibration): one patcher for every run


@dataclasses.dataclass(frozen=True)
class Settings:
  out: str
  budget_minutes: float
  smoke: bool = False
  debs_dir: str = ""  # default OUT/debs
  seeds: Tuple[int, ...] = (0,)  # run seeds: seed k inits params with k, orders training documents with data_seed + k
  data_seed: int = 0  # corpus selection, training document order (plus the run seed), held-out noise
  variants: Tuple[str, ...] = ()  # the variants to run (empty: all); the plan always covers all
  noise: Tuple[str, ...] = tuple(n.name for n in noise.NOISES)  # noise types to score every selected run under
  budget_scale: float = 1.0  # runs at this multiple of the plan's training FLOPs
  bpe_merges: int = 4000
  train_bytes: int = 8_000_000
  heldout_bytes: int = 49_152
  evals: int = 3  # held-out points per run (the curve)
  score_rows: int = 32  # rows per held-out scoring batch


def smoke_settings(out: str, budget_minutes: float = 3.0, debs_dir: str = "") -> Settings:
  return Settings(
      out=out,
      budget_minutes=budget_minutes,
      smoke=True,
      debs_dir=debs_dir,
      bpe_merges=200,
      train_bytes=150_000,
      heldout_bytes=3_000,
      evals=1,
      score_rows=8,
  )


@dataclasses.dataclass(frozen=True)
class RunKey:
  """One training run: a variant, a run seed and a multiple of the plan's budget."""

  variant: Variant
  seed: int = 0
  budget_scale: float = 1.0

  @property
  def id(self) -> str:
    """Its directory under runs/; seed 0 at the plan's budget keeps round one's bare variant name."""
    out = self.variant.name
    if self.seed:
      out += f"_seed{self.seed}"
    if self.budget_scale != 1:
      out += f"_x{self.budget_scale:g}"
    return out


def _say(line: str) -> None:
  print(f"[study {time.strftime('%H:%M:%S')}] {line}", flush=True)


class _StudyTrainer(train.Trainer):
  """The package's trainer, with its validation pass replaced by held-out scoring (`score_fn(trainer, params,
  step)`); skipped at step 0 (an untrained model's point says nothing on a log-FLOPs axis)."""

  def __init__(self, cfg, workdir: str, score_fn: Callable):
    super().__init__(cfg, workdir)
    self._score_fn = score_fn
    self.step_now = 0
    dispatch = self.train_step

    def counted(*args):
      self.step_now += 1
      return dispatch(*args)

    self.train_step = counted

  def _initial_state(self):
    state, iterator, step = super()._initial_state()
    self.step_now = step
    return state, iterator, step

  def evaluate(self, params):
    if self.step_now == 0:
      return {}
    return self._score_fn(self, params, self.step_now) or {}


def _run_trainer(cfg, workdir: str, score_fn: Callable) -> dict:
  trainer = _StudyTrainer(cfg, workdir, score_fn)
  try:
    t0 = time.perf_counter()
    summary = trainer.run()
    summary["wall_s"] = time.perf_counter() - t0
    summary["trainer"] = trainer
    return summary
  finally:
    trainer.close()


def _config_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


class Study:
  """One study under `settings.out`; `run()` does every stage not yet done and writes the report."""

  def __init__(self, settings: Settings):
    self.s = settings
    self.scale = variants.SMOKE if settings.smoke else variants.REAL
    self.t0 = time.time()
    if settings.budget_scale <= 0:
      raise ValueError(f"budget_scale must be positive, got {settings.budget_scale}")
    for name in settings.variants:
      variants.variant(name)  # unknown names fail here, before any work
    self.selected = tuple(v for v in variants.VARIANTS if not settings.variants or v.name in settings.variants)
    self.noises = tuple(n for n in noise.NOISES if n.name in {noise.noise(m).name for m in settings.noise})
    self._noised: Dict[str, List[str]] = {}
    os.makedirs(settings.out, exist_ok=True)

  def path(self, *parts: str) -> str:
    return os.path.join(self.s.out, *parts)

  # -------------------------------------------------------------------------------------------------------------
  # Stages.

  def prepare_data(self) -> dict:
    spec = corpus.CorpusSpec(
        train_bytes=self.s.train_bytes,
        heldout_bytes=self.s.heldout_bytes,
        seed=self.s.data_seed,
        smoke=self.s.smoke,
        max_file_bytes=4_000 if self.s.smoke else corpus.MAX_FILE_BYTES,
    )
    manifest = corpus.prepare(spec, self.path("data"), self.s.debs_dir or self.path("debs"))
    self.train_texts = [d.text for d in corpus.read_jsonl(manifest["paths"]["train"])]
    self.heldout_texts = [d.text for d in corpus.read_jsonl(manifest["paths"]["heldout"])]
    self.heldout_bytes = sum(len(t.encode("utf-8")) for t in self.heldout_texts)
    self.data_paths = manifest["paths"]
    _say(
        f"data: {manifest['train']['bytes']:,} training bytes ({', '.join(manifest['sources']['train'])}), "
        f"{manifest['heldout']['bytes']:,} held-out bytes ({', '.join(manifest['sources']['heldout'])})"
    )
    return manifest

  def prepare_bpe(self) -> dict:
    path = self.path("bpe", "tokenizer.json")
    stats = io.read_json(self.path("bpe", "stats.json"))
    reuse = stats is not None and stats["merges_requested"] == self.s.bpe_merges
    tok = bpe.load_tokenizer(path) if reuse else bpe.train_tokenizer(self.train_texts, self.s.bpe_merges, path)
    self.bpe_tok = tok
    self.bpe_train = bpe.encode_documents(tok, self.train_texts, add_eos=True)
    self.bpe_heldout = bpe.encode_documents(tok, self.heldout_texts, add_eos=False)
    heldout_bpt = bpe.bytes_per_token(self.heldout_texts, [np.append(d, tokenizer.EOS_ID) for d in self.bpe_heldout])
    stats = dict(
        merges_requested=self.s.bpe_merges,
        vocab_size=tok.get_vocab_size(),
        train_bytes_per_token=bpe.bytes_per_token(self.train_texts, self.bpe_train),
        heldout_bytes_per_token=heldout_bpt,
        library="tokenizers",
        path=path,
    )
    io.write_json(self.path("bpe", "stats.json"), stats)
    _say(f"BPE: vocab {stats['vocab_size']}, {stats['train_bytes_per_token']:.2f} byte positions per token")
    return stats

  def _heldout_byte_docs(self) -> List[np.ndarray]:
    return heldout.byte_docs(self.heldout_texts)

  def _lm_heldout(self, model_cfg, params, docs, n_bytes: int, row_len: int) -> dict:
    return heldout.lm_scores(params, model_cfg, docs, n_bytes, row_len, self.s.score_rows)

  def train_entropy_model(self) -> dict:
    result_path = self.path("runs", "entropy_model", "result.json")
    done = io.read_json(result_path)
    if done is not None:
      return done
    cfg = variants.entropy_model_config(self.scale, self.data_paths, seed=SHARED_SEED, data_seed=self.s.data_seed)
    docs = self._heldout_byte_docs()
    scores = {}

    def score(trainer, params, step):
      scores[step] = self._lm_heldout(trainer.sc.model, params, docs, self.heldout_bytes, self.scale.seq_len)
      return dict(val_bpb=scores[step]["bpb"])

    _say(f"entropy model: {cfg.num_steps} steps")
    summary = _run_trainer(cfg, self.path("runs", "entropy_model"), score)
    model_cfg = summary["trainer"].sc.model
    fpb = flops.entropy_model_train_flops_per_byte(model_cfg, cfg.seq_len)
    bytes_seen = cfg.num_steps * cfg.global_batch_size * cfg.seq_len
    result = dict(
        steps=cfg.num_steps,
        bytes_seen=bytes_seen,
        train_flops=fpb * bytes_seen,
        train_flops_per_byte=fpb,
        inference_flops_per_byte=flops.inference_flops_per_byte(fpb),
        heldout=scores.get(cfg.num_steps),
        wall_s=summary["wall_s"],
        config=_config_json(cfg),
    )
    io.write_json(result_path, result)
    return result

  def choose_patching(self) -> dict:
    """Per BLT variant: threshold (entropy), mean patch length on training batches, patch slots per row."""
    out_path = self.path("patching.json")
    done = io.read_json(out_path)
    if done is not None:
      return done
    entropy_cfg, entropy_params = train.load_entropy_model(self.path("runs", "entropy_model"))
    batches = self._sample_batches(entropy_cfg, entropy_params)
    result = {}
    for v in variants.VARIANTS:
      if v.kind != "blt":
        continue
      threshold = None
      if v.mode == "entropy":
        threshold = _threshold_for(v, batches, entropy_cfg, self.scale.seq_len)
      length, most = _patch_stats(_patching_config(v, threshold), batches, self.scale.seq_len)
      slots = 0 if self.s.smoke else min(self.scale.seq_len + 1, int(math.ceil(most * 1.25)) + 4)
      result[v.name] = dict(
          threshold=threshold, train_mean_patch_length=length, max_patches_seen=most, max_patches=slots
      )
      _say(
          f"patching {v.name}: mean patch length {length:.2f} on training rows"
          + (f", threshold {threshold:.4f} nats" if threshold is not None else "")
          + f", slots {slots or 'all'}"
      )
    io.write_json(out_path, result)
    return result

  def _sample_batches(self, entropy_cfg, entropy_params) -> List[dict]:
    cfg = variants.byte_lm_config(
        self.scale, self.data_paths, num_steps=1, seed=SHARED_SEED, data_seed=self.s.data_seed, evals=1
    )
    iterator = data_lib.make_train_iterator(
        cfg.data, self.scale.seq_len, self.scale.batch_size, self.s.data_seed, process_index=0, process_count=1
    )
    batches = []
    for _ in range(2 if self.s.smoke else 16):
      batch = next(iterator)
      batch["entropies"] = np.asarray(compute_entropies_jit(entropy_params, batch["tokens"], entropy_cfg))
      batches.append(batch)
    return batches

  # -------------------------------------------------------------------------------------------------------------
  # Configs and FLOPs per variant.

  def trainer_config(self, v: Variant, num_steps: int, patching: dict, seed: int = SHARED_SEED):
    common = dict(num_steps=num_steps, seed=seed, data_seed=self.s.data_seed + seed, evals=self.s.evals)
    if v.kind == "byte":
      return variants.byte_lm_config(self.scale, self.data_paths, **common)
    p = patching[v.name]
    return variants.blt_config(
        v,
        self.scale,
        self.data_paths,
        threshold=p["threshold"],
        max_patches=p["max_patches"],
        entropy_checkpoint=self.path("runs", "entropy_model"),
        **common,
    )

  def bpe_setup(self, bpe_stats: dict):
    model = variants.bpe_model_config(self.scale, bpe_stats["vocab_size"])
    return model, variants.bpe_seq_len(self.scale, bpe_stats["train_bytes_per_token"])

  def train_flops_per_byte(
      self, v: Variant, patching: dict, bpe_stats: dict, mean_patch_length: Optional[float] = None
  ) -> float:
    if v.kind == "bpe":
      model, seq = self.bpe_setup(bpe_stats)
      return flops.token_model_train_flops_per_byte(model, seq, bpe_stats["train_bytes_per_token"])
    model = train_config.model_config(self.trainer_config(v, 1, patching))
    if v.kind == "byte":
      return flops.entropy_model_train_flops_per_byte(model, self.scale.seq_len)
    length = mean_patch_length or patching[v.name]["train_mean_patch_length"]
    return flops.blt_train_flops_per_byte(model, self.scale.seq_len, length)

  def bytes_per_step(self, v: Variant, bpe_stats: dict) -> float:
    if v.kind == "bpe":
      _, seq = self.bpe_setup(bpe_stats)
      return self.scale.batch_size * seq * bpe_stats["train_bytes_per_token"]
    return self.scale.batch_size * self.scale.seq_len

  # -------------------------------------------------------------------------------------------------------------
  # Calibration and the plan.

  def calibrate(self, patching: dict, bpe_stats: dict) -> dict:
    out_path = self.path("calibration.json")
    done = io.read_json(out_path)
    if done is not None or self.s.smoke:
      return done or {}
    result = {}
    for v in variants.VARIANTS:
      if v.kind == "bpe":
        model, seq = self.bpe_setup(bpe_stats)
        run = bpe.TokenRun(seq, self.scale.batch_size, CALIBRATION_STEPS, SHARED_SEED, self.s.data_seed, ())
        result[v.name] = bpe.measure_step_rate(
            model, variants.optimizer_config(self.scale, CALIBRATION_STEPS), run, self.bpe_train, CALIBRATION_STEPS
        )
      else:
        result[v.name] = self._calibrate_trainer(v, patching)
      _say(f"calibration {v.name}: {result[v.name]['step_s']:.3f} s/step, compile {result[v.name]['compile_s']:.0f} s")
    io.write_json(out_path, result)
    return result

  def _calibrate_trainer(self, v: Variant, patching: dict) -> dict:
    cfg = self.trainer_config(v, CALIBRATION_STEPS, patching)
    cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 1, 0, 10**6
    workdir = self.path("calibration", v.name)
    shutil.rmtree(workdir, ignore_errors=True)
    summary = _run_trainer(cfg, workdir, lambda *_: {})
    shutil.rmtree(workdir, ignore_errors=True)
    rows_bytes = cfg.global_batch_size * cfg.seq_len
    rates = [m["bytes_per_s"] for _, m in summary["history"] if "bytes_per_s" in m]
    step_s = float(np.median([rows_bytes / r for r in rates[2:]]))
    return dict(step_s=step_s, compile_s=max(0.0, rows_bytes / rates[0] - step_s))

  def make_plan(self, patching: dict, bpe_stats: dict, calibration: dict) -> dict:
    out_path = self.path("plan.json")
    done = io.read_json(out_path)
    if done is not None:
      return done
    per_step = {
        v.name: self.train_flops_per_byte(v, patching, bpe_stats) * self.bytes_per_step(v, bpe_stats)
        for v in variants.VARIANTS
    }
    if self.s.smoke:
      budget = max(per_step.values()) * 4  # the costliest variant takes 4 steps
      left_s = None
    else:
      budget, left_s = self._flop_budget(per_step, patching, bpe_stats, calibration)
    runs = {}
    for v in variants.VARIANTS:
      n = max(2, int(round(budget / per_step[v.name])))
      runs[v.name] = dict(
          steps=n,
          flops_per_step=per_step[v.name],
          planned_flops=n * per_step[v.name],
          est_seconds=n * calibration[v.name]["step_s"] if calibration else None,
      )
    plan = dict(flops_per_run=budget, training_seconds_left=left_s, runs=runs)
    io.write_json(out_path, plan)
    _say(f"plan: {budget:.3g} training FLOPs per run; steps " + ", ".join(f"{k} {r['steps']}" for k, r in runs.items()))
    return plan

  def _flop_budget(self, per_step: dict, patching: dict, bpe_stats: dict, calibration: dict):
    """(FLOPs per run, training seconds): every variant at each of this invocation's seeds fits the time left."""
    left = self.s.budget_minutes * 60 - (time.time() - self.t0)
    # Bytes each run scores after training: the clean text once more and every noised text (from its export).
    noise_bytes = (
        self.heldout_bytes + sum(heldout.utf8_bytes(self.noised_texts(n)) for n in self.noises) if self.noises else 0
    )
    seeds = len(self.s.seeds)
    overhead, inverse_rate = 0.0, 0.0
    for v in variants.VARIANTS:
      c = calibration[v.name]
      rate = per_step[v.name] / c["step_s"]  # training FLOPs per second
      infer = flops.inference_flops_per_byte(self.train_flops_per_byte(v, patching, bpe_stats))
      # Scoring: the bytes (x2 for window overlap and padding) at the training FLOP rate.
      scored = self.s.evals * self.heldout_bytes + noise_bytes
      overhead += seeds * ((3 if noise_bytes else 2) * c["compile_s"] + 2 * scored * infer / rate)
      inverse_rate += seeds / rate
    train_s = 0.95 * left - overhead - 30
    if train_s <= 0:
      raise RuntimeError(
          f"--budget-minutes={self.s.budget_minutes} leaves no training time: {left:.0f} s left "
          f"after data, tokenizer, entropy model and calibration, {overhead:.0f} s of compiles and "
          f"scoring to come; give a larger budget"
      )
    return train_s / inverse_rate, train_s

  # -------------------------------------------------------------------------------------------------------------
  # The runs.

  def run_keys(self) -> List[RunKey]:
    """This invocation's runs: every selected variant at every seed, at `budget_scale` times the plan's budget."""
    return [RunKey(v, seed, self.s.budget_scale) for v in self.selected for seed in self.s.seeds]

  def steps_for(self, key: RunKey, plan: dict) -> int:
    """The plan's steps, or at another budget the whole steps nearest to it (the schedule stretches with them)."""
    planned = plan["runs"][key.variant.name]
    if key.budget_scale == 1:
      return planned["steps"]
    return max(2, int(round(key.budget_scale * plan["flops_per_run"] / planned["flops_per_step"])))

  def run_variant(self, key: RunKey, plan: dict, patching: dict, bpe_stats: dict) -> dict:
    v = key.variant
    result_path = self.path("runs", key.id, "result.json")
    done = io.read_json(result_path)
    if done is not None and not self._needs_bpe_params(key):
      return done
    if done is not None:
      _say(
          f"run {key.id}: finished without saved params (round one's BPE loop kept none); trained again, same "
          f"seeds and data, for the noise scoring"
      )
    n = self.steps_for(key, plan)
    _say(f"run {key.id}: {n} steps")
    if v.kind == "bpe":
      result = self._run_bpe(key, n, bpe_stats)
    else:
      result = self._run_trainer_variant(key, n, patching, bpe_stats)
    result.update(
        name=v.name,
        label=v.label,
        kind=v.kind,
        seed=key.seed,
        budget_scale=key.budget_scale,
        steps=n,
        planned_flops=n * plan["runs"][v.name]["flops_per_step"],
    )
    io.write_json(result_path, result)
    _say(
        f"run {key.id}: held-out {result['heldout']['bpb']:.4f} bpb after {result['train_flops']:.3g} FLOPs "
        f"({result['wall_s']:.0f} s)"
    )
    return result

  def _curve(self, key: RunKey) -> "_Curve":
    return _Curve(self.path("runs", key.id, "curve.json"))

  def _run_trainer_variant(self, key: RunKey, n: int, patching: dict, bpe_stats: dict) -> dict:
    v = key.variant
    cfg = self.trainer_config(v, n, patching, key.seed)
    curve = self._curve(key)
    if v.kind == "blt":
      blt_scorer = heldout.HeldOutBLT(self.heldout_texts, self.scale.seq_len, self.s.score_rows)

      def score(trainer, params, step):
        return curve.add(step, blt_scorer(trainer.sc, params, trainer.entropy_params))

    else:
      docs = self._heldout_byte_docs()

      def score(trainer, params, step):
        return curve.add(step, self._lm_heldout(trainer.sc.model, params, docs, self.heldout_bytes, cfg.seq_len))

    summary = _run_trainer(cfg, self.path("runs", key.id), score)
    model = summary["trainer"].sc.model
    lengths = [m["mean_patch_length"] for _, m in summary["history"] if "mean_patch_length" in m]
    train_length = float(np.mean(lengths)) if lengths else None
    per_byte = self.train_flops_per_byte(v, patching, bpe_stats, train_length)
    bytes_seen = n * self.bytes_per_step(v, bpe_stats)
    final = curve.points[-1]
    if v.kind == "blt":
      infer = flops.inference_flops_per_byte(
          flops.blt_train_flops_per_byte(model, cfg.seq_len, final["mean_patch_length"])
      )
    else:
      infer = flops.inference_flops_per_byte(per_byte)
    result = dict(
        bytes_seen=bytes_seen,
        train_flops_per_byte=per_byte,
        train_flops=per_byte * bytes_seen,
        train_mean_patch_length=train_length,
        heldout=final,
        inference_flops_per_byte=infer,
        curve=[dict(p, flops=p["step"] * per_byte * self.bytes_per_step(v, bpe_stats)) for p in curve.points],
        wall_s=summary["wall_s"],
        config=_config_json(cfg),
        overflow_rows_logged=sum(m.get("overflow_rows", 0.0) for _, m in summary["history"]),
    )
    if v.mode == "entropy":
      patcher = flops.inference_flops_per_byte(
          flops.entropy_model_train_flops_per_byte(summary["trainer"].sc.entropy_model, cfg.seq_len)
      )
      result.update(
          threshold=patching[v.name]["threshold"],
          patcher_inference_flops_per_byte=patcher,
          patcher_flops_during_training=patcher * bytes_seen,
      )
    return result

  def _run_bpe(self, key: RunKey, n: int, bpe_stats: dict) -> dict:
    v = key.variant
    model, seq = self.bpe_setup(bpe_stats)
    curve = self._curve(key)
    curve.points = []  # the loop restarts its run, so its curve restarts too
    eval_steps = sorted({min(n, int(math.ceil(n / self.s.evals)) * k) for k in range(1, self.s.evals + 1)} | {n})

    def score(params, step):
      curve.add(step, self._lm_heldout(model, params, self.bpe_heldout, self.heldout_bytes, seq))

    run = bpe.TokenRun(seq, self.scale.batch_size, n, key.seed, self.s.data_seed + key.seed, eval_steps)
    summary = bpe.train_token_lm(model, variants.optimizer_config(self.scale, n), run, self.bpe_train, score, log=_say)
    bpe.save_export(self._export_dir(key), model, summary.pop("params"))
    per_byte = self.train_flops_per_byte(v, {}, bpe_stats)
    per_step_bytes = self.bytes_per_step(v, bpe_stats)
    infer = flops.inference_flops_per_byte(
        flops.token_model_train_flops_per_byte(model, seq, bpe_stats["heldout_bytes_per_token"])
    )
    return dict(
        bytes_seen=n * per_step_bytes,
        train_flops_per_byte=per_byte,
        train_flops=per_byte * n * per_step_bytes,
        heldout=curve.points[-1],
        inference_flops_per_byte=infer,
        seq_len_tokens=seq,
        curve=[dict(p, flops=p["step"] * per_byte * per_step_bytes) for p in curve.points],
        wall_s=summary["wall_s"],
        config=dict(
            model=model.to_dict(),
            seq_len_tokens=seq,
            batch_size=self.scale.batch_size,
            seed=run.seed,
            data_seed=run.data_seed,
            optimizer=variants.optimizer_config(self.scale, n).to_dict(),
        ),
    )

  # -------------------------------------------------------------------------------------------------------------
  # Noised held-out text, scored by every finished run.

  def noised_texts(self, n: noise.Noise) -> List[str]:
    """The held-out texts under noise `n` (the same for every model: seeded by data_seed and the document)."""
    if n.name not in self._noised:
      self._noised[n.name] = noise.apply(n, self.heldout_texts, seed=self.s.data_seed)
    return self._noised[n.name]

  def _export_dir(self, key: RunKey) -> str:
    return self.path("runs", key.id, "export")

  def _noise_path(self, key: RunKey, name: str) -> str:
    return self.path("runs", key.id, "noise", f"{name}.json")

  def _noise_todo(self, key: RunKey) -> List[str]:
    """Texts still to score: the noise types asked for, and the clean text again from the export (the same code
    path as the noised ones; it must agree with the score taken during training)."""
    names = ["clean"] + [n.name for n in self.noises] if self.noises else []
    return [name for name in names if io.read_json(self._noise_path(key, name)) is None]

  def _needs_bpe_params(self, key: RunKey) -> bool:
    return (
        key.variant.kind == "bpe"
        and bool(self._noise_todo(key))
        and not os.path.isfile(os.path.join(self._export_dir(key), "config.json"))
    )

  def _export_scorer(self, key: RunKey, result: dict) -> Callable[[List[str]], dict]:
    """Scores texts with the run's final model, read back from its export."""
    kind = key.variant.kind
    if kind == "blt":
      return heldout.HeldOutBLT.from_export(
          self.path("runs", key.id), self.heldout_texts, self.scale.seq_len, self.s.score_rows
      ).score
    config, params = heldout.load_lm_export(self._export_dir(key))
    if kind == "bpe":
      return lambda texts: bpe.heldout_scores(
          self.bpe_tok, config, params, texts, result["seq_len_tokens"], self.s.score_rows
      )
    return lambda texts: heldout.lm_scores(
        params, config, heldout.byte_docs(texts), heldout.utf8_bytes(texts), self.scale.seq_len, self.s.score_rows
    )

  def score_noise(self, key: RunKey, result: dict) -> None:
    """runs/<id>/noise/<type>.json: the final model's bits per byte of each noised text (its own bytes)."""
    todo = self._noise_todo(key)
    if not todo:
      return
    t0 = time.perf_counter()
    scorer = self._export_scorer(key, result)
    for name in todo:
      n = None if name == "clean" else noise.noise(name)
      scores = scorer(self.heldout_texts if n is None else self.noised_texts(n))
      scores.update(
          noise=name,
          rate=0.0 if n is None else n.rate,
          seed=self.s.data_seed,
          bits_per_clean_byte=heldout.bits_per_byte(scores["nll_nats"], self.heldout_bytes),
      )
      io.write_json(self._noise_path(key, name), scores)
    _say(
        f"noise {key.id}: "
        + ", ".join(f"{name} {io.read_json(self._noise_path(key, name))['bpb']:.4f}" for name in todo)
        + f" bpb ({time.perf_counter() - t0:.0f} s)"
    )

  def noise_info(self) -> Dict[str, dict]:
    """Each noise type's rate, seed, and its noised held-out text's size, sha256 and compressor floors."""
    out = {}
    for n in noise.NOISES:
      blob = "".join(self.noised_texts(n)).encode("utf-8")
      out[n.name] = dict(
          label=n.label,
          rate=n.rate,
          seed=self.s.data_seed,
          bytes=len(blob),
          sha256=hashlib.sha256(blob).hexdigest(),
          compressors=report.compressors(blob),
      )
    return out

  def collect_runs(self) -> List[dict]:
    """Every finished run under runs/ (any seed, any budget), with its noise scores; round one's results, which
    name neither seed nor budget, are seed 0 at the plan's budget."""
    runs, order = [], {v.name: i for i, v in enumerate(variants.VARIANTS)}
    root = self.path("runs")
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      result = io.read_json(os.path.join(root, entry, "result.json"))
      if result is None or result.get("name") not in order:
        continue  # the entropy model, or a run not finished
      result = dict(result, run_id=entry)
      result.setdefault("seed", 0)
      result.setdefault("budget_scale", 1.0)
      key = RunKey(variants.variant(result["name"]), result["seed"], result["budget_scale"])
      scores = {name: io.read_json(self._noise_path(key, name)) for name in ["clean"] + [n.name for n in noise.NOISES]}
      result["noise"] = {name: s for name, s in scores.items() if s is not None}
      runs.append(result)
    return sorted(runs, key=lambda r: (r["budget_scale"], order[r["name"]], r["seed"]))

  # -------------------------------------------------------------------------------------------------------------

  def run(self) -> dict:
    manifest = self.prepare_data()
    bpe_stats = self.prepare_bpe()
    entropy = self.train_entropy_model()
    patching = self.choose_patching()
    calibration = self.calibrate(patching, bpe_stats)
    plan = self.make_plan(patching, bpe_stats, calibration)
    for key in self.run_keys():
      self.score_noise(key, self.run_variant(key, plan, patching, bpe_stats))
    runs = self.collect_runs()
    heldout_blob = "".join(self.heldout_texts).encode("utf-8")
    study = dict(
        settings=dataclasses.asdict(self.s),
        scale=dataclasses.asdict(self.scale),
        data=manifest,
        bpe=bpe_stats,
        entropy_model=entropy,
        patching=patching,
        calibration=calibration,
        plan=plan,
        runs=runs,
        compressors=report.compressors(heldout_blob),
        noise=self.noise_info() if any(r["noise"] for r in runs) else {},
        wall_s_this_session=time.time() - self.t0,
        jax_version=jax.__version__,
        devices=[str(d) for d in jax.devices()],
    )
    report.write(self.s.out, study)
    _say(f"done: {self.path('study.md')}")
    return study


class _Curve:
  """Held-out points of one run, saved after each (a resumed run keeps the points before its checkpoint)."""

  def __init__(self, path: str):
    self.path = path
    self.points = [p for p in io.read_json(path) or []]

  def add(self, step: int, scores: dict) -> dict:
    self.points = [p for p in self.points if p["step"] < step] + [dict(scores, step=step)]
    io.write_json(self.path, self.points)
    return dict(val_bpb=scores["bpb"])


def _patching_config(v: Variant, threshold: Optional[float]) -> PatchingConfig:
  if v.mode == "entropy":
    return PatchingConfig(mode="entropy", threshold=float(threshold), max_patch_length=variants.MAX_ENTROPY_PATCH)
  return PatchingConfig(mode=v.mode, patch_size=v.patch_size)


@functools.lru_cache(maxsize=None)
def _patcher(pc: PatchingConfig, seq_len: int):
  sc = steps.StepConfig(model=None, patching=pc, max_patches=seq_len + 1)
  return jax.jit(lambda batch: steps.make_patches(sc, batch, None).num_patches_B)


def _patch_stats(pc: PatchingConfig, batches: List[dict], seq_len: int):
  """(mean patch length as the trainer counts it, most patches in one row) over `batches`."""
  counts = np.concatenate(
      [np.asarray(_patcher(pc, seq_len)({k: b[k] for k in ("tokens", "entropies")})) for b in batches]
  )
  return counts.size * (seq_len + 1) / counts.sum(), int(counts.max())


def _threshold_for(v: Variant, batches: List[dict], entropy_cfg, seq_len: int) -> float:
  """The global entropy threshold whose patches average `v.target_patch_length` bytes on `batches`.

  A patch starts roughly where the entropy exceeds the threshold, so the (1 - 1/L) quantile is the first guess;
  a few corrections by the measured length (the real patcher, with max_patch_length and document starts) follow.
  """
  del entropy_cfg
  ent = np.concatenate([b["entropies"].reshape(-1) for b in batches])
  target, fraction = v.target_patch_length, 1.0 / v.target_patch_length
  threshold = float(np.quantile(ent, 1 - fraction))
  for _ in range(8):
    length, _ = _patch_stats(_patching_config(v, threshold), batches, seq_len)
    if abs(length - target) / target < 0.02:
      break
    fraction = float(np.clip(fraction * length / target, 1e-4, 1.0))
    threshold = float(np.quantile(ent, 1 - fraction))
  return threshold
