"""Tiny entropy model (byte LM) for CPU: train it, then patch configs/tiny_entropy.py with its export."""

from blt_jax.train_config import base_config


def get_config():
  c = base_config()
  c.model_type = "entropy_model"
  e = c.entropy_model
  e.dim = 64
  e.n_layers = 2
  e.n_heads = 4
  e.max_seqlen = 512
  e.sliding_window = 128
  c.seq_len = 256
  c.global_batch_size = 8
  c.num_steps = 300
  c.compute_dtype = "float32"
  c.optimizer.lr = 2e-3
  c.optimizer.warmup = 30
  c.optimizer.clip = 1.0
  c.optimizer.weight_decay = 0.01
  c.log_every = 25
  c.eval_every = 100
  c.eval_batches = 8
  c.checkpoint_every = 100
  return c
