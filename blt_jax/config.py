"""Typed model configs: the entropy model and the BLT.

Field names follow the reference's `LMTransformerArgs` / `ByteLatentTransformerArgs` (spec 2.1, 14.3) so that a
checkpoint's `params.json` maps onto them one to one. Configs are frozen dataclasses (hashable, so they can be
static arguments of jitted functions); `from_dict` builds them from ml_collections or json and names unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

from blt_jax import tokenizer

_DTYPES = ("float32", "bfloat16", "float16")
_INIT_STD_FACTORS = ("disabled", "current_depth", "global_depth", "dim_ratio")
_POOLING = ("max", "avg", "mean", "min")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
  """SwiGLU hidden width exactly as the reference rounds it (spec 5.3)."""
  hidden = int(2 * 4 * dim / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """One pre-norm transformer stack (the unit shared by every BLT stage)."""

  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  ffn_dim_multiplier: Optional[float] = None
  multiple_of: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  sliding_window: Optional[int] = None  # keys i-W < j <= i; None = unbounded causal
  document_mask: bool = True  # split attention at EOS (block_causal / local_block_causal)
  init_std_factor: str = "current_depth"
  dtype: str = "float32"
  remat: bool = False
  intermediate_size: Optional[int] = None  # explicit SwiGLU width (transformers' configs state it); None = spec 5.3
  scan_layers: bool = False  # run the blocks as one lax.scan over stacked params (compile time flat in depth)
  attention_impl: str = "auto"  # self-attention kernel (attention.IMPLS); "auto" picks by platform and shape
  remat_policy: str = "full"  # with remat: what the backward pass keeps (REMAT_POLICIES)

  @property
  def hd(self) -> int:
    return self.head_dim or self.dim // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def ffn_dim(self) -> int:
    if self.intermediate_size is not None:
      return self.intermediate_size
    return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


# Self-attention kernels (attention.self_attention's `impl`).
ATTENTION_IMPLS = ("auto", "dense", "blocked", "splash", "cudnn")
# With remat, what a block's backward pass keeps instead of recomputing (layers.remat_policy): nothing ("full"
# recompute), every matmul output ("dots"), the matmul outputs without batch dimensions, i.e. the projections, not
# attention ("dots_no_batch"); by name, MaxText's way: the q/k/v projections ("save_qkv_proj"), those and the
# attention output projection ("save_attention_proj"); or the projections kept in host memory rather than HBM
# ("offload_dots_no_batch", where the platform has pinned host memory: TPU, GPU).
REMAT_POLICIES = ("full", "dots", "dots_no_batch", "save_qkv_proj", "save_attention_proj", "offload_dots_no_batch")


def _check_common(
    name: str, dtype: str, init_std_factor: str, attention_impl: str = "auto", remat_policy: str = "full"
) -> None:
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"{name}.remat_policy={remat_policy!r}: expected one of {REMAT_POLICIES}")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"{name}.attention_impl={attention_impl!r}: expected one of {ATTENTION_IMPLS}")
  if dtype not in _DTYPES:
    raise ValueError(f"{name}.dtype={dtype!r}: expected one of {_DTYPES}")
  if init_std_factor not in _INIT_STD_FACTORS:
    raise ValueError(f"{name}.init_std_factor={init_std_factor!r}: expected one of {_INIT_STD_FACTORS}")


@dataclasses.dataclass(frozen=True)
class EntropyModelConfig:
  """The small byte LM whose next-byte entropies place patch boundaries (spec 2)."""

  dim: int = 768
  n_layers: int = 14
  n_heads: int = 12
  n_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  ffn_dim_multiplier: Optional[float] = 1.0
  multiple_of: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  vocab_size: int = tokenizer.VOCAB_SIZE
  max_seqlen: int = 8192  # RoPE table length and the chunk length of `compute_entropies` (spec 2.3)
  sliding_window: Optional[int] = 512  # released model: local_block_causal(512) (spec 2.4)
  document_mask: bool = True
  init_std_factor: str = "current_depth"
  dtype: str = "float32"
  remat: bool = False
  intermediate_size: Optional[int] = None  # explicit FFN width (transformers' patcher_config); None = spec 5.3
  scan_layers: bool = False  # a run setting: blocks as one lax.scan (same params, same numbers)
  attention_impl: str = "auto"  # a run setting: the self-attention kernel (attention.IMPLS)
  remat_policy: str = "full"  # a run setting: with remat, what the backward pass keeps (REMAT_POLICIES)

  def __post_init__(self):
    _check_common("entropy_model", self.dtype, self.init_std_factor, self.attention_impl, self.remat_policy)
    if (self.head_dim or self.dim // self.n_heads) * self.n_heads != self.dim and self.head_dim is None:
      raise ValueError(f"entropy_model.dim={self.dim} is not divisible by n_heads={self.n_heads}")

  def stack(self) -> StackConfig:
    return StackConfig(
        self.dim,
        self.n_layers,
        self.n_heads,
        self.n_kv_heads,
        self.head_dim,
        self.ffn_dim_multiplier,
        self.multiple_of,
        self.norm_eps,
        self.rope_theta,
        self.sliding_window,
        self.document_mask,
        self.init_std_factor,
        self.dtype,
        self.remat,
        self.intermediate_size,
        self.scan_layers,
        self.attention_impl,
        self.remat_policy,
    )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "EntropyModelConfig":
    return _from_dict(cls, d, strict, "entropy_model")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BLTConfig:
  """The byte latent transformer: local encoder, global (latent) transformer, local decoder (spec 7-10)."""

  vocab_size: int = tokenizer.VOCAB_SIZE
  dim_local_encoder: int = 1024
  n_layers_local_encoder: int = 1
  n_heads_local_encoder: int = 16
  dim_global: int = 2048
  n_layers_global: int = 25
  n_heads_global: int = 16
  n_kv_heads_global: Optional[int] = None
  dim_local_decoder: int = 1024
  n_layers_local_decoder: int = 9
  n_heads_local_decoder: int = 16
  n_kv_heads: Optional[int] = None  # local encoder/decoder
  head_dim: Optional[int] = None
  ffn_dim_multiplier: Optional[float] = 1.0
  multiple_of: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  max_seqlen: int = 4096  # patches (global RoPE table)
  max_encoder_seq_length: int = 24576  # bytes (local RoPE tables)
  local_attention_window_len: Optional[int] = 512
  document_mask: bool = True  # block-causal at EOS in every self-attention (released xformers semantics, spec 6)
  cross_attn_k: int = 2
  cross_attn_nheads: int = 16
  cross_attn_all_layers_encoder: bool = False
  cross_attn_all_layers_decoder: bool = True
  cross_attn_window_encoder: Optional[int] = None
  cross_attn_window_decoder: Optional[int] = None
  downsampling_by_pooling: str = "max"
  encoder_hash_byte_group_size: Tuple[int, ...] = (3, 4, 5, 6, 7, 8)
  encoder_hash_byte_group_vocab: int = 500002
  encoder_hash_byte_group_nb_functions: int = 1
  ngram_vocab_sizes: Optional[Tuple[int, ...]] = None  # frequency n-gram tables (spec 4.3), off in released models
  init_std_factor: str = "current_depth"
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False  # a run setting: the global stack's blocks as one lax.scan (same params and numbers)
  attention_impl: str = "auto"  # a run setting: every stack's self-attention kernel (attention.IMPLS)
  remat_policy: str = "full"  # a run setting: with remat, what the backward pass keeps (REMAT_POLICIES)
  # Fields that the reference derives but transformers' configs state per stage (None: the reference's rule).
  intermediate_size_local_encoder: Optional[int] = None  # explicit SwiGLU widths; None = spec 5.3 from the dim
  intermediate_size_global: Optional[int] = None
  intermediate_size_local_decoder: Optional[int] = None
  n_kv_heads_local_decoder: Optional[int] = None  # None = n_kv_heads (the reference has one field for both)
  cross_attn_nheads_decoder: Optional[int] = None  # None = cross_attn_nheads (transformers: the decoder's heads)
  # transformers' port with cross_attn_all_layers_encoder: pool and project fresh patch queries from every layer's
  # output before its cross-attention, so only the last one's result survives. False = the reference: pool once.
  encoder_repool_patches: bool = False

  def __post_init__(self):
    _check_common("blt", self.dtype, self.init_std_factor, self.attention_impl, self.remat_policy)
    object.__setattr__(self, "encoder_hash_byte_group_size", tuple(int(n) for n in self.encoder_hash_byte_group_size))
    if self.ngram_vocab_sizes is not None:
      object.__setattr__(self, "ngram_vocab_sizes", tuple(int(n) for n in self.ngram_vocab_sizes))
    if self.downsampling_by_pooling not in _POOLING:
      raise ValueError(f"blt.downsampling_by_pooling={self.downsampling_by_pooling!r}: expected one of {_POOLING}")
    if self.dim_local_encoder != self.dim_local_decoder:
      # The decoder's patch projection outputs dE*k features reshaped into dD-wide slots (spec 9, quirk Q7).
      raise ValueError(
          f"blt.dim_local_decoder ({self.dim_local_decoder}) must equal dim_local_encoder "
          f"({self.dim_local_encoder}): the reference shares encoder/decoder embedding widths"
      )
    for name, heads in (
        ("dim_local_encoder", self.cross_attn_nheads),
        ("dim_local_decoder", self.decoder_cross_attn_nheads),
    ):
      if getattr(self, name) % heads:
        raise ValueError(f"blt.{name}={getattr(self, name)} is not divisible by its cross-attention heads ({heads})")
    if self.cross_attn_k < 1:
      raise ValueError(f"blt.cross_attn_k must be >= 1, got {self.cross_attn_k}")

  def _stack(self, dim, n_layers, n_heads, n_kv_heads, window, intermediate_size) -> StackConfig:
    return StackConfig(
        dim,
        n_layers,
        n_heads,
        n_kv_heads,
        self.head_dim,
        self.ffn_dim_multiplier,
        self.multiple_of,
        self.norm_eps,
        self.rope_theta,
        window,
        self.document_mask,
        self.init_std_factor,
        self.dtype,
        self.remat,
        intermediate_size,
        self.scan_layers,
        self.attention_impl,
        self.remat_policy,
    )

  def encoder_stack(self) -> StackConfig:
    return self._stack(
        self.dim_local_encoder,
        self.n_layers_local_encoder,
        self.n_heads_local_encoder,
        self.n_kv_heads,
        self.local_attention_window_len,
        self.intermediate_size_local_encoder,
    )

  def global_stack(self) -> StackConfig:
    return self._stack(
        self.dim_global,
        self.n_layers_global,
        self.n_heads_global,
        self.n_kv_heads_global,
        None,
        self.intermediate_size_global,
    )

  def decoder_stack(self) -> StackConfig:
    kv = self.n_kv_heads_local_decoder if self.n_kv_heads_local_decoder is not None else self.n_kv_heads
    return self._stack(
        self.dim_local_decoder,
        self.n_layers_local_decoder,
        self.n_heads_local_decoder,
        kv,
        self.local_attention_window_len,
        self.intermediate_size_local_decoder,
    )

  @property
  def decoder_cross_attn_nheads(self) -> int:
    return self.cross_attn_nheads_decoder or self.cross_attn_nheads

  @property
  def num_hash_tables(self) -> int:
    return len(self.encoder_hash_byte_group_size) * self.encoder_hash_byte_group_nb_functions

  @property
  def global_input_dim(self) -> int:
    return self.cross_attn_k * self.dim_local_encoder

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "BLTConfig":
    return _from_dict(cls, d, strict, "blt")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _from_dict(cls, d: Mapping[str, Any], strict: bool, name: str):
  d = dict(d)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown and strict:
    raise ValueError(f"unknown {name} config key(s) {unknown}; known keys: {sorted(fields)}")
  return cls(**{k: v for k, v in d.items() if k in fields})


def entropy_config_from_reference(args: Mapping[str, Any], **overrides) -> EntropyModelConfig:
  """`EntropyModelConfig` from the reference's `entropy_model` / LMTransformerArgs json (spec 2.1)."""
  cfg = dict(
      dim=args["dim"],
      n_layers=args["n_layers"],
      n_heads=args["n_heads"],
      n_kv_heads=args.get("n_kv_heads"),
      head_dim=args.get("head_dim"),
      ffn_dim_multiplier=args.get("ffn_dim_multiplier"),
      multiple_of=args.get("multiple_of", 256),
      norm_eps=args.get("norm_eps", 1e-5),
      rope_theta=args.get("rope_theta", 10000.0),
      vocab_size=args.get("vocab_size", tokenizer.VOCAB_SIZE),
      max_seqlen=args.get("max_seqlen", 8192),
      # `load_entropy_model` hard-codes local_block_causal with a 512 window (spec 2.1); keep that.
      sliding_window=512,
      init_std_factor=args.get("init_std_factor", "current_depth"),
  )
  cfg.update(overrides)
  return EntropyModelConfig(**cfg)


def blt_config_from_reference(args: Mapping[str, Any], **overrides) -> BLTConfig:
  """`BLTConfig` from a reference `ByteLatentTransformerArgs` json ("args" of config.json or "model" of params.json)."""
  unsupported = []
  if not args.get("cross_attn_encoder", True) or not args.get("cross_attn_decoder", True):
    unsupported.append("cross_attn_encoder/cross_attn_decoder=False (non cross-attention down/up-sampling)")
  if args.get("cross_attn_init_by_pooling", True) is False:
    unsupported.append("cross_attn_init_by_pooling=False")
  if args.get("patching_mode", "entropy") == "":
    unsupported.append("patching_mode='' (legacy nb_boe path, spec 10.5)")
  if args.get("use_rope", True) is False:
    unsupported.append("use_rope=False (broken in the reference, Q20)")
  if unsupported:
    raise ValueError("reference config uses features blt_jax does not implement: " + "; ".join(unsupported))
  hash_sizes = args.get("encoder_hash_byte_group_size") or ()
  ngram_sizes = None
  if args.get("encoder_enable_byte_ngrams") and args.get("ngram_vocab_sizes"):
    ngram_sizes = tuple(args["ngram_vocab_sizes"])
  cfg = dict(
      vocab_size=args.get("vocab_size", tokenizer.VOCAB_SIZE),
      dim_local_encoder=args["dim_local_encoder"],
      n_layers_local_encoder=args["n_layers_local_encoder"],
      n_heads_local_encoder=args["n_heads_local_encoder"],
      dim_global=args["dim_global"],
      n_layers_global=args["n_layers_global"],
      n_heads_global=args["n_heads_global"],
      n_kv_heads_global=args.get("n_kv_heads_global"),
      dim_local_decoder=args["dim_local_decoder"],
      n_layers_local_decoder=args["n_layers_local_decoder"],
      n_heads_local_decoder=args["n_heads_local_decoder"],
      n_kv_heads=args.get("n_kv_heads"),
      head_dim=args.get("head_dim"),
      ffn_dim_multiplier=args.get("ffn_dim_multiplier"),
      multiple_of=args.get("multiple_of", 256),
      norm_eps=args.get("norm_eps", 1e-5),
      rope_theta=args.get("rope_theta", 500000.0),
      max_seqlen=args.get("max_seqlen", 4096),
      max_encoder_seq_length=args.get("max_encoder_seq_length") or 24576,
      local_attention_window_len=args.get("local_attention_window_len"),
      cross_attn_k=args.get("cross_attn_k") or 1,
      cross_attn_nheads=args.get("cross_attn_nheads") or 1,
      cross_attn_all_layers_encoder=bool(args.get("cross_attn_all_layers_encoder", False)),
      cross_attn_all_layers_decoder=bool(args.get("cross_attn_all_layers_decoder", False)),
      cross_attn_window_encoder=args.get("cross_attn_window_encoder"),
      cross_attn_window_decoder=args.get("cross_attn_window_decoder"),
      downsampling_by_pooling=args.get("downsampling_by_pooling") or "max",
      encoder_hash_byte_group_size=tuple(hash_sizes),
      encoder_hash_byte_group_vocab=args.get("encoder_hash_byte_group_vocab") or 30000,
      encoder_hash_byte_group_nb_functions=args.get("encoder_hash_byte_group_nb_functions") or 1,
      ngram_vocab_sizes=ngram_sizes,
      init_std_factor=args.get("init_std_factor", "current_depth"),
  )
  cfg.update(overrides)
  return BLTConfig(**cfg)


def init_std_factor(mode: str, depth: int, n_layers: int, dim: int) -> float:
  """Divisor of the init std for layer `depth` (spec 13.2)."""
  if mode == "disabled":
    return 1.0
  if mode == "current_depth":
    return math.sqrt(2 * (depth + 1))
  if mode == "global_depth":
    return math.sqrt(2 * (n_layers + 1))
  return dim / 4096  # dim_ratio


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
  """How bytes are grouped into patches (spec 3); arguments of `patching.patch`."""

  mode: str = "entropy"  # entropy | space | static | byte
  threshold: float = 1.335442066192627  # released BLT-1B global threshold (spec 3.7)
  threshold_add: Optional[float] = None
  monotonicity: bool = False
  max_patch_length: Optional[int] = None
  patch_size: Optional[int] = None  # static mode only (integer; the reference's 4.5 is informational, Q15)
  compare_dtype: str = "float32"  # "bfloat16" reproduces the reference's realtime patching (Q4)

  def __post_init__(self):
    if self.mode not in ("entropy", "space", "static", "byte"):
      raise ValueError(f"patching.mode={self.mode!r}: expected entropy, space, static or byte")
    if self.mode == "static" and not isinstance(self.patch_size, int):
      raise ValueError(f"patching.patch_size must be an integer for static patching, got {self.patch_size!r}")
    if self.compare_dtype not in _DTYPES:
      raise ValueError(f"patching.compare_dtype={self.compare_dtype!r}: expected one of {_DTYPES}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "PatchingConfig":
    return _from_dict(cls, d, strict, "patching")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def patch_kwargs(self) -> dict:
    """Keyword arguments for `patching.patch` (everything but max_patches / include_next_token)."""
    import jax.numpy as jnp

    return dict(
        mode=self.mode,
        threshold=self.threshold,
        threshold_add=self.threshold_add,
        monotonicity=self.monotonicity,
        max_patch_length=self.max_patch_length,
        patch_size=self.patch_size,
        compare_dtype=jnp.dtype(self.compare_dtype),
    )


def patching_config_from_reference(patcher_args: Mapping[str, Any]) -> PatchingConfig:
  """`PatchingConfig` from the reference's `data.patcher_args` (spec 3.6)."""
  mode = patcher_args.get("patching_mode", "entropy")
  patch_size = patcher_args.get("patch_size")
  return PatchingConfig(
      mode=mode,
      threshold=patcher_args.get("threshold", 1.335442066192627),
      threshold_add=patcher_args.get("threshold_add"),
      monotonicity=bool(patcher_args.get("monotonicity", False)),
      max_patch_length=patcher_args.get("max_patch_length"),
      patch_size=int(patch_size) if mode == "static" and patch_size is not None else None,
  )
