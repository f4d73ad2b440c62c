"""Tests for adm_jax.optim: schedule, clipping, weight decay, names, EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adm_jax import config_lib
from adm_jax import optim


def _cfg(**overrides):
  base = dict(name="adamw", lr=1e-2, warmup_steps=0, grad_clip=0.0, weight_decay=0.0,
              b1=0.9, b2=0.999)
  base.update(overrides)
  return config_lib.ConfigDict(base)


def _run(tx, params, grads_seq):
  """Applies ``grads_seq`` one update at a time; returns the params after each."""
  state, out = tx.init(params), []
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _manual_adamw(params, grads_seq, *, lr, b1, b2, eps, wd, clip):
  """Reference AdamW (decoupled decay, bias correction) with global-norm clipping."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for t, g in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    if clip:
      norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
      g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k]**2
      mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p[k])
    out.append(dict(p))
  return out


# --- learning rate -------------------------------------------------------------------


def test_warmup_is_linear_from_zero_then_constant():
  lr_fn = optim.learning_rate_fn(_cfg(lr=1e-3, warmup_steps=100))
  np.testing.assert_allclose([float(lr_fn(s)) for s in (0, 25, 50, 99, 100, 101, 10**6)],
                             [0.0, 2.5e-4, 5e-4, 9.9e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_no_warmup_is_constant():
  lr_fn = optim.learning_rate_fn(_cfg(lr=3e-4, warmup_steps=0))
  assert float(lr_fn(0)) == pytest.approx(3e-4)
  assert float(lr_fn(1000)) == pytest.approx(3e-4)


def test_delay_holds_lr_at_zero_then_warms_up():
  lr_fn = optim.learning_rate_fn(_cfg(lr=1e-3, warmup_steps=100, delay_steps=50))
  np.testing.assert_allclose([float(lr_fn(s)) for s in (0, 49, 50, 75, 149, 150, 10**6)],
                             [0.0, 0.0, 0.0, 2.5e-4, 9.9e-4, 1e-3, 1e-3], rtol=1e-6)
  lr_fn = optim.learning_rate_fn(_cfg(lr=1e-3, delay_steps=3))
  assert [float(lr_fn(s)) for s in (2, 3)] == [0.0, pytest.approx(1e-3)]
  # Weight decay is scaled by the learning rate: frozen params do not decay either.
  params = {"w": jnp.ones((4,))}
  frozen = _run(optim.make_optimizer(_cfg(delay_steps=2, weight_decay=0.1)), params,
                [{"w": jnp.full((4,), 3.0)}] * 3)
  np.testing.assert_array_equal(frozen[1]["w"], params["w"])
  assert np.all(np.asarray(frozen[2]["w"]) < 1.0)
  with pytest.raises(ValueError, match="delay_steps=-1"):
    optim.learning_rate_fn(_cfg(delay_steps=-1))


def test_dmd2_preset_defaults():
  cfg = config_lib.adamw(5e-7)
  lr_fn = optim.learning_rate_fn(cfg)
  assert float(lr_fn(0)) == 0.0
  assert float(lr_fn(250)) == pytest.approx(2.5e-7)
  assert float(lr_fn(500)) == pytest.approx(5e-7)
  assert (cfg.grad_clip, cfg.weight_decay, cfg.b1, cfg.b2) == (10.0, 0.01, 0.9, 0.999)
  params = {"w": jnp.ones((3,))}
  optim.make_optimizer(cfg).init(params)   # builds with the preset as is


def test_first_update_of_warmup_is_zero():
  params = {"w": jnp.ones((4,))}
  (after,) = _run(optim.make_optimizer(_cfg(warmup_steps=10)), params,
                  [{"w": jnp.full((4,), 3.0)}])
  np.testing.assert_array_equal(after["w"], params["w"])


# --- AdamW, clipping, weight decay -----------------------------------------------------


def _params_and_grads():
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32)}
  small = {k: 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  huge = {k: 1e6 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  return params, [small, huge, small]


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adamw_matches_manual_reference(clip):
  params, grads = _params_and_grads()
  cfg = _cfg(lr=1e-2, grad_clip=clip, weight_decay=0.05)
  got = _run(optim.make_optimizer(cfg), jax.tree.map(jnp.asarray, params), grads)
  want = _manual_adamw(params, grads, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.05,
                       clip=clip)
  for g, w in zip(got, want):
    for k in params:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_a_huge_gradient():
  """A huge gradient acts exactly like the same direction with norm ``grad_clip``."""
  params, (small, huge, _) = _params_and_grads()
  p0 = jax.tree.map(jnp.asarray, params)
  norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in huge.values()))
  rescaled = {k: (x / norm).astype(np.float32) for k, x in huge.items()}  # norm 1
  assert np.sqrt(sum(np.sum(x**2) for x in small.values())) < 1.0        # not clipped
  clipped = _run(optim.make_optimizer(_cfg(grad_clip=1.0)), p0, [small, huge])
  by_hand = _run(optim.make_optimizer(_cfg(grad_clip=0.0)), p0, [small, rescaled])
  unclipped = _run(optim.make_optimizer(_cfg(grad_clip=0.0)), p0, [small, huge])
  for k in params:
    np.testing.assert_allclose(clipped[1][k], by_hand[1][k], rtol=1e-5, atol=1e-7)
    # Each update is bounded by lr times Adam's bias-corrected ratio (< 4 here).
    assert np.max(np.abs(clipped[1][k] - clipped[0][k])) < 4 * 1e-2
  assert max(np.max(np.abs(unclipped[1][k] - by_hand[1][k])) for k in params) > 1e-4


def test_clip_none_means_no_clipping():
  params, grads = _params_and_grads()
  p0 = jax.tree.map(jnp.asarray, params)
  a = _run(optim.make_optimizer(_cfg(grad_clip=None)), p0, grads)
  b = _run(optim.make_optimizer(_cfg(grad_clip=0.0)), p0, grads)
  for x, y in zip(a, b):
    for k in params:
      np.testing.assert_array_equal(x[k], y[k])


def test_weight_decay_with_zero_gradient_shrinks_params():
  params = {"w": jnp.array([1.0, -2.0, 4.0])}
  zero = {"w": jnp.zeros(3)}
  (after,) = _run(optim.make_optimizer(_cfg(lr=0.1, weight_decay=0.5)), params, [zero])
  np.testing.assert_allclose(after["w"], params["w"] * (1 - 0.1 * 0.5), rtol=1e-6)
  (same,) = _run(optim.make_optimizer(_cfg(lr=0.1, weight_decay=0.0)), params, [zero])
  np.testing.assert_array_equal(same["w"], params["w"])


def test_adam_without_decay_and_name_errors():
  params = {"w": jnp.ones(2)}
  optim.make_optimizer(_cfg(name="adam")).init(params)
  with pytest.raises(ValueError, match="weight_decay"):
    optim.make_optimizer(_cfg(name="adam", weight_decay=0.01))
  with pytest.raises(ValueError, match=r"'sgd'.*'adamw', 'adam'"):
    optim.make_optimizer(_cfg(name="sgd"))


def test_works_on_nnx_state():
  _, params = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  tx = optim.make_optimizer(_cfg(grad_clip=1.0, weight_decay=0.01))
  grads = jax.tree.map(jnp.ones_like, params)
  (after,) = _run(tx, params, [grads])
  assert jax.tree.structure(after) == jax.tree.structure(params)


# --- EMA ---------------------------------------------------------------------------------


def test_ema_update_maths():
  ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
  new = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(0.0)}
  out = optim.ema_update(ema, new, 0.9)
  np.testing.assert_allclose(out["a"], [1.2, 1.8], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 3.6, rtol=1e-6)
  np.testing.assert_array_equal(optim.ema_update(ema, new, 1.0)["a"], ema["a"])
  np.testing.assert_array_equal(optim.ema_update(ema, new, 0.0)["a"], new["a"])
  np.testing.assert_array_equal(ema["a"], [1.0, 2.0])     # inputs untouched


def test_ema_keeps_dtype_and_jits_with_traced_decay():
  ema = {"w": jnp.ones(3, jnp.bfloat16)}
  new = {"w": jnp.zeros(3, jnp.float32)}
  out = jax.jit(optim.ema_update)(ema, new, jnp.float32(0.5))
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["w"].astype(jnp.float32), 0.5)
  # Repeated updates converge geometrically: decay**n of the gap remains.
  e = {"w": jnp.zeros(3)}
  for _ in range(10):
    e = optim.ema_update(e, {"w": jnp.ones(3)}, 0.5)
  np.testing.assert_allclose(e["w"], 1 - 0.5**10, rtol=1e-6)
