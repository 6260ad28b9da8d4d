"""Tiny BLT that trains for real on 2 CPU cores in minutes, on the embedded stdlib corpus.

Space patching (SpaceByte-like, spec 3.4) needs no entropy model; see configs/tiny_entropy.py for the entropy-patched
variant that uses an entropy model trained with configs/entropy_tiny.py.
"""

from blt_jax.train_config import base_config


def get_config():
  c = base_config()
  c.model_type = "blt"
  m = c.model
  m.dim_local_encoder = 64  # dE
  m.n_layers_local_encoder = 1
  m.n_heads_local_encoder = 4
  m.dim_global = 128  # dG (k * dE = 128: no global input projection, as in the 1B)
  m.n_layers_global = 2
  m.n_heads_global = 4
  m.dim_local_decoder = 64  # dD (must equal dE)
  m.n_layers_local_decoder = 2
  m.n_heads_local_decoder = 4
  m.cross_attn_k = 2
  m.cross_attn_nheads = 4
  m.encoder_hash_byte_group_size = [3, 4, 5, 6]
  m.encoder_hash_byte_group_vocab = 8192
  m.max_seqlen = 512  # patches
  m.max_encoder_seq_length = 512  # bytes
  m.local_attention_window_len = 128
  c.patching.mode = "space"
  c.patching.max_patches = 0  # seq_len + 1: space patches can be single bytes
  c.seq_len = 256
  c.global_batch_size = 8
  c.num_steps = 300
  c.compute_dtype = "float32"  # CPU has no fast bf16
  c.optimizer.lr = 2e-3
  c.optimizer.warmup = 30
  c.optimizer.clip = 1.0
  c.optimizer.weight_decay = 0.01
  c.log_every = 25
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  c.mesh.fsdp = -1
  return c
