"""The released entropy model's shape ("transformer_100m", spec 2.1), trained as the reference's entropy_model.yaml."""

from blt_jax.train_config import base_config


def get_config():
  c = base_config()
  c.model_type = "entropy_model"
  e = c.entropy_model
  e.dim = 768
  e.n_layers = 14
  e.n_heads = 12
  e.ffn_dim_multiplier = 1.0
  e.multiple_of = 256
  e.rope_theta = 10000.0
  e.max_seqlen = 8192
  e.sliding_window = 512
  c.seq_len = 8192
  c.global_batch_size = 256
  c.num_steps = 100000
  c.compute_dtype = "bfloat16"
  c.optimizer.lr = 4e-4
  c.optimizer.warmup = 500
  c.optimizer.clip = 10.0
  c.mesh.data = -1  # 100M params: pure data parallel
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  return c
