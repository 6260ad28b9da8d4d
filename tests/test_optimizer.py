"""Learning-rate schedules, AdamW with decay on every parameter, and torch-style clipping (spec 13.1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import optimizer


def _cfg(**overrides):
  cfg = optimizer.default_optimizer_config()
  cfg.update(overrides)
  return cfg


def _eval(sched, steps):
  """Schedule values at `steps`, in one compiled call (eager jnp dispatch is slow on emulated devices)."""
  return np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(list(steps), jnp.int32)))


def _check(sched, hand, rtol=1e-6, atol=1e-7):
  got = _eval(sched, hand.keys())
  for (step, want), value in zip(hand.items(), got):
    np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=f"step {step}")


def _ref_cosine(step, warmup, n_steps, cycle, theta, min_ratio):
  """The reference's `lr_cosine`, transcribed in plain Python."""
  sign = ((step // (n_steps * cycle)) % 2) * -2 + 1
  if step < warmup:
    return step / warmup
  if step <= n_steps:
    s = (step - warmup) / (n_steps - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (sign * math.cos(math.pi * s**theta / cycle) + 1)
  return min_ratio


def test_default_config():
  cfg = optimizer.default_optimizer_config()
  assert (cfg.lr, cfg.weight_decay, cfg.eps, cfg.beta1, cfg.beta2, cfg.clip) == (4e-4, 0.1, 1e-8, 0.9, 0.95, 10.0)
  assert (cfg.scheduler, cfg.warmup, cfg.lr_min_ratio, cfg.cycle_length, cfg.cosine_theta) == (
      "cosine",
      500,
      0.1,
      1.0,
      1.0,
  )


def test_cosine_schedule_hand_values():
  sched = optimizer.lr_schedule(_cfg(), n_steps=10500)  # 10000 decay steps after 500 warmup
  lr = 4e-4
  hand = {
      0: 0.0,  # first update uses lr 0 (Q10)
      250: lr * 0.5,
      499: lr * 499 / 500,
      500: lr,  # warmup done: cos(0) = 1
      5500: lr * (0.1 + 0.45),  # half way: cos(pi/2) = 0
      10499: lr * (0.1 + 0.45 * (math.cos(math.pi * 9999 / 10000) + 1)),
      20000: lr * 0.1,  # beyond n_steps: min ratio
  }
  # The reference's sign flip makes exactly step == n_steps jump back to lr (never used for an update:
  # LambdaLR evaluates steps 0 .. n_steps-1 during training).
  hand[10500] = lr
  _check(sched, hand, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "warmup,n_steps,cycle,theta,ratio", [(10, 100, 1.0, 1.0, 0.1), (0, 50, 0.5, 2.0, 0.0), (5, 40, 0.3, 0.5, 0.2)]
)
def test_cosine_matches_reference_formula(warmup, n_steps, cycle, theta, ratio):
  cfg = _cfg(warmup=warmup, cycle_length=cycle, cosine_theta=theta, lr_min_ratio=ratio, lr=1.0)
  steps = np.arange(0, n_steps + 20)
  got = _eval(optimizer.lr_schedule(cfg, n_steps), steps)
  want = [_ref_cosine(int(s), warmup, n_steps, cycle, theta, ratio) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_other_schedules():
  lin = optimizer.lr_schedule(_cfg(scheduler="linear", lr=1.0, warmup=10, lr_min_ratio=0.2), n_steps=110)
  _check(lin, {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.6, 110: 0.2, 500: 0.2})
  inv = optimizer.lr_schedule(_cfg(scheduler="inv_sqrt", lr=1.0, warmup=100, lr_min_ratio=0.1))
  _check(inv, {0: 0.0, 50: 0.5, 100: 1.0, 400: 0.5, 10000: 0.1, 10**6: 0.1})
  wsd = optimizer.lr_schedule(
      _cfg(scheduler="wsd", lr=1.0, warmup=10, lr_min_ratio=0.1, decay_fraction=0.1), n_steps=100
  )
  # Decay over the last 10% of each cycle: 1 / ((t/100) * 10 + 1 - t/100); step 100 starts the next cycle.
  _check(wsd, {5: 0.5, 50: 1.0, 90: 1.0, 95: 1 / 1.45, 99: 1 / 1.81, 100: 1.0}, rtol=1e-5)
  const = optimizer.lr_schedule(_cfg(scheduler="constant", lr=3.0, warmup=100))
  assert float(const(0)) == 3.0  # the reference's constant schedule ignores warmup
  with pytest.raises(ValueError, match="needs n_steps"):
    optimizer.lr_schedule(_cfg(scheduler="cosine"))
  with pytest.raises(ValueError, match="expected one of"):
    optimizer.lr_schedule(_cfg(scheduler="step"), n_steps=10)


def _params():
  return {
      "dense": {"kernel": jnp.full((3, 2), 2.0)},
      "norm": {"scale": jnp.ones((2,))},
      "embed": jnp.full((4, 2), -1.0),
  }


def test_weight_decay_applies_to_every_param():
  cfg = _cfg(scheduler="constant", lr=0.1, weight_decay=0.5, clip=0.0)
  tx = optimizer.make_optimizer(cfg)
  params = _params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
  # With zero gradients the Adam term is 0, so the update is exactly -lr * wd * p, on norms and embeddings too.
  for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 * np.asarray(p), rtol=1e-6)


def test_first_update_is_zero_and_adam_matches_torch_formula():
  cfg = _cfg(lr=1e-2, warmup=2, weight_decay=0.1, clip=0.0)
  tx = optimizer.make_optimizer(cfg, n_steps=10)
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: 0.3 * jnp.ones_like(p), params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, state = update(grads, state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))
  # Step 2 (count 1): lr factor 1/2; torch AdamW: p*lr*wd + lr * m_hat / (sqrt(v_hat) + eps).
  updates, state = update(grads, state, params)
  lr = 1e-2 * 0.5
  m_hat = 0.3  # constant gradient: bias-corrected moments equal g and g^2
  for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)):
    want = -(lr * 0.1 * np.asarray(p) + lr * m_hat / (math.sqrt(m_hat**2) + 1e-8))
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5)


def test_clipping():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0]])}  # global norm 5
  clip = jax.jit(optimizer.clip_by_global_norm_torch, static_argnums=1)
  clipped = clip(grads, 1.0)
  np.testing.assert_allclose(float(optimizer.global_norm(clipped)), 5.0 / (5.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["a"]), np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)
  unclipped = clip(grads, 10.0)
  np.testing.assert_allclose(np.asarray(unclipped["a"]), [3.0, 4.0])

  # Through the optimizer: SGD-like check with a huge gradient on one leaf; clipping bounds the first moment.
  cfg = _cfg(scheduler="constant", lr=1.0, weight_decay=0.0, clip=1.0, beta1=0.0, beta2=0.0, eps=0.0)
  params = {"a": jnp.zeros((2,)), "b": jnp.zeros((1, 1))}
  tx = optimizer.make_optimizer(cfg)
  chain_state = tx.init(params)
  big = {"a": jnp.array([300.0, 400.0]), "b": jnp.array([[0.0]])}
  _, chain_state = jax.jit(tx.update)(big, chain_state, params)
  mu = chain_state[1][0].mu  # (clip, adamw(...)) -> adamw chain -> ScaleByAdamState
  np.testing.assert_allclose(float(optimizer.global_norm(mu)), 1.0, rtol=1e-5)
  # clip <= 0 disables clipping.
  tx = optimizer.make_optimizer(_cfg(scheduler="constant", clip=0.0, beta1=0.0))
  _, state = jax.jit(tx.update)(big, tx.init(params), params)
  np.testing.assert_allclose(float(optimizer.global_norm(state[0].mu)), 500.0, rtol=1e-5)


def test_jittable_with_int_count():
  tx = optimizer.make_optimizer(_cfg(), n_steps=1000)
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  updates, state = step(params, state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree_util.tree_leaves(updates))
