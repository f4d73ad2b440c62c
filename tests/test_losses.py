"""Losses: DMD2 distribution matching, denoising, GAN, regression, ADM / ADP helpers.

Every expected value is written out by hand (or in numpy) independently of the code.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adm_jax import losses as L
from adm_jax import parameterization as P

SHAPES = [(3, 4, 4, 2), (3, 2, 4, 4, 2)]          # image [B,H,W,C] and video [B,T,H,W,C]
PARAM_NAMES = ["epsilon", "v_prediction", "flow"]


def _rand(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _make(name):
  return P.make("flow", shift=3.0) if name == "flow" else P.make(name)


def _times(param, n, seed):
  rng = np.random.default_rng(seed)
  if param.schedule.is_vp:
    return rng.integers(20, 981, n).astype(np.float32)
  return rng.uniform(0.05, 0.95, n).astype(np.float32)


# ---------------------------------------------------------------------------------------
# dm_loss.
# ---------------------------------------------------------------------------------------


def _expected_dm_direction(x, r, f):
  """numpy: (x0_fake - x0_real) / mean_{non-batch}|x - x0_real| per sample."""
  x, r, f = (np.asarray(a, np.float64) for a in (x, r, f))
  norm = np.abs(x - r).reshape(x.shape[0], -1).mean(1)
  return (f - r) / norm.reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_dm_loss_gradient_and_value(shape):
  x, r, f = _rand(0, shape), _rand(1, shape), _rand(2, shape)
  direction = _expected_dm_direction(x, r, f)
  numel = x.size

  g = jax.grad(lambda x_: L.dm_loss(x_, r, f)[0])(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), direction / numel, rtol=1e-5, atol=1e-9)

  loss, aux = jax.jit(L.dm_loss)(x, r, f)
  np.testing.assert_allclose(float(loss), 0.5 * np.mean(direction ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_dm"]), float(loss))
  np.testing.assert_allclose(float(aux["dm_grad_norm"]), np.mean(np.abs(direction)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(aux["dm_grad_l2"]), np.sqrt(np.sum(direction ** 2)),
                             rtol=1e-5)
  norm = np.abs(x - r).reshape(shape[0], -1).mean(1)
  np.testing.assert_allclose(float(aux["dm_normalizer"]), norm.mean(), rtol=1e-5)


def test_dm_loss_normaliser_is_per_sample():
  # Scaling one sample's (x - x0_real) by 10 divides only that sample's direction by 10.
  shape = (2, 3, 3, 2)
  x, r, f = _rand(3, shape), _rand(4, shape), _rand(5, shape)
  r2 = r.copy()
  r2[1] = x[1] - 10.0 * (x[1] - r[1])
  f2 = f.copy()
  f2[1] = r2[1] + (f[1] - r[1])                     # same x0_fake - x0_real
  g1, _ = L.dm_grad(x, r, f)
  g2, _ = L.dm_grad(x, r2, f2)
  np.testing.assert_allclose(np.asarray(g2[0]), np.asarray(g1[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g2[1]), np.asarray(g1[1]) / 10.0, rtol=1e-4)


def test_dm_loss_descends_towards_real():
  # With x0_fake = x, descent moves x towards x0_real.
  shape = (2, 4, 4, 2)
  x, r = _rand(6, shape), _rand(7, shape)
  g = jax.grad(lambda x_: L.dm_loss(x_, r, x)[0])(jnp.asarray(x))
  x_new = x - 0.1 * x.size * np.asarray(g)           # a 0.1 step along the direction
  assert np.sum((x_new - r) ** 2) < np.sum((x - r) ** 2)


def test_dm_loss_constants_get_no_gradient():
  shape = (2, 3, 3, 2)
  x, r, f = _rand(8, shape), _rand(9, shape), _rand(10, shape)
  gr, gf = jax.grad(lambda r_, f_: L.dm_loss(x, r_, f_)[0], argnums=(0, 1))(r, f)
  assert np.all(np.asarray(gr) == 0) and np.all(np.asarray(gf) == 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_dm_loss_zero_when_real_equals_fake(shape):
  x, r = _rand(11, shape), _rand(12, shape)
  loss, aux = L.dm_loss(x, r, r)
  g = jax.grad(lambda x_: L.dm_loss(x_, r, r)[0])(jnp.asarray(x))
  assert float(loss) == 0.0 and float(aux["dm_grad_norm"]) == 0.0
  assert np.all(np.asarray(g) == 0)


def test_dm_loss_nan_to_num_when_normaliser_zero():
  shape = (2, 3, 3, 2)
  x, r, f = _rand(13, shape), _rand(14, shape), _rand(15, shape)
  # Sample 0: x == x0_real == x0_fake -> 0 / 0 = NaN -> 0.
  r[0] = x[0]
  f[0] = x[0]
  grad, norm = L.dm_grad(x, r, f)
  assert float(norm[0]) == 0.0
  assert np.all(np.asarray(grad[0]) == 0.0)
  np.testing.assert_allclose(np.asarray(grad[1]),
                             _expected_dm_direction(x[1:], r[1:], f[1:])[0], rtol=1e-5)
  loss, _ = L.dm_loss(x, r, f)
  g = jax.grad(lambda x_: L.dm_loss(x_, r, f)[0])(jnp.asarray(x))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
  # Sample 0 with x0_fake != x0_real: ±inf -> ±float32 max (torch.nan_to_num).
  f[0] = x[0] + 1.0
  grad, _ = L.dm_grad(x, r, f)
  assert np.all(np.asarray(grad[0]) == np.finfo(np.float32).max)


def test_dm_loss_casts_to_float32():
  shape = (2, 3, 3, 2)
  x, r, f = (jnp.asarray(_rand(s, shape), jnp.bfloat16) for s in (16, 17, 18))
  loss, _ = L.dm_loss(x, r, f)
  assert loss.dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Denoising / fake-score loss.
# ---------------------------------------------------------------------------------------


def test_denoising_loss_matches_numpy():
  shape = (3, 2, 4, 4, 2)
  p, t = _rand(20, shape), _rand(21, shape)
  np.testing.assert_allclose(float(L.denoising_loss(p, t)), np.mean((p - t) ** 2),
                             rtol=1e-6)
  w = np.array([1.0, 0.0, 2.0], np.float32)
  per = ((p - t) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(float(L.denoising_loss(p, t, w)), np.mean(w * per),
                             rtol=1e-6)


def _oracle_fns(param, x0, eps, t):
  """Two oracle fake scores: one that returns param.target exactly (knows x0, eps, t),
  one that only knows x0 and recovers t from the model time and x_t."""
  def exact(params, x_t, mt, cond):
    del params, x_t, mt, cond
    return param.target(x0, eps, t)

  def from_x_t(params, x_t, mt, cond):
    del params, cond
    if param.schedule.is_vp:
      t_rec = mt
    else:
      t_rec = param.schedule.sigma_to_t(mt / param.schedule.num_train_timesteps)
    return param.from_x0(x0, x_t, t_rec)

  return exact, from_x_t


@pytest.mark.parametrize("name", PARAM_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_score_loss_zero_for_oracle(name, shape):
  param = _make(name)
  x0, eps = _rand(22, shape), _rand(23, shape)
  t = _times(param, shape[0], 24)
  exact, from_x_t = _oracle_fns(param, x0, eps, t)

  loss = L.fake_score_loss(exact, None, x0, eps, t, None, param)
  assert float(loss) == 0.0
  loss = L.fake_score_loss(from_x_t, None, x0, eps, t, None, param)
  assert float(loss) < 1e-8

  # A wrong output is penalised: output + 0.1 everywhere -> loss = 0.01.
  wrong = lambda *a: exact(*a) + 0.1
  np.testing.assert_allclose(float(L.fake_score_loss(wrong, None, x0, eps, t, None,
                                                     param)), 0.01, rtol=1e-4)
  # A model that is right for the wrong time is penalised too.
  shifted = lambda p_, x_t, mt, c: from_x_t(p_, x_t, mt * 0.5, c)
  assert float(L.fake_score_loss(shifted, None, x0, eps, t, None, param)) > 1e-3


def test_fake_score_loss_gradients():
  # Gradient reaches params, not x0 (stop-gradient on generator samples).
  param = _make("v_prediction")
  shape = (2, 4, 4, 2)
  x0, eps = _rand(25, shape), _rand(26, shape)
  t = _times(param, 2, 27)
  apply_fn = lambda w, x_t, mt, cond: w * x_t                        # toy "network"
  gw, gx0 = jax.grad(lambda w, x0_: L.fake_score_loss(apply_fn, w, x0_, eps, t, None,
                                                      param), argnums=(0, 1))(
                                                          jnp.float32(0.3), x0)
  assert float(gw) != 0.0
  assert np.all(np.asarray(gx0) == 0.0)


# ---------------------------------------------------------------------------------------
# GAN losses.
# ---------------------------------------------------------------------------------------

D_REAL = np.array([2.0, 0.5], np.float32)
D_FAKE = np.array([-3.0, 0.2], np.float32)


def test_hinge_hand_values():
  # relu(1 - [2, .5]) = [0, .5] -> .25 ; relu(1 + [-3, .2]) = [0, 1.2] -> .6
  np.testing.assert_allclose(float(L.hinge_d(D_REAL, D_FAKE)), 0.85, rtol=1e-6)
  # -mean([-3, .2]) = 1.4
  np.testing.assert_allclose(float(L.hinge_g(D_FAKE)), 1.4, rtol=1e-6)


def test_nonsaturating_is_log_sigmoid():
  sig = lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
  d_expected = -np.mean(np.log(sig(D_REAL))) - np.mean(np.log(1.0 - sig(D_FAKE)))
  g_expected = -np.mean(np.log(sig(D_FAKE)))
  np.testing.assert_allclose(float(L.gan_d_nonsaturating(D_REAL, D_FAKE)), d_expected,
                             rtol=1e-6)
  np.testing.assert_allclose(float(L.gan_g_nonsaturating(D_FAKE)), g_expected,
                             rtol=1e-6)
  # Hand value: softplus(0) = log 2 for each of the D terms at logits 0.
  z = np.zeros(3, np.float32)
  np.testing.assert_allclose(float(L.gan_d_nonsaturating(z, z)), 2 * math.log(2),
                             rtol=1e-6)


def test_nonsaturating_uneven_batches():
  # Real and fake terms are averaged separately (upstream: two torch.mean).
  real, fake = np.array([1.0], np.float32), np.array([0.0, 2.0, -1.0], np.float32)
  sp = lambda z: np.log1p(np.exp(z.astype(np.float64)))
  np.testing.assert_allclose(float(L.gan_d_nonsaturating(real, fake)),
                             sp(fake).mean() + sp(-real).mean(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_gan_gradient_signs(kind):
  d_fn, g_fn = L.GAN_LOSSES[kind]
  real = jnp.array([0.3, -0.4])                # inside the hinge margins
  fake = jnp.array([-0.2, 0.5])
  # G loss falls as D_fake rises.
  assert np.all(np.asarray(jax.grad(g_fn)(fake)) < 0)
  # D loss falls as D_real rises and rises with D_fake.
  g_real, g_fake = jax.grad(d_fn, argnums=(0, 1))(real, fake)
  assert np.all(np.asarray(g_real) < 0) and np.all(np.asarray(g_fake) > 0)


def test_gan_registry():
  assert L.GAN_LOSSES["hinge"] == (L.hinge_d, L.hinge_g)
  assert L.GAN_LOSSES["nonsaturating"] == (L.gan_d_nonsaturating, L.gan_g_nonsaturating)
  assert L.get_gan_loss("hinge") is L.GAN_LOSSES["hinge"]
  with pytest.raises(ValueError, match="hinge"):
    L.get_gan_loss("wgan")


def test_weighted_hinge_hand_values():
  real = {"latent": D_REAL, "pixel": np.array([-0.5, 1.5], np.float32)}
  fake = {"latent": D_FAKE, "pixel": np.array([0.5, -2.0], np.float32)}
  w = {"latent": 0.85, "pixel": 0.15}
  # latent: .25 + .6 = .85 ; pixel: mean(relu(1 - [-.5, 1.5])) = .75,
  #                                 mean(relu(1 + [.5, -2]))  = .75 -> 1.5
  # L_D = .85 * .85 + .15 * 1.5 = .9475
  np.testing.assert_allclose(float(L.weighted_hinge_d(real, fake, w)), 0.9475, rtol=1e-6)
  # L_G = -(.85 * mean([-3, .2]) + .15 * mean([.5, -2])) = -(-1.19 - .1125) = 1.3025
  np.testing.assert_allclose(float(L.weighted_hinge_g(fake, w)), 1.3025, rtol=1e-6)
  # Defaults are ADP's λ1 = 0.85 (latent), λ2 = 0.15 (pixel).
  np.testing.assert_allclose(float(L.weighted_hinge_d(real, fake)), 0.9475, rtol=1e-6)
  np.testing.assert_allclose(float(L.weighted_hinge_g(fake)), 1.3025, rtol=1e-6)


def test_weighted_hinge_heads_and_errors():
  # A list of per-head logits averages the per-head hinge terms.
  heads = [np.array([2.0, 0.5], np.float32), np.array([0.0, 0.0], np.float32)]
  fakes = [np.array([-3.0, 0.2], np.float32), np.array([1.0, 1.0], np.float32)]
  got = L.weighted_hinge_d({"a": heads}, {"a": fakes}, {"a": 1.0})
  # head 0: .85 ; head 1: relu(1 - 0) = 1 plus relu(1 + 1) = 2 -> 3 ; mean = 1.925
  np.testing.assert_allclose(float(got), 1.925, rtol=1e-6)
  np.testing.assert_allclose(float(L.weighted_hinge_g({"a": fakes}, {"a": 2.0})),
                             2.0 * 0.5 * (1.4 - 1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="keys"):
    L.weighted_hinge_d({"latent": D_REAL}, {"latent": D_FAKE})


# ---------------------------------------------------------------------------------------
# Regression.
# ---------------------------------------------------------------------------------------


def test_regression_mse_matches_numpy():
  shape = (3, 4, 4, 2)
  p, t = _rand(30, shape), _rand(31, shape)
  np.testing.assert_allclose(float(L.regression_loss(p, t)), np.mean((p - t) ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(L.mse_per_sample(p, t)),
                             ((p - t) ** 2).reshape(3, -1).mean(1), rtol=1e-6)


def test_pseudo_huber_limits_and_default_c():
  shape = (2, 3, 4, 4, 2)
  d_elems = 3 * 4 * 4 * 2
  assert L.default_huber_c(np.zeros(shape)) == pytest.approx(0.00054 * math.sqrt(d_elems))
  # iCT: CIFAR-10 (d = 3 * 32 * 32) gives c ≈ 0.03.
  assert L.default_huber_c(np.zeros((1, 32, 32, 3))) == pytest.approx(0.0299, abs=1e-4)

  direction = _rand(32, shape)
  direction /= np.linalg.norm(direction.reshape(2, -1), axis=1).reshape(2, 1, 1, 1, 1)
  t = np.zeros(shape, np.float32)
  c = 1.0
  # Small ||d|| = 1e-2: ≈ ||d||² / (2c) = 5e-5.
  small = L.regression_loss(1e-2 * direction, t, "pseudo_huber", huber_c=c)
  np.testing.assert_allclose(float(small), 0.5 * 1e-4 / c, rtol=1e-3)
  # Large ||d|| = 1e4: ≈ ||d|| - c.
  large = L.regression_loss(1e4 * direction, t, "pseudo_huber", huber_c=c)
  np.testing.assert_allclose(float(large), 1e4 - c, rtol=1e-6)
  # Exact formula with the default c, per sample.
  p = _rand(33, shape)
  c0 = 0.00054 * math.sqrt(d_elems)
  sq = (p.astype(np.float64) ** 2).reshape(2, -1).sum(1)
  np.testing.assert_allclose(np.asarray(L.pseudo_huber_per_sample(p, t)),
                             np.sqrt(sq + c0 ** 2) - c0, rtol=1e-5)
  np.testing.assert_allclose(float(L.regression_loss(p, t, "pseudo_huber")),
                             np.mean(np.sqrt(sq + c0 ** 2) - c0), rtol=1e-5)


def test_regression_weights_and_registry():
  shape = (2, 3, 3, 2)
  p, t = _rand(34, shape), _rand(35, shape)
  per = ((p - t) ** 2).reshape(2, -1).mean(1)
  w = np.array([0.25, 3.0], np.float32)
  np.testing.assert_allclose(float(L.regression_loss(p, t, "mse", weight=w)),
                             np.mean(w * per), rtol=1e-6)
  assert set(L.REGRESSION_LOSSES) == {"mse", "pseudo_huber"}
  with pytest.raises(ValueError, match="mse.*pseudo_huber"):
    L.regression_loss(p, t, "lpips")


# ---------------------------------------------------------------------------------------
# ADM ODE-step pair and ADP interpolation.
# ---------------------------------------------------------------------------------------


def test_adm_delta_t():
  assert L.adm_delta_t(P.make("epsilon").schedule) == 1000 / 64 == 15.625
  assert L.adm_delta_t(P.make("flow").schedule) == 1 / 64


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_ode_step_pair(name):
  param = _make(name)
  shape = (3, 2, 4, 4, 2)
  x0, eps, other = _rand(40, shape), _rand(41, shape), _rand(42, shape)
  t = _times(param, 3, 43)
  x_t = param.add_noise(x0, eps, t)
  x_real, x_fake, t_next = L.ode_step_pair(param, x_t, t, x0, other)
  dt = L.adm_delta_t(param.schedule)
  np.testing.assert_allclose(np.asarray(t_next), t - dt, rtol=1e-6)
  # A DDIM / Euler step with the true x0 keeps eps: lands on add_noise(x0, eps, t - dt).
  np.testing.assert_allclose(np.asarray(x_real),
                             np.asarray(param.add_noise(x0, eps, t - dt)), atol=2e-4)
  np.testing.assert_allclose(np.asarray(x_fake),
                             np.asarray(param.ode_step(x_t, other, t, t - dt)), atol=1e-6)
  assert np.abs(np.asarray(x_fake) - np.asarray(x_real)).max() > 1e-3


def test_ode_step_pair_clips_at_clean_end():
  param = _make("flow")
  shape = (2, 3, 3, 2)
  x0, eps = _rand(44, shape), _rand(45, shape)
  t = np.array([0.01, 0.5], np.float32)
  x_t = param.add_noise(x0, eps, t)
  x_real, _, t_next = L.ode_step_pair(param, x_t, t, x0, x0)
  np.testing.assert_allclose(np.asarray(t_next), [0.0, 0.5 - 1 / 64], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(x_real[0]), x0[0], atol=1e-5)


def test_rectified_flow_interp():
  shape = (3, 2, 4, 4, 2)
  noise, x0 = _rand(50, shape), _rand(51, shape)
  s = np.array([0.0, 1.0, 0.25], np.float32)
  x_s, v = L.rectified_flow_interp(noise, x0, s)
  np.testing.assert_allclose(np.asarray(x_s[0]), x0[0], atol=0)
  np.testing.assert_allclose(np.asarray(x_s[1]), noise[1], atol=0)
  np.testing.assert_allclose(np.asarray(x_s[2]), 0.75 * x0[2] + 0.25 * noise[2],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(v), noise - x0, atol=0)
  # v is d x_s / d s.
  _, dx = jax.jvp(lambda s_: L.rectified_flow_interp(noise, x0, s_)[0],
                  (jnp.asarray(s),), (jnp.ones(3),))
  np.testing.assert_allclose(np.asarray(dx), noise - x0, rtol=1e-6, atol=1e-6)
  # Same interpolant as the SD3 flow parameterisation with shift 1 (and its target).
  flow = P.make("flow", shift=1.0)
  np.testing.assert_allclose(np.asarray(flow.add_noise(x0, noise, s)), np.asarray(x_s),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(flow.target(x0, noise, s)), np.asarray(v),
                             atol=0)
