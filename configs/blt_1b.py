"""The released BLT-1B shape (spec 14.3): 1.46B params without hash tables, 4.53B with them.

Patches with the released entropy model (convert facebook/blt's `entropy_model/` with `python -m blt_jax.convert`).
Mesh for a pod slice: FSDP over all chips (the 3B hash-table params shard over fsdp x tensor).
"""

from blt_jax.train_config import base_config


def get_config():
  c = base_config()
  c.model_type = "blt"
  m = c.model
  m.dim_local_encoder = 1024
  m.n_layers_local_encoder = 1
  m.n_heads_local_encoder = 16
  m.dim_global = 2048
  m.n_layers_global = 25
  m.n_heads_global = 16
  m.dim_local_decoder = 1024
  m.n_layers_local_decoder = 9
  m.n_heads_local_decoder = 16
  m.cross_attn_k = 2
  m.cross_attn_nheads = 16
  m.cross_attn_all_layers_encoder = False
  m.cross_attn_all_layers_decoder = True
  m.encoder_hash_byte_group_size = [3, 4, 5, 6, 7, 8]
  m.encoder_hash_byte_group_vocab = 500002
  m.encoder_hash_byte_group_nb_functions = 1
  m.local_attention_window_len = 512
  m.max_seqlen = 4096
  m.max_encoder_seq_length = 24576
  m.rope_theta = 500000.0
  c.entropy_checkpoint = "checkpoints/blt_1b/entropy_model"
  c.patching.mode = "entropy"
  c.patching.threshold = 1.335442066192627
  # Rows cut to a patch budget (data/patch_rows.py): each holds at most max_patches patches and seq_len bytes, so
  # the global stack's slots hold patches and nothing overflows. The loader patches from stored entropies, written
  # once with `python scripts/precompute_entropies.py --config configs/blt_1b.py --out <store>` (the reference's
  # preprocessing, spec 13.5). max_patches is the one with the fewest training FLOPs per byte learnt on the corpus:
  #   python -m blt_jax.calibrate --checkpoint <entropy model> --input <data> --bytes-per-patch 4.5 --seq-len 14336
  #       --multiple-of 128 --rows patches --config configs/blt_1b.py
  # On the stdlib corpus at 4.5 bytes per patch (README's entropy model): 2816 slots, filled 98.0%, rows 90.5% full,
  # 1.01x flops.py's model FLOPs per byte learnt; rows of 14336 bytes need 10880 slots for 0.1% overflow (3.24x).
  c.patching.rows = "patches"
  c.patching.max_patches = 2816
  c.data.entropy_store = "stores/blt_1b_entropies"
  c.seq_len = 14336  # bytes per row (at most)
  c.global_batch_size = 256
  c.num_steps = 240000
  c.compute_dtype = "bfloat16"
  c.remat = True
  # What the backward pass keeps: the projections, in host memory (no recompute). Chosen by compiling
  # (scripts/aot_compile.py; BENCHMARKS.md "Pod steps that run the model's FLOPs"). With 4096 slots of 14 KiB rows,
  # per chip 1.14x flops.py's model FLOPs on both slices ("full" recompute: 1.40x). With the patch budget above
  # (BENCHMARKS.md "Rows cut to a patch budget"): 0.84x, 0.98x per byte the rows hold.
  #   v6e:8x16   18.5 of 32 GiB; "dots" (kept in HBM) needed 34.1 GiB with 4096 slots and did not fit.
  #   v5p:4x4x8  18.9 of 95 GiB; --config.remat_policy=dots also fits (28.8 GiB) and spares the host transfers.
  c.remat_policy = "offload_dots_no_batch"
  c.optimizer.lr = 4e-4
  c.optimizer.warmup = 2000
  c.optimizer.clip = 1.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.log_every = 50
  c.eval_every = 2000
  c.checkpoint_every = 1000
  return c
