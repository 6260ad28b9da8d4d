"""Benchmarks, reported as ratios measured in one run (shared machines are noisy; absolute numbers drift).

  python scripts/benchmark.py --preset cpu      # small shapes, a couple of minutes on 2 cores
  python scripts/benchmark.py --preset gpu      # 1B-class shapes on one H100/H200
  python scripts/benchmark.py --preset gpu1b --sections loop   # the full-depth 1B train loop, donated vs not

Sections:
  attention   fast paths vs dense masked attention (encoder/decoder cross-attention, windowed self-attention)
  patching    BLT train step with in-graph entropy patching vs precomputed entropies (the entropy model's cost)
  train       BLT train-step throughput (bytes/s, patches/s) and MFU with the one FLOP model of blt_jax.flops
  calibration the entropy threshold and max_patches `blt_jax.calibrate` fits for 3, 4.5 and 6 bytes per patch on 4
              and 14 KiB rows of the default corpus, and what they give on its validation split (--entropy-checkpoint)
  rows        rows of seq_len bytes vs rows cut to a patch budget on the default corpus with stored entropies: bytes
              and slots filled, FLOPs per byte learnt (--entropy-store, --threshold, --budgets blt_1b=2816:3072,...)
  scoring     the scoring CLI on ~1 MB of stdlib sources: packed rows vs one document per row (--sections scoring)
  generation  cached generation vs full recompute per byte, and per-byte cost against prompt length
  compile     train-step compile time, 4 vs 25 global layers: loop, scan over a per-layer state, scan (stacked)
  loop        train loop with the state donated vs not, per batch size until one does not fit (--preset gpu1b: the
              issue-13 GPU target, the full-depth 1B in bf16)
  --compare transformers   side by side with transformers' BltForCausalLM (the issue-13 config; torch on CPU)
Prints a markdown table; paste it into BENCHMARKS.md with the device line.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from blt_jax import attention, flops, layer_stacking, masks, patching, steps  # noqa: E402
from blt_jax.config import BLTConfig, EntropyModelConfig, PatchingConfig  # noqa: E402

# The 1B-shaped train step of issue 13's GPU target: the released 1B's widths and depths (25 global layers, 9
# decoder layers), bf16, the global stack scanned (compile time flat in depth), 50002-row hash tables (the 500002-row
# ones change no FLOPs). `--sections loop --preset gpu1b` on an H100/H200.
GPU_1B = BLTConfig(encoder_hash_byte_group_vocab=50002, dtype="bfloat16", scan_layers=True)

PRESETS = {
    "cpu": dict(
        attn=dict(B=1, N=2048, P=512, k=2, H=4, D=32, W=128),
        blt=BLTConfig(
            dim_local_encoder=128,
            n_layers_local_encoder=1,
            n_heads_local_encoder=4,
            dim_global=256,
            n_layers_global=4,
            n_heads_global=4,
            dim_local_decoder=128,
            n_layers_local_decoder=2,
            n_heads_local_decoder=4,
            cross_attn_k=2,
            cross_attn_nheads=4,
            encoder_hash_byte_group_vocab=4096,
            local_attention_window_len=128,
            max_seqlen=1024,
            max_encoder_seq_length=1024,
        ),
        entropy=EntropyModelConfig(dim=128, n_layers=2, n_heads=4, sliding_window=128, max_seqlen=1024),
        batch=4,
        seq_len=1024,
        max_patches=342,
        steps=5,
    ),
    "gpu": dict(
        attn=dict(B=2, N=8192, P=2048, k=2, H=16, D=64, W=512),
        # The released 1B shapes with 50002-row hash tables (the 500002-row tables plus AdamW state exceed one
        # 80 GB card in fp32; they change no FLOPs).
        # Global and decoder depths cut to 8 and 3 layers to keep XLA's compile inside the device time we have.
        blt=BLTConfig(
            encoder_hash_byte_group_vocab=50002,
            n_layers_global=8,
            n_layers_local_decoder=3,
            dtype="bfloat16",
            remat=False,
        ),
        entropy=EntropyModelConfig(dtype="bfloat16"),
        batch=4,
        seq_len=8192,
        max_patches=2730,
        steps=10,
    ),
    "gpu1b": dict(
        attn=dict(B=2, N=8192, P=2048, k=2, H=16, D=64, W=512),
        blt=GPU_1B,
        entropy=EntropyModelConfig(dtype="bfloat16"),
        # `loop`: batches tried in order until one does not fit (two compiles each: donated and not).
        batch=4,
        seq_len=8192,
        max_patches=2730,
        steps=10,
        loop_batches=(4, 8, 16),
        loop_remat=(False,),
    ),
}
PRESETS["cpu"].update(loop_batches=(2, 4), loop_remat=(False,))


def timeit(fn, *args, repeats=5):
  """Median seconds of `fn(*args)` (blocked on) after one compile+warmup call; inf when it does not fit in memory."""
  try:
    return _median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)
  except jax.errors.JaxRuntimeError as e:
    if not _out_of_memory(e):
      raise
    return float("inf")


def bench_attention(p):
  B, N, P, k, H, D, W = (p[x] for x in ("B", "N", "P", "k", "H", "D", "W"))
  key = jax.random.PRNGKey(0)
  rng = np.random.default_rng(0)
  starts = jnp.asarray(rng.random((B, N + 1)) < (P / N) * 0.9).at[:, :2].set(True)
  lengths = patching.starts_to_patches(starts, P).patch_lengths_BP
  ids = patching.patch_ids_from_lengths(lengths, N)
  dec_ids = patching.decoder_patch_ids(lengths, N)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  q_slots = jax.random.normal(key, (B, P * k, H, D), dtype)
  bytes_kv = jax.random.normal(key, (B, N, H, D), dtype)
  rows = []
  fast = jax.jit(lambda q, kv, i: attention.encoder_cross_attention(q, kv, kv, i, P, k))
  dense = jax.jit(lambda q, kv, i: attention.masked_attention(q, kv, kv, masks.dense_encoder_cross_mask(i, P, k)))
  rows.append(
      (
          "encoder cross-attention (segment softmax vs dense)",
          timeit(fast, q_slots, bytes_kv, ids),
          timeit(dense, q_slots, bytes_kv, ids),
      )
  )
  fast = jax.jit(lambda q, kv, i: attention.decoder_cross_attention(q, kv, kv, i, k))
  dense = jax.jit(lambda q, kv, i: attention.masked_attention(q, kv, kv, masks.dense_decoder_cross_mask(i, P, k)))
  rows.append(
      (
          "decoder cross-attention (gather vs dense)",
          timeit(fast, bytes_kv, q_slots, dec_ids),
          timeit(dense, bytes_kv, q_slots, dec_ids),
      )
  )
  doc = masks.document_ids(jnp.zeros((B, N), jnp.int32))
  fast = jax.jit(lambda x, d: attention.self_attention(x, x, x, d, W))
  dense = jax.jit(lambda x, d: attention.masked_attention(x, x, x, masks.dense_self_attention_mask(d, N, W)))
  rows.append(
      (f"window-{W} self-attention (blocked vs dense)", timeit(fast, bytes_kv, doc), timeit(dense, bytes_kv, doc))
  )
  fast = jax.jit(lambda x, d: attention.self_attention(x, x, x, d, None))
  dense = jax.jit(lambda x, d: attention.masked_attention(x, x, x, masks.dense_self_attention_mask(d, N, None)))
  rows.append(
      ("causal self-attention, documents (blocked vs dense)", timeit(fast, bytes_kv, doc), timeit(dense, bytes_kv, doc))
  )
  # Its own q @ k matmuls: the [S, S] scores of every head, no mask, no softmax (the roofline of the kernel).
  qk = jax.jit(lambda x: jnp.einsum("bqhd,bkhd->bhqk", x, x))
  qk_s = timeit(qk, bytes_kv)
  grad = lambda fn: jax.jit(jax.grad(lambda x, d: jnp.sum(fn(x, d).astype(jnp.float32))))
  rows.append(
      (
          "causal self-attention, forward + backward (blocked vs dense)",
          timeit(grad(lambda x, d: attention.self_attention(x, x, x, d, None)), bytes_kv, doc),
          timeit(
              grad(lambda x, d: attention.masked_attention(x, x, x, masks.dense_self_attention_mask(d, N, None))),
              bytes_kv,
              doc,
          ),
      )
  )
  out = [dict(name=n, fast_s=f, dense_s=d, speedup=d / f) for n, f, d in rows]
  for r in out[2:4]:  # the self-attention forwards
    r.update(qk_matmul_s=qk_s, over_qk=r["fast_s"] / qk_s)
  return out


def _random_params(abstract):
  """Random weights leaf by leaf (one tiny compile per shape; a whole-model init jit compiles for minutes on GPU)."""
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  fill = jax.jit(lambda key, x: 0.02 * jax.random.normal(key, x.shape, x.dtype))
  out = []
  for i, leaf in enumerate(leaves):
    if leaf.ndim == 1:  # norm scales
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append(fill(jax.random.PRNGKey(i), jnp.zeros(leaf.shape, leaf.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _text_batch(B, N, seed=0):
  """Bytes of this repository's Python sources (real text), as [BOS] bytes rows."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  blob = b"".join(
      open(os.path.join(d, f), "rb").read()
      for d, _, fs in os.walk(os.path.join(root, "blt_jax"))
      for f in sorted(fs)
      if f.endswith(".py")
  )
  stream = np.frombuffer(blob * (1 + B * (N + 1) // len(blob)), np.uint8).astype(np.int32) + 4
  rows = stream[: B * (N + 1)].reshape(B, N + 1)
  rows[:, 0] = 1
  return dict(tokens=rows[:, :-1], targets=rows[:, 1:], loss_mask=np.ones((B, N), np.float32))


def bench_train(preset):
  blt_cfg, ent_cfg = preset["blt"], preset["entropy"]
  B, N = preset["batch"], preset["seq_len"]
  ent_params = _random_params(
      jax.eval_shape(
          lambda: nn.meta.unbox(
              steps.EntropyModel(ent_cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
          )
      )
  )
  tx = optax.adamw(1e-4)
  schedule = lambda s: 1e-4
  batch = {k: jnp.asarray(v)[None] for k, v in _text_batch(B, N).items()}
  # Threshold picked so the random entropy model gives ~4.5 bytes/patch on this text.
  ent = steps.compute_entropies(ent_params, batch["tokens"][0], ent_cfg)
  threshold = float(jnp.quantile(ent[:, 1:], 1 - 1 / 4.5))
  pc = PatchingConfig(mode="entropy", threshold=threshold)
  # P_max = N/3: room for 1.5x the mean patch count; the global model's cost scales with P_max, not real patches.
  sc = steps.StepConfig(blt_cfg, pc, preset["max_patches"], ent_cfg)
  params = _random_params(jax.eval_shape(lambda: nn.meta.unbox(steps.init_blt(jax.random.PRNGKey(0), blt_cfg))))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  # Not donated: with donation this loop measured 5x slower on H100 (under investigation, see BENCHMARKS.md).
  step = jax.jit(steps.make_train_step(sc, tx, schedule))
  with_entropies = dict(batch, entropies=jnp.asarray(ent)[None])

  def run(state, b, n):
    """Median seconds per step, each step blocked on."""
    times = []
    for _ in range(n):
      t = time.perf_counter()
      state, m = step(state, b, ent_params)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t)
    return state, m, float(np.median(times))

  state, m, _ = run(state, batch, 1)
  state, m, t_graph = run(state, batch, preset["steps"])
  state, m2, _ = run(state, with_entropies, 1)
  state, m2, t_pre = run(state, with_entropies, preset["steps"])
  mean_patch = B * (N + 1) / float(m["num_patches"])
  fpb = flops.blt_train_flops_per_byte(blt_cfg, N, mean_patch)
  peak = flops.device_peak_flops(jax.devices()[0])
  # The in-graph step also runs the entropy model forward: count it for MFU of that step.
  ent_fpb = flops.entropy_model_train_flops_per_byte(ent_cfg, N) / 3
  return dict(
      params=int(n_params),
      batch=B,
      seq_len=N,
      mean_patch_length=mean_patch,
      overflow_rows=float(m["overflow_rows"]),
      step_s_in_graph=t_graph,
      step_s_precomputed=t_pre,
      precomputed_speedup=t_graph / t_pre,
      bytes_per_s_precomputed=B * N / t_pre,
      patches_per_s_precomputed=B * (N + 1) / mean_patch / t_pre,
      bytes_per_s_in_graph=B * N / t_graph,
      mfu_precomputed=flops.mfu(fpb, B * N / t_pre, peak),
      mfu_in_graph=flops.mfu(fpb + ent_fpb, B * N / t_graph, peak),
      loss=float(m["loss"]),
  )


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def bench_loop(preset):
  """The trainer's loop shape: steps dispatched back to back (blocked on once at the end), with the train state
  donated (updated in place, as `blt_jax.train` runs it) and without; per batch size in `loop_batches` until one
  does not fit, with and without remat. Static 4-byte patches (the BLT alone, no entropy model), so the FLOPs are
  the model's; MFU against the trainer's peak (`flops.peak_flops`: the vendor's, or on CPU a measured matmul rate)."""
  base_cfg = preset["blt"]
  N, n_steps = preset["seq_len"], preset["steps"]
  tx = optax.adamw(1e-4)
  peak, peak_source = flops.peak_flops(jax.devices()[:1])  # the trainer's MFU peak (CPU: a measured matmul rate)
  results = []
  for remat in preset["loop_remat"]:
    cfg = dataclasses.replace(base_cfg, remat=remat)
    sc = steps.StepConfig(cfg, PatchingConfig(mode="static", patch_size=4), preset["max_patches"], None)
    abstract = jax.eval_shape(
        lambda: layer_stacking.to_run_layout(nn.meta.unbox(steps.init_blt(jax.random.PRNGKey(0), cfg)), cfg)
    )
    fpb = flops.blt_train_flops_per_byte(cfg, N, 4.0)
    train_step = steps.make_train_step(sc, tx, lambda s: 1e-4)
    for B in preset["loop_batches"]:
      batch = {k: jnp.asarray(v)[None] for k, v in _text_batch(B, N).items()}
      row = dict(remat=remat, batch=B, seq_len=N)
      compiled_by, runs = {}, {True: [], False: []}
      try:
        # Donated, not donated, donated again: a slow spell of the machine shows as two donated times that differ,
        # not as a donation cost. One train state alive at a time, so the batch that fits is the trainer's.
        for donate in (True, False, True):
          params = _random_params(abstract)
          state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params))
          if donate not in compiled_by:
            step = jax.jit(train_step, donate_argnums=(0,) if donate else ())
            t0 = time.perf_counter()
            compiled_by[donate] = (step.lower(state, batch, None).compile(), time.perf_counter() - t0)
          compiled, compile_s = compiled_by[donate]
          state, m = compiled(state, batch, None)  # warm-up
          jax.block_until_ready((state, m))
          t0 = time.perf_counter()
          for _ in range(n_steps):
            state, m = compiled(state, batch, None)
          jax.block_until_ready((state, m))
          runs[donate].append((time.perf_counter() - t0) / n_steps)
          step_s = float(np.mean(runs[donate]))
          memory = compiled.memory_analysis()
          size = lambda name, memory=memory: int(getattr(memory, name, 0) or 0)
          stats = jax.devices()[0].memory_stats() or {}  # None on CPU; the allocator's high-water mark on GPU/TPU
          row["donated" if donate else "not_donated"] = dict(
              step_s=step_s,
              runs_s=list(runs[donate]),
              bytes_per_s=B * N / step_s,
              mfu=flops.mfu(fpb, B * N / step_s, peak),
              compile_s=compile_s,
              loss=float(m["loss"]),
              temp_bytes=size("temp_size_in_bytes"),
              # The compiled step's own peak: inputs + outputs + temporaries, less outputs aliased onto donated inputs.
              program_bytes=size("argument_size_in_bytes")
              + size("output_size_in_bytes")
              + size("temp_size_in_bytes")
              - size("alias_size_in_bytes"),
              device_peak_bytes=stats.get("peak_bytes_in_use"),
          )
          del state, m
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e):
          raise
        results.append(dict(row, fits=False, error=str(e).splitlines()[0][:200]))  # keeps a donated run that fit
        break
      row["donated_over_not"] = row["donated"]["step_s"] / row["not_donated"]["step_s"]
      row["peak"] = peak_source
      results.append(row)
  return results


def _stdlib_corpus(path, target_bytes):
  """A jsonl corpus of real text: the running Python's standard-library sources, one paragraph per document."""
  import sysconfig  # pylint: disable=g-import-not-at-top

  root = sysconfig.get_paths()["stdlib"]
  files = sorted(
      os.path.join(d, f) for d, _, fs in os.walk(root) if "site-packages" not in d for f in fs if f.endswith(".py")
  )
  total = 0
  with open(path, "w") as out:
    for name in files:
      with open(name, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      # Paragraphs (blank-line separated) as documents: many short ones, as a filtering corpus has.
      for i, para in enumerate(p for p in text.split("\n\n") if p.strip()):
        out.write(json.dumps({"text": para, "id": f"{os.path.relpath(name, root)}#{i}"}) + "\n")
        total += len(para.encode())
      if total >= target_bytes:
        break
  return total


def _validation_rows(seq_len):
  """Every row of the default corpus's validation split, packed as the trainer's evaluation packs them."""
  from blt_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  cfg = data_lib.default_data_config()
  cfg.prefetch = 0
  it = data_lib.make_eval_iterator(cfg, seq_len, 16, 0, 1)
  return np.concatenate([b["tokens"][:n] for b, n in zip(it, it.num_real_rows) if n])


def bench_calibration(entropy_checkpoint):
  """`blt_jax.calibrate` on the default corpus at 3, 4.5 and 6 bytes per patch, 4 KiB and 14 KiB rows, with and
  without max_patch_length 16: the threshold, the slots it asks for, the padding those leave next to seq_len + 1,
  and the bytes per patch the threshold gives on the validation split, which the calibration did not see."""
  from blt_jax import calibrate, data as data_lib, train, train_config  # pylint: disable=g-import-not-at-top

  entropy_config, params = train.load_entropy_model(entropy_checkpoint, run=train_config.base_config())
  out = []
  for seq_len, num_rows in ((4096, 512), (14336, 256)):
    t = time.perf_counter()
    rows = calibrate.sample_rows(data_lib.default_data_config(), seq_len, num_rows, seed=0)
    rows["entropies"] = calibrate.row_entropies(rows["tokens"], params, entropy_config)
    held_out = _validation_rows(seq_len)
    held_out_entropies = calibrate.row_entropies(held_out, params, entropy_config)
    entropy_s = time.perf_counter() - t
    for max_patch_length in (None, 16):
      patching_cfg = PatchingConfig(mode="entropy", max_patch_length=max_patch_length)
      for target in (3.0, 4.5, 6.0):
        c = calibrate.calibrate(rows, patching_cfg, target, overflow=1e-3, multiple_of=128)
        counts = calibrate.patches_per_row(held_out, held_out_entropies, patching_cfg, c.threshold)
        out.append(
            dict(
                c.to_json(),
                max_patch_length=max_patch_length,
                entropy_s=entropy_s,
                held_out_rows=len(counts),
                held_out_bytes_per_patch=calibrate.bytes_per_patch(counts, seq_len),
                held_out_overflow_rows=float(np.mean(counts > c.max_patches)),
            )
        )
  return out


def bench_rows(entropy_store, threshold, configs, num_rows, budgets):
  """Rows of seq_len bytes against rows cut to a patch budget, on the default corpus's training stream with stored
  entropies (the trainer's own loaders, `make_train_iterator`): the bytes and patches rows hold, and the training
  FLOPs each configuration runs per byte learnt (flops.py over every position and slot the step runs) against
  flops.py's model FLOPs per byte at the stream's mean patch length and at 4.5 bytes per patch."""
  from blt_jax import calibrate, data as data_lib, flops, train_config  # pylint: disable=g-import-not-at-top
  from blt_jax.data import patch_rows  # pylint: disable=g-import-not-at-top

  data_cfg = data_lib.default_data_config()
  data_cfg.entropy_store = entropy_store
  data_cfg.prefetch = 0
  patching_cfg = PatchingConfig(mode="entropy", threshold=float(threshold))
  out = []
  for name in configs:
    cfg = train_config.load_config_file(f"configs/{name}.py")
    model, seq_len = train_config.model_config(cfg), cfg.seq_len
    row_cost = lambda slots: flops.blt_train_flops_per_byte(model, seq_len, seq_len / slots) * seq_len
    t = time.perf_counter()
    it = data_lib.make_train_iterator(data_cfg, seq_len, 64, 0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(num_rows // 64)]
    it.close()
    tokens = np.concatenate([b["tokens"] for b in batches])
    entropies = np.concatenate([b["entropies"] for b in batches])
    counts = calibrate.patches_per_row(tokens, entropies, patching_cfg, threshold)
    mean_patch = calibrate.bytes_per_patch(counts, seq_len)
    model_cost = flops.blt_train_flops_per_byte(model, seq_len, mean_patch)
    model_cost_45 = flops.blt_train_flops_per_byte(model, seq_len, 4.5)
    common = dict(config=name, seq_len=seq_len, rows=len(counts), stream_bytes_per_patch=mean_patch)
    for slots in (
        cfg.patching.max_patches if cfg.patching.rows == "bytes" else 4096,
        calibrate.slots_for(counts, 1e-3, 128),
    ):
      out.append(
          dict(
              common,
              rows_of="bytes",
              max_patches=slots,
              row_fill=1.0,
              slot_fill=float(np.mean(np.minimum(counts, slots))) / slots,
              overflow_rows=float(np.mean(counts > slots)),
              cost_vs_model=row_cost(slots) / seq_len / model_cost,
              cost_vs_model_at_4_5=row_cost(slots) / seq_len / model_cost_45,
          )
      )
    for slots in budgets.get(name, ()):
      patcher = patch_rows.RowPatcher(patching_cfg.patch_kwargs(), slots, seq_len)
      it = data_lib.make_train_iterator(data_cfg, seq_len, 64, 0, process_index=0, process_count=1, row_patcher=patcher)
      rows = [next(it) for _ in range(num_rows // 64)]
      it.close()
      bytes_R = np.concatenate([r["loss_mask"].sum(-1) for r in rows])
      patches_R = np.concatenate([1 + r[patch_rows.STARTS].sum(-1) for r in rows])
      cost = row_cost(slots) / float(np.mean(bytes_R))
      out.append(
          dict(
              common,
              rows_of="patches",
              max_patches=slots,
              row_fill=float(np.mean(bytes_R)) / seq_len,
              slot_fill=float(np.mean(patches_R)) / slots,
              overflow_rows=0.0,
              cost_vs_model=cost / model_cost,
              cost_vs_model_at_4_5=cost / model_cost_45,
          )
      )
    out[-1]["seconds"] = time.perf_counter() - t
  return out


def bench_scoring(preset, workdir, corpus_bytes):
  """`python -m blt_jax.score` on a ~1 MB stdlib corpus: packed rows vs one document per row, and packed rows with
  the params and matmuls in bfloat16 (`--dtype bfloat16`), same run."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from blt_jax import checkpoint, entropy_model  # pylint: disable=g-import-not-at-top
  from blt_jax.model import init_blt  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  corpus = os.path.join(workdir, "corpus.jsonl")
  n_bytes = _stdlib_corpus(corpus, corpus_bytes)
  tiny = dict(
      dim_local_encoder=64,
      n_layers_local_encoder=1,
      n_heads_local_encoder=4,
      dim_global=128,
      n_layers_global=2,
      n_heads_global=4,
      dim_local_decoder=64,
      n_layers_local_decoder=2,
      n_heads_local_decoder=4,
      cross_attn_k=2,
      cross_attn_nheads=4,
      encoder_hash_byte_group_size=(3, 4, 5, 6),
      encoder_hash_byte_group_vocab=8192,
      max_seqlen=512,
      max_encoder_seq_length=512,
      local_attention_window_len=128,
  )
  models = {
      "tiny (configs/tiny.py shapes, space patching)": (BLTConfig(**tiny), PatchingConfig(mode="space"), None),
      "mid (cpu preset, entropy patching)": (preset["blt"], None, preset["entropy"]),
  }
  results = []
  for name, (cfg, patch_cfg, ent_cfg) in models.items():
    path = os.path.join(workdir, name.split()[0])
    if not os.path.exists(path):
      params = nn.meta.unbox(init_blt(jax.random.PRNGKey(0), cfg))
      if ent_cfg is not None:
        ent_params = nn.meta.unbox(entropy_model.init_entropy_model(jax.random.PRNGKey(1), ent_cfg))
        sample = jnp.asarray(np.frombuffer(open(corpus, "rb").read(4096), np.uint8)[None].astype(np.int32) + 4)
        ent = np.asarray(entropy_model.compute_entropies(ent_params, sample, ent_cfg))
        # Random weights: a threshold at the 75th percentile gives ~4 bytes per patch, like the trained 1B.
        patch_cfg = PatchingConfig(mode="entropy", threshold=float(np.quantile(ent, 0.75)))
      checkpoint.save_params(
          path,
          params,
          {"format": "blt_jax", "model_type": "blt", "model": cfg.to_dict(), "patching": patch_cfg.to_dict()},
      )
      if ent_cfg is not None:
        checkpoint.save_params(
            os.path.join(path, "entropy_model"),
            ent_params,
            {"format": "blt_jax", "model_type": "entropy_model", "model": ent_cfg.to_dict()},
        )
    row = dict(model=name, corpus_bytes=n_bytes)
    for mode, extra in (
        ("packed", []),
        ("one document per row", ["--no-pack"]),
        ("packed, bfloat16", ["--dtype", "bfloat16"]),
    ):
      out = os.path.join(workdir, f"{name.split()[0]}-{mode.split()[0]}.jsonl")
      t0 = time.perf_counter()
      subprocess.run(
          [
              sys.executable,
              "-m",
              "blt_jax.score",
              "--checkpoint",
              path,
              "--input",
              corpus,
              "--output",
              out,
              "--overwrite",
              *extra,
          ],
          check=True,
          capture_output=True,
      )
      seconds = time.perf_counter() - t0
      with open(out + ".summary.json") as f:
        summary = json.load(f)
      row[mode] = dict(
          seconds=seconds,
          bytes_per_s=summary["bytes"] / seconds,
          programs=summary["compiled_programs"],
          bpb=summary["bpb"],
      )
    row["packing_speedup"] = row["packed"]["bytes_per_s"] / row["one document per row"]["bytes_per_s"]
    row["bfloat16_speedup"] = row["packed, bfloat16"]["bytes_per_s"] / row["packed"]["bytes_per_s"]
    row["bfloat16_bpb_change"] = row["packed, bfloat16"]["bpb"] / row["packed"]["bpb"] - 1
    results.append(row)
  return results


def bench_generation():
  """Cached generation vs the full recompute per byte (greedy, batch 1), and per-byte cost against prompt length."""
  from blt_jax import entropy_model, generate, loading  # pylint: disable=g-import-not-at-top
  from blt_jax.model import init_blt  # pylint: disable=g-import-not-at-top

  cfg = BLTConfig(
      dim_local_encoder=64,
      n_layers_local_encoder=1,
      n_heads_local_encoder=4,
      dim_global=128,
      n_layers_global=2,
      n_heads_global=4,
      dim_local_decoder=64,
      n_layers_local_decoder=2,
      n_heads_local_decoder=4,
      cross_attn_k=2,
      cross_attn_nheads=4,
      encoder_hash_byte_group_size=(3, 4, 5, 6),
      encoder_hash_byte_group_vocab=8192,
      max_seqlen=4096,
      max_encoder_seq_length=4096,
      local_attention_window_len=128,
  )
  ent_cfg = EntropyModelConfig(dim=64, n_layers=1, n_heads=4, sliding_window=128, max_seqlen=8192)
  params = nn.meta.unbox(init_blt(jax.random.PRNGKey(0), cfg))
  # Random weights: pin the EOS logit to 0 (others are in the hundreds) so every row runs to max_bytes.
  params["local_decoder"]["output"]["kernel"] = params["local_decoder"]["output"]["kernel"].at[:, 2].set(0.0)
  ent_params = nn.meta.unbox(entropy_model.init_entropy_model(jax.random.PRNGKey(1), ent_cfg))
  sample = jnp.asarray(
      np.frombuffer(b"The quick brown fox jumps over the lazy dog. " * 20, np.uint8)[None] + 4, jnp.int32
  )
  threshold = float(np.quantile(np.asarray(entropy_model.compute_entropies(ent_params, sample, ent_cfg)), 0.75))
  m = loading.LoadedModel(
      cfg, params, PatchingConfig(mode="entropy", threshold=threshold), ent_cfg, ent_params, "random"
  )
  text = b"def generate(model, prompts, max_bytes):\n    return [model(p) for p in prompts]\n" * 64
  results = dict(speed=[], prompt_scaling=[])

  def timed(fn):
    fn()  # compile (same shapes)
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out

  for gen in (256, 1024):
    prompt = text[:64]
    cached_s, cached = timed(lambda: generate.generate(m, [prompt], gen))
    uncached_s, uncached = timed(lambda: generate.generate_uncached(m, [prompt], gen))
    assert cached[0].continuation == uncached[0].continuation, "cached and full-recompute outputs differ"
    results["speed"].append(
        dict(
            prompt=64,
            generated=gen,
            cached_bytes_per_s=gen / cached_s,
            uncached_bytes_per_s=gen / uncached_s,
            speedup=uncached_s / cached_s,
        )
    )
  for plen in (64, 512, 2048):
    # Per generated byte: the decoding loop alone, timed between its chunks of 32 bytes (prefill and the first
    # chunk excluded), so a slow prefill cannot hide in the difference of two runs.
    stamps = []
    run = lambda: generate.generate(
        m, [text[:plen]], 288, chunk=32, on_bytes=lambda row, b: stamps.append((time.perf_counter(), len(b)))
    )
    run()  # compile
    stamps.clear()
    prefill_s, _ = timed(lambda: generate.generate(m, [text[:plen]], 1))
    stamps.clear()
    run()
    per_byte = (stamps[-1][0] - stamps[0][0]) / sum(n for _, n in stamps[1:])
    results["prompt_scaling"].append(
        dict(prompt=plen, generated=288, ms_per_byte=per_byte * 1e3, prefill_ms=prefill_s * 1e3)
    )
  return results


def matmul_rate(n=2048, dtype=jnp.float32, repeats=5):
  """This machine's achievable FLOP/s: a jitted `[n, n] @ [n, n]` (the roofline every kernel is judged against)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return 2 * n**3 / timeit(mm, a, a, repeats=repeats)


def _compile_seconds(jitted, *args):
  """(wall seconds, this process's CPU seconds, compiled) of lowering and compiling `jitted` for `args`.

  CPU seconds do not count time the process waited for the cores (other jobs on a shared machine)."""
  t, cpu = time.perf_counter(), time.process_time()
  compiled = jitted.lower(*args).compile()
  return time.perf_counter() - t, time.process_time() - cpu, compiled


def bench_compile(preset, depths=(4, 25), rounds=2):
  """Train-step compile time against global depth: blocks as a Python loop, as a `scan_layers` scan over params
  kept per-layer in the state (stacked inside every step: the layout before stacked train states), and as the
  trainer runs `scan_layers` (params and optimizer state stacked, `blt_jax.layer_stacking`)."""
  blt_cfg = preset["blt"]
  B, N = 2, 256
  tx = optax.adamw(1e-4)
  pc = PatchingConfig(mode="static", patch_size=4)
  batch = {k: jnp.asarray(v)[None] for k, v in _text_batch(B, N).items()}
  modes = (("loop", False, False), ("scan, per-layer state", True, False), ("scan", True, True))
  rows = {}
  for _ in range(rounds):  # interleaved rounds, the fastest kept: compile times on a shared machine are noisy
    for depth in depths:
      for blocks, scan, stacked in modes:
        cfg = dataclasses.replace(blt_cfg, n_layers_global=depth, scan_layers=scan)
        sc = steps.StepConfig(cfg, pc, N // 2, None)
        params = jax.eval_shape(lambda: nn.meta.unbox(steps.init_blt(jax.random.PRNGKey(0), cfg)))
        if stacked:  # the train state's layout (steps.make_init_fn)
          params = jax.eval_shape(lambda p: layer_stacking.stack_params(p, cfg), params)
        state = steps.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params)
        )
        seconds, cpu, compiled = _compile_seconds(
            jax.jit(steps.make_train_step(sc, tx, lambda s: 1e-4)), state, batch, None
        )
        grad_only = jax.jit(jax.grad(lambda p, b: steps.loss_terms(sc, p, jax.tree.map(lambda x: x[0], b))[0]))
        grad_seconds, _, _ = _compile_seconds(grad_only, params, batch)
        hlo_ops = sum(" = " in line for line in compiled.as_text().splitlines())
        best = rows.setdefault(
            (depth, blocks),
            dict(
                global_layers=depth,
                blocks=blocks,
                compile_s=seconds,
                compile_cpu_s=cpu,
                grad_compile_s=grad_seconds,
                hlo_ops=hlo_ops,
            ),
        )
        best.update(
            compile_s=min(best["compile_s"], seconds),
            compile_cpu_s=min(best["compile_cpu_s"], cpu),
            grad_compile_s=min(best["grad_compile_s"], grad_seconds),
        )
  return list(rows.values())


# The side-by-side config: entropy 2x128; encoder 1x256; global 4x512; decoder 2x256; hash 3..8 @ 50002;
# k 2; window 512; every FFN width stated on both sides.
COMPARE_HF = dict(
    vocab_size=260,
    max_position_embeddings=1024,
    local_attention_window_len=512,
    cross_attn_k=2,
    encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8],
    encoder_hash_byte_group_vocab=50002,
    encoder_hash_byte_group_nb_functions=1,
    patching_mode="entropy",
    patch_size=4,
    max_patch_length=None,
    patcher_config=dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        sliding_window=512,
        max_position_embeddings=8192,
    ),
    encoder_config=dict(
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        cross_attn_all_layers=False,
        cross_attn_k=2,
        hidden_size_global=512,
        intermediate_size=768,
        max_position_embeddings=2048,
    ),
    decoder_config=dict(
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=2,
        cross_attn_all_layers=True,
        cross_attn_k=2,
        hidden_size_global=512,
        intermediate_size=768,
        max_position_embeddings=2048,
    ),
    global_config=dict(
        hidden_size=512,
        num_attention_heads=8,
        num_hidden_layers=4,
        intermediate_size=1536,
        max_position_embeddings=1024,
    ),
)


def bench_compare_transformers(workdir, B=4, N=1024, bytes_per_patch=1.74, repeats=5):
  """blt_jax against transformers' BltForCausalLM: one random model in both, the same bytes and patch lengths."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from blt_jax import convert, loading  # pylint: disable=import-outside-toplevel
  from blt_jax.entropy_model import compute_entropies  # pylint: disable=import-outside-toplevel
  from blt_jax.model import BLT  # pylint: disable=import-outside-toplevel
  from blt_jax.score import Scorer  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  hf_model = transformers.BltForCausalLM(transformers.BltConfig(**COMPARE_HF)).eval()
  rng = np.random.default_rng(0)
  ids_BN = np.concatenate([np.ones((B, 1)), rng.integers(4, 260, size=(B, N - 1))], axis=1).astype(np.int64)
  ids_t = torch.as_tensor(ids_BN)

  def hf_patcher(threshold):
    with torch.no_grad():
      return hf_model.model.patcher(
          ids_t,
          patch_size=hf_model.config.patch_size,
          threshold=threshold,
          max_patch_length=None,
          patching_batch_size=1,
          device=None,
      )

  entropies, _, _ = hf_patcher(0.0)
  # The threshold that gives `bytes_per_patch` on these bytes (both sides patch with it).
  threshold = float(np.quantile(entropies.numpy()[:, 1:], 1 - 1 / bytes_per_patch))
  hf_model.config.patching_threshold = threshold
  _, lengths_t, _ = hf_patcher(threshold)
  lengths_BP = _lengths_with_next_token(lengths_t.numpy())
  root = os.path.join(workdir, "compare_transformers")
  hf_model.save_pretrained(os.path.join(root, "hf"))
  ckpt = os.path.join(root, "blt_jax")
  if os.path.exists(ckpt):
    import shutil  # pylint: disable=import-outside-toplevel

    shutil.rmtree(ckpt)
  convert.convert_dir(os.path.join(root, "hf"), ckpt, format="hf")
  model = loading.load(ckpt)

  def torch_time(fn):
    with torch.no_grad():
      return _median_seconds(fn, repeats)

  def hf_nll():
    logits = hf_model(input_ids=ids_t, use_cache=False).logits.float()
    return -torch.gather(torch.log_softmax(logits[:, :-1], -1), -1, ids_t[:, 1:, None])

  tokens = jnp.asarray(ids_BN, jnp.int32)
  lengths = jnp.asarray(lengths_BP)
  ent_fn = jax.jit(lambda p, t: compute_entropies(p, t, model.entropy_config))
  patch_fn = jax.jit(
      lambda p, t: patching.patch(
          t, compute_entropies(p, t, model.entropy_config), max_patches=N + 1, **model.patching.patch_kwargs()
      ).patch_lengths_BP
  )
  fwd = jax.jit(lambda p, t, l: BLT(model.config).apply({"params": p}, t, l))
  ours_lengths = np.asarray(patch_fn(model.entropy_params, tokens))
  scorer = Scorer(model, row_bytes=N, batch_bytes=B * N)
  rows_np = [r.astype(np.int32) for r in ids_BN]
  score_ours = lambda: scorer.score_arrays(rows_np)
  # Same patches: every byte in the same patch (the next-token position may close a patch or open its own).
  same_lengths = bool(
      np.array_equal(
          np.asarray(patching.patch_ids_from_lengths(jnp.asarray(ours_lengths), N)),
          np.asarray(patching.patch_ids_from_lengths(jnp.asarray(lengths_BP), N)),
      )
  )
  # Parity check of the forward given the same lengths, so the timings compare the same computation.
  ours_logits = np.asarray(fwd(model.params, tokens, lengths))
  with torch.no_grad():
    theirs_logits = hf_model(input_ids=ids_t, patch_lengths=lengths_t, use_cache=False).logits.float().numpy()
  result = dict(
      config=COMPARE_HF,
      batch=B,
      seq_len=N,
      threshold=threshold,
      bytes_per_patch=B * (N + 1) / float((lengths_BP > 0).sum()),
      same_patch_lengths=same_lengths,
      max_logit_diff=float(np.max(np.abs(ours_logits - theirs_logits))),
      torch_threads=torch.get_num_threads(),
  )

  def no_grad(fn):
    def call():
      with torch.no_grad():
        return fn()

    return call

  pairs = [
      (
          "entropy model (patcher)",
          lambda: jax.block_until_ready(ent_fn(model.entropy_params, tokens)),
          no_grad(lambda: hf_patcher(threshold)),
      ),
      (
          "BLT forward given patch lengths",
          lambda: jax.block_until_ready(fwd(model.params, tokens, lengths)),
          no_grad(lambda: hf_model(input_ids=ids_t, patch_lengths=lengths_t, use_cache=False)),
      ),
      ("whole scoring path (patcher + forward + NLL)", score_ours, no_grad(hf_nll)),
  ]
  rows = []
  for name, ours, theirs in pairs:
    t_ours, t_theirs, ratios = _interleaved(ours, theirs, repeats)
    rows.append(
        dict(
            name=name,
            blt_jax_s=t_ours,
            transformers_s=t_theirs,
            speedup=t_theirs / t_ours,
            pair_ratio_min=min(ratios),
            pair_ratio_max=max(ratios),
            blt_jax_bytes_per_s=B * N / t_ours,
            transformers_bytes_per_s=B * N / t_theirs,
        )
    )
  rows += _compare_stages(model, hf_model, fwd, tokens, lengths, ids_t, lengths_t, repeats)
  a = torch.randn(2048, 2048)
  rows.append(
      dict(
          name="f32 matmul 2048^3 (GFLOP/s)",
          blt_jax_gflops=matmul_rate() / 1e9,
          transformers_gflops=2 * 2048**3 / torch_time(lambda: a @ a) / 1e9,
      )
  )
  result["rows"] = rows
  return result


def _compare_stages(model, hf_model, forward, tokens, lengths, ids_t, lengths_t, repeats):
  """Where each forward spends its time: the global transformer and the local decoder, each timed alone on the
  inputs the whole forward gives it (blt_jax: jitted stage functions; transformers: hooks around its submodules
  during whole forwards), and the rest (embeddings, local encoder, patch ids) as the whole forward (`forward`, the
  jitted BLT forward of the comparison) minus both."""
  import torch  # pylint: disable=import-outside-toplevel
  from blt_jax.latent import GlobalTransformer  # pylint: disable=import-outside-toplevel
  from blt_jax.local_models import LocalDecoder  # pylint: disable=import-outside-toplevel
  from blt_jax.model import BLT  # pylint: disable=import-outside-toplevel

  c, p = model.config, model.params
  N = tokens.shape[1]
  _, inter = BLT(c).apply({"params": p}, tokens, lengths, mutable=["intermediates"])
  inter = inter["intermediates"]
  global_in = inter["local_encoder_patch_h"][0].reshape(tokens.shape[0], lengths.shape[1], -1)
  patch_doc = masks.patch_document_ids(masks.document_ids(tokens), lengths)
  run_global = jax.jit(lambda gp, x, d: GlobalTransformer(c).apply({"params": gp}, x, d))
  run_decoder = jax.jit(
      lambda dp, h, g, t, l: LocalDecoder(c).apply({"params": dp}, h, g, t, patching.decoder_patch_ids(l, N))
  )
  ours = dict(
      whole=timeit(forward, p, tokens, lengths, repeats=repeats),
      global_=timeit(run_global, p["global_transformer"], global_in, patch_doc, repeats=repeats),
      decoder=timeit(
          run_decoder,
          p["local_decoder"],
          inter["local_encoder_h"][0],
          inter["global_h"][0],
          tokens,
          lengths,
          repeats=repeats,
      ),
  )

  spent = {"global_": [], "decoder": []}
  starts = {}
  hooks = []
  for key, module in (("global_", hf_model.model.global_transformer), ("decoder", hf_model.model.local_decoder)):
    hooks.append(module.register_forward_pre_hook(lambda *_, k=key: starts.__setitem__(k, time.perf_counter())))
    hooks.append(module.register_forward_hook(lambda *_, k=key: spent[k].append(time.perf_counter() - starts[k])))
  with torch.no_grad():
    whole = _median_seconds(lambda: hf_model(input_ids=ids_t, patch_lengths=lengths_t, use_cache=False), repeats)
  for h in hooks:
    h.remove()
  theirs = dict(
      whole=whole, global_=float(np.median(spent["global_"][1:])), decoder=float(np.median(spent["decoder"][1:]))
  )
  for side in (ours, theirs):
    side["rest"] = side["whole"] - side["global_"] - side["decoder"]
  names = dict(
      global_="stage: global transformer (4 x 512 over the patch slots)",
      decoder="stage: local decoder (2 x 256, cross-attention, output)",
      rest="stage: rest of the forward (embeddings, local encoder, patch ids)",
  )
  return [
      dict(
          name=names[k],
          blt_jax_s=ours[k],
          transformers_s=theirs[k],
          speedup=theirs[k] / ours[k],
          blt_jax_bytes_per_s=N * tokens.shape[0] / ours[k],
          transformers_bytes_per_s=N * tokens.shape[0] / theirs[k],
      )
      for k in ("global_", "decoder", "rest")
  ]


def _lengths_with_next_token(hf_lengths_BP):
  """transformers' patch lengths cover the N bytes; ours also the next-token position (spec 3.2): the last real
  patch of each row takes it. Same patch of every byte, so the same logits."""
  out = np.pad(hf_lengths_BP.astype(np.int32), ((0, 0), (0, 1)))
  for row in out:
    row[np.flatnonzero(row)[-1]] += 1
  return out


def _interleaved(ours, theirs, repeats):
  """(median seconds of `ours()`, of `theirs()`, each pair's ratio theirs/ours): one warm-up call each, then
  `repeats` alternating calls, so a slow spell of the shared machine falls on both sides alike rather than on
  whichever was being timed then."""
  ours()
  theirs()
  times = ([], [])
  for _ in range(repeats):
    for fn, out in zip((ours, theirs), times):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
  return float(np.median(times[0])), float(np.median(times[1])), [b / a for a, b in zip(*times)]


def _median_seconds(fn, repeats):
  """Median seconds of `fn()` over `repeats` calls after one warm-up call (the single timing loop here)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--sections", default="attention,train")
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--entropy-store", default="runs/entropies_stdlib", help="rows: stored entropies of the corpus")
  parser.add_argument("--threshold", type=float, default=2.977799892425537, help="rows: the entropy threshold")
  parser.add_argument("--rows", type=int, default=512, help="rows: training rows measured per configuration")
  parser.add_argument(
      "--budgets", default="blt_1b=2816,blt_7b=2560", help="rows: max_patches of rows cut to a budget, per config"
  )
  parser.add_argument("--workdir", default="runs/benchmark", help="scoring: corpus and random checkpoints go here")
  parser.add_argument("--corpus-bytes", type=int, default=1_000_000, help="scoring: corpus size")
  parser.add_argument(
      "--entropy-checkpoint", default="runs/entropy_tiny", help="calibration: the entropy model (README flow's)"
  )
  parser.add_argument(
      "--compare",
      choices=["transformers"],
      default=None,
      help="also run the side-by-side against transformers' BltForCausalLM (torch on CPU)",
  )
  args = parser.parse_args()
  preset = PRESETS[args.preset]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {jax.device_count()} device(s)")
  results = {}
  if "attention" in args.sections:
    results["attention"] = bench_attention(preset["attn"])
    print(f"\nattention, shapes {preset['attn']}")
    print("| kernel | fast (ms) | dense (ms) | speedup | fast / its q@k matmul |\n|---|---|---|---|---|")
    for r in results["attention"]:
      over = f"{r['over_qk']:.2f}x" if "over_qk" in r else ""
      print(f"| {r['name']} | {r['fast_s'] * 1e3:.2f} | {r['dense_s'] * 1e3:.2f} | {r['speedup']:.1f}x | {over} |")
  if "train" in args.sections:
    r = results["train"] = bench_train(preset)
    print(
        f"\nBLT train step: {r['params'] / 1e6:.1f}M params, batch {r['batch']} x {r['seq_len']} bytes, "
        f"{r['mean_patch_length']:.2f} bytes/patch"
    )
    print("| patching | step (ms) | bytes/s | MFU |\n|---|---|---|---|")
    print(
        f"| entropy model in the step | {r['step_s_in_graph'] * 1e3:.1f} | {r['bytes_per_s_in_graph']:.0f} | "
        f"{r['mfu_in_graph'] * 100:.1f}% |"
    )
    print(
        f"| precomputed entropies | {r['step_s_precomputed'] * 1e3:.1f} | {r['bytes_per_s_precomputed']:.0f} | "
        f"{r['mfu_precomputed'] * 100:.1f}% |"
    )
    print(
        f"precomputed / in-graph speedup: {r['precomputed_speedup']:.2f}x; "
        f"patches/s (precomputed): {r['patches_per_s_precomputed']:.0f}"
    )
  if "loop" in args.sections:
    results["loop"] = bench_loop(preset)
    print(
        f"\ntrain loop, steps dispatched back to back, state donated vs not ({jax.devices()[0].device_kind}; "
        f"MFU against {results['loop'][0].get('peak', 'no peak')})"
    )
    print(
        "| remat | batch | donated step (ms) | not donated (ms) | donated / not | bytes/s (donated) | MFU (donated) "
        "| compile (s) | step memory, donated / not (GiB) | donated runs (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["loop"]:
      if "error" in r:
        done = f"{r['donated']['step_s'] * 1e3:.1f}" if "donated" in r else ""
        print(f"| {r['remat']} | {r['batch']} | {done} | does not fit: {r['error']} | | | | | | |")
        continue
      d, n = r["donated"], r["not_donated"]
      print(
          f"| {r['remat']} | {r['batch']} | {d['step_s'] * 1e3:.1f} | {n['step_s'] * 1e3:.1f} | "
          f"{r['donated_over_not']:.2f}x | {d['bytes_per_s']:.0f} | {d['mfu'] * 100:.1f}% | {d['compile_s']:.0f} | "
          f"{d['program_bytes'] / 2**30:.2f} / {n['program_bytes'] / 2**30:.2f} | "
          f"{', '.join(f'{t * 1e3:.0f}' for t in d['runs_s'])} |"
      )
  if "scoring" in args.sections:
    results["scoring"] = bench_scoring(preset, args.workdir, args.corpus_bytes)
    print(
        f"\nscoring CLI (python -m blt_jax.score, whole process incl. start-up and compiles), "
        f"{results['scoring'][0]['corpus_bytes']} bytes of stdlib sources"
    )
    print("| model | packed bytes/s | one doc per row bytes/s | packing speedup | programs compiled (packed) | bpb |")
    print("|---|---|---|---|---|---|")
    for r in results["scoring"]:
      print(
          f"| {r['model']} | {r['packed']['bytes_per_s']:.0f} | {r['one document per row']['bytes_per_s']:.0f} | "
          f"{r['packing_speedup']:.2f}x | {r['packed']['programs']} | {r['packed']['bpb']:.3f} |"
      )
  if "calibration" in args.sections:
    results["calibration"] = bench_calibration(args.entropy_checkpoint)
    print(
        f"\npatching calibration of {args.entropy_checkpoint} on the default corpus (--overflow 1e-3 --multiple-of 128;"
        f" held out: the validation split, every row)"
    )
    print(
        "| seq_len | max_patch_length | target | threshold | bytes/patch | held-out bytes/patch | patches per row "
        "p50 / p90 / p99 / max | max_patches | held-out rows over it | padding | seq_len + 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["calibration"]:
      q = r["patches_per_row"]
      print(
          f"| {r['seq_len']} | {r['max_patch_length'] or '-'} | {r['target_bytes_per_patch']:g} | "
          f"{r['threshold']:.4f} | {r['bytes_per_patch']:.3f} | {r['held_out_bytes_per_patch']:.3f} "
          f"({r['held_out_rows']} rows) | {q['p50']} / {q['p90']} / {q['p99']} / {q['max']} | {r['max_patches']} | "
          f"{100 * r['held_out_overflow_rows']:.2g}% | {r['slots_per_patch']:.2f} | "
          f"{r['slots_per_patch'] * (r['seq_len'] + 1) / r['max_patches']:.2f} |"
      )
  if "rows" in args.sections:
    budgets = {
        name: [int(b) for b in spec.split(":")] for name, spec in (x.split("=") for x in args.budgets.split(","))
    }
    results["rows"] = bench_rows(args.entropy_store, args.threshold, sorted(budgets), args.rows, budgets)
    print(
        f"\nrows of seq_len bytes vs rows cut to a patch budget: {args.rows} training rows of the default corpus, "
        f"entropies from {args.entropy_store}, threshold {args.threshold}"
    )
    print(
        "| config | rows of | max_patches | bytes per row / seq_len | slots holding a patch | rows that overflow | "
        "FLOPs per byte learnt / model's | / model's at 4.5 bytes per patch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
      print(
          f"| {r['config']} (stream {r['stream_bytes_per_patch']:.2f} bytes/patch) | {r['rows_of']} | "
          f"{r['max_patches']} | {r['row_fill']:.1%} | {r['slot_fill']:.1%} | {r['overflow_rows']:.1%} | "
          f"{r['cost_vs_model']:.3f}x | {r['cost_vs_model_at_4_5']:.3f}x |"
      )
  if "generation" in args.sections:
    r = results["generation"] = bench_generation()
    print("\ngeneration (greedy, batch 1, random tiny BLT + entropy model, entropy patching; outputs checked equal)")
    print("| prompt | generated | cached bytes/s | full recompute bytes/s | cached speedup |\n|---|---|---|---|---|")
    for x in r["speed"]:
      print(
          f"| {x['prompt']} | {x['generated']} | {x['cached_bytes_per_s']:.0f} | {x['uncached_bytes_per_s']:.1f} | "
          f"{x['speedup']:.1f}x |"
      )
    print("| prompt | cached ms per generated byte | prefill ms |\n|---|---|---|")
    for x in r["prompt_scaling"]:
      print(f"| {x['prompt']} | {x['ms_per_byte']:.2f} | {x['prefill_ms']:.0f} |")
  if "compile" in args.sections:
    results["compile"] = bench_compile(preset)
    print("\ntrain-step compile time against global depth (batch 2 x 256 bytes, static patches)")
    print(
        "| global layers | blocks | train step compile (s) | its CPU s | loss gradient alone compile (s) "
        "| compiled step HLO ops |\n|---|---|---|---|---|---|"
    )
    for r in results["compile"]:
      print(
          f"| {r['global_layers']} | {r['blocks']} | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | "
          f"{r['grad_compile_s']:.1f} | {r['hlo_ops']} |"
      )
    for blocks in sorted({r["blocks"] for r in results["compile"]}):
      by_depth = {r["global_layers"]: r for r in results["compile"] if r["blocks"] == blocks}
      if len(by_depth) == 2:
        lo, hi = sorted(by_depth)
        ratio = {k: by_depth[hi][k] / by_depth[lo][k] for k in ("compile_s", "compile_cpu_s", "grad_compile_s")}
        print(
            f"{blocks}: train step {hi} vs {lo} layers {ratio['compile_s']:.2f}x (CPU "
            f"{ratio['compile_cpu_s']:.2f}x), gradient {ratio['grad_compile_s']:.2f}x"
        )
  if args.compare == "transformers":
    r = results["compare_transformers"] = bench_compare_transformers(args.workdir)
    print(
        f"\nblt_jax vs transformers BltForCausalLM (torch {r['torch_threads']} threads), {r['batch']} x "
        f"{r['seq_len']} random bytes, {r['bytes_per_patch']:.2f} bytes/patch, same patch lengths: "
        f"{r['same_patch_lengths']}, max |logit diff| {r['max_logit_diff']:.1e}"
    )
    print(
        "| path | blt_jax (ms) | transformers (ms) | blt_jax bytes/s | transformers bytes/s | ratio | pairs' "
        "ratios |"
    )
    print("|---|---|---|---|---|---|---|")
    for x in r["rows"][:-1]:
      spread = f"{x['pair_ratio_min']:.2f}-{x['pair_ratio_max']:.2f}x" if "pair_ratio_min" in x else ""
      print(
          f"| {x['name']} | {x['blt_jax_s'] * 1e3:.0f} | {x['transformers_s'] * 1e3:.0f} | "
          f"{x['blt_jax_bytes_per_s']:.0f} | {x['transformers_bytes_per_s']:.0f} | {x['speedup']:.2f}x | {spread} |"
      )
    x = r["rows"][-1]
    print(f"| {x['name']} | {x['blt_jax_gflops']:.0f} | {x['transformers_gflops']:.0f} | | | | |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
