"""AdamW with the reference's learning-rate schedules and gradient clipping (spec 13.1).

The reference is `torch.optim.AdamW` over one param group (weight decay on every parameter, quirk Q10) driven by
`LambdaLR`, whose factor is evaluated at the number of optimizer steps already taken. optax schedules receive the
same count (0 at the first update), so `lr_schedule(cfg)(0) == 0`: the first update does nothing but fill the
Adam moments, as in the reference.

Gradient accumulation over `grad_accum_steps` micro-batches belongs to the trainer (not `optax.MultiSteps`): it
sums micro-batch gradients and calls the optimizer once. The reference clips at every micro-step (quirk Q11);
`clip_by_global_norm_torch` is exposed so the trainer can reproduce that, while `make_optimizer` clips the final
accumulated gradient (identical when there is no accumulation).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULERS = ("constant", "linear", "inv_sqrt", "cosine", "wsd")


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Optimizer fields, with the values of the shipped BLT configs (debug.yaml / entropy_model.yaml)."""
  cfg = ml_collections.ConfigDict()
  cfg.lr = 4e-4  # peak learning rate
  cfg.weight_decay = 0.1  # decoupled (AdamW), on every parameter, norms and embeddings included
  cfg.eps = 1e-8
  cfg.beta1 = 0.9
  cfg.beta2 = 0.95
  cfg.clip = 10.0  # max global gradient norm; <= 0 disables clipping
  cfg.scheduler = "cosine"  # one of SCHEDULERS
  cfg.warmup = 500  # linear warmup steps, starting from lr 0 at the first update
  cfg.lr_min_ratio = 0.1  # final lr = lr * lr_min_ratio
  cfg.cycle_length = 1.0  # cosine period as a fraction of n_steps
  cfg.cosine_theta = 1.0  # cosine progress exponent: cos(pi * s**theta / cycle_length)
  cfg.exp_factor = 0.5  # inv_sqrt exponent
  cfg.decay_fraction = 0.1  # wsd: fraction of each cycle spent decaying
  return cfg


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  try:
    value = cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


def lr_factor_fn(opt_cfg: Any, n_steps: Optional[int] = None) -> Callable[[Any], jnp.ndarray]:
  """step -> multiplier of `opt_cfg.lr`, the reference's `build_lr_fn` in jnp (jit-safe, float32)."""
  scheduler = _get(opt_cfg, "scheduler", "cosine")
  if scheduler not in SCHEDULERS:
    raise ValueError(f"optimizer.scheduler={scheduler!r}: expected one of {SCHEDULERS}")
  n_steps = n_steps if n_steps is not None else _get(opt_cfg, "n_steps")
  if n_steps is None and scheduler in ("linear", "cosine", "wsd"):
    raise ValueError(f"scheduler {scheduler!r} needs n_steps (the total number of optimizer steps)")
  warmup = int(_get(opt_cfg, "warmup", 0))
  min_ratio = float(_get(opt_cfg, "lr_min_ratio", 0.1))
  cycle = float(_get(opt_cfg, "cycle_length", 1.0))
  theta = float(_get(opt_cfg, "cosine_theta", 1.0))
  exp_factor = float(_get(opt_cfg, "exp_factor", 0.5))
  decay_fraction = float(_get(opt_cfg, "decay_fraction", 0.1))
  if n_steps is not None:
    n_steps = int(n_steps)
  if scheduler == "wsd" and decay_fraction >= cycle:
    raise ValueError(f"wsd needs decay_fraction ({decay_fraction}) < cycle_length ({cycle})")
  # Denominators of branches that are masked out anyway; keeps them finite when warmup is 0 or n_steps == warmup.
  warm_den = float(max(warmup, 1))
  decay_den = float(max((n_steps or 0) - warmup, 1))

  def warm(step):
    return step / warm_den

  def constant(step):
    # The reference's "constant" is `lambda x: 1.0`: no warmup.
    return jnp.ones_like(step)

  def linear(step):
    s = (step - warmup) / decay_den
    after = jnp.where(step <= n_steps, s * min_ratio + (1 - s), min_ratio)
    return jnp.where(step < warmup, warm(step), after)

  def inv_sqrt(step):
    decayed = jnp.maximum(warmup**exp_factor / jnp.maximum(step, 1.0) ** exp_factor, min_ratio)
    return jnp.where(step < warmup, warm(step), decayed)

  def cosine(step):
    # Sign flips on odd cycles (only reachable for cycle_length < 1, or exactly at step == n_steps).
    sign = jnp.where(jnp.floor(step / (n_steps * cycle)) % 2 == 1, -1.0, 1.0)
    s = (step - warmup) / decay_den
    s = jnp.clip(s, 0.0, None)  # keeps s**theta real in the masked warmup branch
    decay = min_ratio + 0.5 * (1 - min_ratio) * (sign * jnp.cos(jnp.pi * s**theta / cycle) + 1)
    after = jnp.where(step <= n_steps, decay, min_ratio)
    return jnp.where(step < warmup, warm(step), after)

  def wsd(step):
    period = float(int(n_steps * cycle))
    cycle_num = jnp.floor(step / period) + 1
    cur = period * cycle_num
    decay_len = jnp.floor(cur * decay_fraction)
    t = step - (cur - decay_len)
    decayed = 1 / ((t / cur) * (1 / min_ratio) + (1 - t / cur))
    out = jnp.where(step <= cur - decay_len, 1.0, jnp.where(step <= cur, decayed, min_ratio))
    return jnp.where(step < warmup, warm(step), out)

  fn = {"constant": constant, "linear": linear, "inv_sqrt": inv_sqrt, "cosine": cosine, "wsd": wsd}[scheduler]

  def factor(step):
    return fn(jnp.asarray(step, jnp.float32))

  return factor


def lr_schedule(opt_cfg: Any, n_steps: Optional[int] = None) -> optax.Schedule:
  """count -> learning rate (`opt_cfg.lr * factor`); `n_steps` defaults to `opt_cfg.n_steps` if present."""
  lr = float(_get(opt_cfg, "lr"))
  factor = lr_factor_fn(opt_cfg, n_steps)
  return lambda count: lr * factor(count)


def global_norm(tree: Any) -> jnp.ndarray:
  """L2 norm over all leaves (optax.tree.norm where it exists; optax.global_norm is deprecated)."""
  tree_lib = getattr(optax, "tree", None)
  if tree_lib is not None and hasattr(tree_lib, "norm"):
    return tree_lib.norm(tree)
  return optax.global_norm(tree)


def clip_by_global_norm_torch(grads: Any, max_norm: float) -> Any:
  """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6)), always in float32."""
  norm = global_norm(grads)
  scale = jnp.minimum(1.0, max_norm / (norm.astype(jnp.float32) + 1e-6))
  return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)


class _ClipState(NamedTuple):
  pass


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax transformation of `clip_by_global_norm_torch` (optax's own differs by the 1e-6 and the branch)."""

  def init_fn(params):
    del params
    return _ClipState()

  def update_fn(updates, state, params=None):
    del params
    return clip_by_global_norm_torch(updates, max_norm), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(opt_cfg: Any, n_steps: Optional[int] = None) -> optax.GradientTransformation:
  """Clip (if `opt_cfg.clip > 0`) then AdamW with weight decay on every parameter, under `lr_schedule`.

  optax's adamw equals torch's: decoupled decay `p -= lr * wd * p` and `m_hat / (sqrt(v_hat) + eps)`.
  """
  clip = float(_get(opt_cfg, "clip", 0.0))
  adamw = optax.adamw(
      learning_rate=lr_schedule(opt_cfg, n_steps),
      b1=float(_get(opt_cfg, "beta1", 0.9)),
      b2=float(_get(opt_cfg, "beta2", 0.95)),
      eps=float(_get(opt_cfg, "eps", 1e-8)),
      weight_decay=float(_get(opt_cfg, "weight_decay", 0.0)),
      mask=None,  # one param group in the reference: decay everything
  )
  if clip > 0:
    return optax.chain(torch_clip_by_global_norm(clip), adamw)
  return adamw
