"""The one FLOP model (spec 15): training FLOPs per byte of a BLT or an entropy model.

Matmul FLOPs are 2 per multiply-add; training is 3x the forward (forward + two backward matmuls). Attention
scores and values count `4 * keys * dim` per query per layer, with the keys a query actually sees (causal: half of
the context; windowed: at most the window). BLT's global transformer runs once per patch, so its cost per byte is
divided by the mean patch length: the paper's accounting. Embedding lookups (byte, hash tables) cost nothing.
"""

from __future__ import annotations

from blt_jax.config import BLTConfig, EntropyModelConfig, StackConfig

TRAIN_TO_FORWARD = 3  # training FLOPs = 3x the forward: the forward and the two backward matmuls


def _mean_keys(context: int, window) -> float:
  """Average number of keys a causal query sees over `context` positions with an optional window."""
  if window is None or window >= context:
    return (context + 1) / 2
  return window - (window * (window - 1) / 2) / context  # the first `window` positions see fewer


def _stack_forward_flops_per_token(stack: StackConfig, context: int) -> float:
  d, hd = stack.dim, stack.hd
  q_o = 2 * 2 * d * stack.n_heads * hd
  k_v = 2 * 2 * d * stack.kv_heads * hd
  ffn = 2 * 3 * d * stack.ffn_dim
  attn = 4 * _mean_keys(context, stack.sliding_window) * stack.n_heads * hd
  return stack.n_layers * (q_o + k_v + ffn + attn)


def entropy_model_train_flops_per_byte(config: EntropyModelConfig, seq_len: int) -> float:
  stack = config.stack()
  head = 2 * config.dim * config.vocab_size
  return TRAIN_TO_FORWARD * (_stack_forward_flops_per_token(stack, seq_len) + head)


def token_model_train_flops_per_byte(config: EntropyModelConfig, seq_len: int, bytes_per_token: float) -> float:
  """Training FLOPs per byte of a token (e.g. BPE) transformer: its per-token cost (the same stack formula, a
  `vocab_size` head) over rows of `seq_len` tokens, divided by the mean bytes per token."""
  if bytes_per_token <= 0:
    raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
  return entropy_model_train_flops_per_byte(config, seq_len) / bytes_per_token


def inference_flops_per_byte(train_flops_per_byte: float) -> float:
  """Forward-only FLOPs per byte (scoring, generation without a cache) of a model with this training cost."""
  return train_flops_per_byte / TRAIN_TO_FORWARD


def blt_train_flops_per_byte(config: BLTConfig, seq_len: int, mean_patch_length: float) -> float:
  """Training FLOPs per byte of a BLT on rows of `seq_len` bytes with the given mean patch length."""
  k, dE, dD, dG = config.cross_attn_k, config.dim_local_encoder, config.dim_local_decoder, config.dim_global
  patches = max(seq_len / mean_patch_length, 1.0)
  enc = _stack_forward_flops_per_token(config.encoder_stack(), seq_len)
  dec = _stack_forward_flops_per_token(config.decoder_stack(), seq_len)
  glob = _stack_forward_flops_per_token(config.global_stack(), int(patches))
  if config.global_input_dim != dG:
    glob += 2 * config.global_input_dim * dG
  n_enc_x = config.n_layers_local_encoder if config.cross_attn_all_layers_encoder else 1
  n_dec_x = config.n_layers_local_decoder if config.cross_attn_all_layers_decoder else 1
  w_enc, w_dec = config.cross_attn_window_encoder or 1, config.cross_attn_window_decoder or 1
  # Encoder cross-attention: per patch, k query slots (q, o projections); per byte, k and v projections and the
  # scores of its w*k slots. Decoder: per byte q, o and scores over w*k slots; per patch, k slots of k and v.
  enc_x = n_enc_x * (4 * dE * dE * k / mean_patch_length + 4 * dE * dE + 4 * w_enc * k * dE)
  dec_x = n_dec_x * (4 * dD * dD + 4 * dD * dD * k / mean_patch_length + 4 * w_dec * k * dD)
  proj = 2 * dE * dE * k / mean_patch_length + 2 * dG * dE * k / mean_patch_length
  head = 2 * dD * config.vocab_size
  return TRAIN_TO_FORWARD * (enc + dec + glob / mean_patch_length + enc_x + dec_x + proj + head)


def mfu(flops_per_byte: float, bytes_per_second: float, peak_flops_per_second: float) -> float:
  """Model FLOPs utilisation; 0 when the peak is unknown."""
  if peak_flops_per_second <= 0:
    return 0.0
  return flops_per_byte * bytes_per_second / peak_flops_per_second


# Dense bf16 peak per device, for MFU. Unknown kinds (CPU) report 0 MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def device_peak_flops(device) -> float:
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return 0.0


def measured_matmul_flops(device=None, n: int = 1024, repeats: int = 3) -> float:
  """FLOP/s of a jitted float32 `[n, n] @ [n, n]` on `device` (median of `repeats` after a warm-up): the rate a
  CPU, which has no vendor peak here, can actually reach."""
  import time  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  device = device or jax.devices()[0]
  a = jax.device_put(np.ones((n, n), np.float32), device)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(mm(a))
    times.append(time.perf_counter() - t)
  return 2 * n**3 / max(float(np.median(times)), 1e-9)


def peak_flops(devices) -> tuple:
  """(peak FLOP/s of all `devices` together, where the number comes from) for MFU.

  Accelerators: the vendor's dense bf16 peak per chip times the chip count. CPU devices share one host's cores, so
  their peak is one measured float32 matmul rate per process (`measured_matmul_flops`), however many host devices
  XLA was told to emulate.
  """
  devices = list(devices)
  vendor = device_peak_flops(devices[0])
  if vendor > 0:
    return vendor * len(devices), f"vendor peak {vendor / 1e12:g} TFLOP/s x {len(devices)} {devices[0].device_kind}"
  processes = len({getattr(d, "process_index", 0) for d in devices})
  rate = measured_matmul_flops(devices[0])
  return rate * processes, (
      f"measured f32 matmul rate {rate / 1e9:.1f} GFLOP/s"
      + (f" x {processes} processes" if processes > 1 else "")
      + f" ({devices[0].platform})"
  )
