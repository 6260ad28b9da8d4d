"""Hugging Face transformers (`BltForCausalLM`) tensor names <-> the reference's (spec 14.4): the one rename table.

transformers renames the reference's parameters word by word (`attention.wq` -> `self_attn.q_proj`, ...), puts the
BLT under `model.` and its entropy model under `model.patcher.`, moves the decoder's output to the top-level
`lm_head`, and fuses the hash tables into one `[M*V_hash, dE]` embedding (table m at rows m*V_hash ..). Names of
ours are reached through the reference's table in `keys.py`, so there is one mapping per layout and no second
copy of our param paths.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

from blt_jax.convert import keys as K
from blt_jax.convert.mapping import HASH_PATH, Target

# Reference word -> transformers word, inside a dotted name.
_WORDS = {
    "attention": "self_attn",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "feed_forward": "mlp",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "cross_attn_norm_q": "q_norm",
    "cross_attn_norm_kv": "k_norm",
    "tok_embeddings": "embed_tokens",
    "output": "lm_head",
}
BLT_PREFIX, PATCHER_PREFIX = "model.", "model.patcher."
HASH_KEY = "model.encoder_hash_tok_embedding.weight"
LM_HEAD_KEY = "lm_head.weight"  # the reference's local_decoder.output.weight
_DECODER_OUTPUT = "local_decoder.output.weight"

# transformers buffers that may be saved by older versions; they hold no weights (RoPE is recomputed).
IGNORED_KEYS = (re.compile(r"rotary_emb\.(inv_freq|original_inv_freq)$"),)


def is_ignored(key: str) -> bool:
  return any(p.search(key) for p in IGNORED_KEYS)


def hf_name(reference_key: str, model: str) -> str:
  """Reference key of the BLT ("blt") or of its entropy model ("entropy") -> transformers key."""
  if model == "blt" and reference_key == _DECODER_OUTPUT:
    return LM_HEAD_KEY
  renamed = ".".join(_WORDS.get(word, word) for word in reference_key.split("."))
  return (BLT_PREFIX if model == "blt" else PATCHER_PREFIX) + renamed


def blt_targets(
    shapes: Mapping[K.Path, tuple],
    encoder_kv_repeat: int = 1,
    decoder_kv_repeat: int = 1,
    encoder_head_dim: int = 0,
    decoder_head_dim: int = 0,
) -> Dict[str, Target]:
  """transformers key -> Target for every BLT param (with its shape).

  `*_kv_repeat`: query heads per kv head of the encoder's / decoder's cross-attention. transformers builds those
  from the local stack's config, so a GQA stack has GQA cross-attention, while ours (like the reference) has one
  kv head per head: the kv rows are repeated on import and must be repeats on export.
  """
  out = {}
  for key, (path, kind, _) in K.reference_keys_for_shapes(dict(shapes), "blt").items():
    if path == HASH_PATH:
      out[HASH_KEY] = Target(path, "hash", None)
      continue
    target = Target(path, kind)
    if len(path) >= 3 and path[1].startswith("cross_attn_layers_") and path[2] in ("wk", "wv"):
      repeat, head_dim = (
          (encoder_kv_repeat, encoder_head_dim) if path[0] == "local_encoder" else (decoder_kv_repeat, decoder_head_dim)
      )
      if repeat > 1:
        target = Target(path, kind, None, repeat, head_dim)
    out[hf_name(key, "blt")] = target
  return out


def patcher_targets(shapes: Mapping[K.Path, tuple]) -> Dict[str, Target]:
  """transformers key (`model.patcher.*`) -> Target for every entropy-model param."""
  return {
      hf_name(key, "entropy"): Target(path, kind, table)
      for key, (path, kind, table) in K.reference_keys_for_shapes(dict(shapes), "entropy").items()
  }
