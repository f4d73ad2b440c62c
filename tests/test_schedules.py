"""Schedules, conversions, samplers and ODE steps: identities and diffusers parity."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adm_jax import parameterization as P
from adm_jax import schedules as S
from adm_jax.schedules import Schedule

try:  # parity tests only; the identities run without torch / diffusers
  import torch
  from diffusers import schedulers
except ImportError:  # pragma: no cover
  torch = schedulers = None

needs_diffusers = pytest.mark.skipif(schedulers is None, reason="needs torch + diffusers")

SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPES = [(3, 4, 4, 2), (3, 2, 4, 4, 2)]          # image [B,H,W,C] and video [B,T,H,W,C]


def _rand(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _all_params():
  return [P.make("epsilon"), P.make("v_prediction"),
          P.make("v_prediction", rescale_zero_snr=True, snr_shift_scale=3.0,
                 betas_float64=True),
          P.make("flow", shift=3.0), P.make("flow", shift=1.0)]


def _interior_times(param, n, seed):
  rng = np.random.default_rng(seed)
  if param.schedule.is_vp:
    return rng.uniform(20.0, 980.0, n).astype(np.float32)
  return rng.uniform(0.02, 0.98, n).astype(np.float32)


# -- the VP table -----------------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("kw", [
    dict(SDXL),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
])
def test_alphas_cumprod_matches_diffusers(kw):
  ref = schedulers.DDPMScheduler(num_train_timesteps=1000, **kw).alphas_cumprod.numpy()
  ours = S.vp_alphas_cumprod(1000, **kw)
  assert ours.dtype == np.float32 and ours.shape == (1000,)
  np.testing.assert_allclose(ours, ref, rtol=3e-7, atol=0)   # bit-equal on x86 CPU torch
  for cls in (schedulers.DDIMScheduler, schedulers.EulerDiscreteScheduler):
    np.testing.assert_allclose(ours, cls(**kw).alphas_cumprod.numpy(), rtol=3e-7, atol=0)


@needs_diffusers
@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0])
def test_cogvideox_table_matches_diffusers(snr_shift_scale):
  sch = schedulers.CogVideoXDDIMScheduler(
      rescale_betas_zero_snr=True, snr_shift_scale=snr_shift_scale, **SDXL)
  ref = sch.alphas_cumprod.numpy().astype(np.float32)
  cfg = dict(sch.config)
  cfg["_class_name"] = "CogVideoXDDIMScheduler"
  ours = S.schedule_from_diffusers_config(cfg)
  assert ours.betas_float64 and ours.rescale_zero_snr
  np.testing.assert_allclose(ours.alphas_cumprod, ref, rtol=3e-7, atol=0)
  assert ours.alphas_cumprod[-1] == 0.0            # zero terminal SNR


def test_vp_unit_variance_and_fractional_interpolation():
  sch = Schedule.vp()
  ac = sch.alphas_cumprod
  t_int = jnp.arange(1000)
  a, s = sch.alpha_sigma(t_int)
  np.testing.assert_allclose(np.asarray(a ** 2 + s ** 2), 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(a), np.sqrt(ac))
  # Fractional t at integer values agrees exactly with integer indexing.
  a_f, s_f = sch.alpha_sigma(t_int.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(a_f), np.asarray(a))
  np.testing.assert_array_equal(np.asarray(s_f), np.asarray(s))
  # Between neighbours, linear in ᾱ.
  t_frac = np.arange(999, dtype=np.float32) + np.float32(0.375)
  abar = np.asarray(S.vp_alphas_cumprod_at(t_frac, ac))
  assert np.all(abar < ac[:-1]) and np.all(abar > ac[1:])
  np.testing.assert_allclose(abar, 0.625 * ac[:-1] + 0.375 * ac[1:], rtol=1e-6)
  a_fr, s_fr = sch.alpha_sigma(t_frac)
  np.testing.assert_allclose(np.asarray(a_fr ** 2 + s_fr ** 2), 1.0, atol=1e-6)
  # t < 0: final ᾱ (1 with set_alpha_to_one, else ᾱ[0]); t > T-1 clips.
  a0, s0 = sch.alpha_sigma(jnp.array([-1, -1.0, 1e4]))
  np.testing.assert_array_equal(np.asarray(a0[:2]), 1.0)
  np.testing.assert_array_equal(np.asarray(s0[:2]), 0.0)
  assert float(a0[2]) == pytest.approx(float(np.sqrt(ac[-1])))
  sch2 = Schedule.vp(set_alpha_to_one=False)
  assert float(sch2.alpha_sigma(-1)[0] ** 2) == pytest.approx(float(ac[0]), rel=1e-6)


def test_snr_strictly_decreasing():
  for sch in (Schedule.vp(), Schedule.vp(rescale_zero_snr=True, snr_shift_scale=3.0,
                                         betas_float64=True)):
    for t in (jnp.arange(1000), jnp.linspace(0.0, 999.0, 4001)):
      ls = np.asarray(sch.log_snr(t))
      assert np.all(np.diff(ls) < 0)
    assert np.all(np.diff(np.asarray(sch.snr(jnp.arange(999)))) < 0)
  for shift in (1.0, 3.0):
    sch = Schedule.flow(shift)
    ls = np.asarray(sch.log_snr(jnp.linspace(0.001, 0.999, 2001)))
    assert np.all(np.diff(ls) < 0)
    a, s = sch.alpha_sigma(jnp.linspace(0.0, 1.0, 11))
    np.testing.assert_allclose(np.asarray(a + s), 1.0, atol=1e-7)


# -- conversions ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("param", _all_params(), ids=lambda p: f"{p.name}")
def test_parameterization_round_trips(param, shape):
  x0, eps = _rand(0, shape), _rand(1, shape)
  t = _interior_times(param, shape[0], 2)
  x_t = param.add_noise(x0, eps, t)
  a, s = param.alpha_sigma(t)
  np.testing.assert_allclose(
      np.asarray(x_t), np.asarray(S.bcast(a, x0) * x0 + S.bcast(s, x0) * eps), atol=1e-6)
  pred = param.target(x0, eps, t)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(param.to_x0(pred, x_t, t)), x0, **tol)
  np.testing.assert_allclose(np.asarray(param.to_eps(pred, x_t, t)), eps, **tol)
  np.testing.assert_allclose(np.asarray(param.from_x0(x0, x_t, t)), np.asarray(pred), **tol)


def test_generic_conversions():
  shape = SHAPES[1]
  x0, eps = _rand(3, shape), _rand(4, shape)
  # VP: eps <-> x0 <-> v.
  a, s = Schedule.vp().alpha_sigma(jnp.array([30.0, 500.5, 970.0]))
  x_t = S.add_noise(x0, eps, a, s)
  v = S.v_target(x0, eps, a, s)
  np.testing.assert_allclose(np.asarray(S.x0_to_v(x0, x_t, a, s)), np.asarray(v), atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.v_to_x0(v, x_t, a, s)), x0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.v_to_eps(v, x_t, a, s)), eps, atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.eps_to_x0(eps, x_t, a, s)), x0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.x0_to_eps(x0, x_t, a, s)), eps, atol=2e-5)
  # Flow: u = eps - x0 = d x_s / d s.
  sig = jnp.array([0.1, 0.5, 0.9])
  xs = S.add_noise(x0, eps, 1.0 - sig, sig)
  u = S.flow_target(x0, eps)
  np.testing.assert_allclose(np.asarray(S.flow_to_x0(u, xs, sig)), x0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.flow_to_eps(u, xs, sig)), eps, atol=2e-5)
  np.testing.assert_allclose(np.asarray(S.x0_to_flow(x0, xs, sig)), np.asarray(u), atol=1e-4)
  h = 1e-2
  fd = (S.add_noise(x0, eps, 1.0 - (sig + h), sig + h) - xs) / h
  np.testing.assert_allclose(np.asarray(fd), np.asarray(u), atol=1e-3)
  # VE sigma.
  sv = S.ve_sigma(a, s)
  a2, s2 = S.alpha_sigma_from_ve_sigma(sv)
  np.testing.assert_allclose(np.asarray(a2), np.asarray(a), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s2), np.asarray(s), rtol=1e-5)


def test_flow_shift_and_model_time():
  s = np.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(S.flow_unshift(S.flow_shift(s, 3.0), 3.0), s, atol=1e-12)
  sch = Schedule.flow(3.0)
  t = jnp.array([0.25, 0.5, 1.0])
  sig = S.flow_shift(np.asarray(t, np.float64), 3.0)
  np.testing.assert_allclose(np.asarray(sch.model_time(t)), sig * 1000, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sch.sigma_to_t(sig)), np.asarray(t), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(Schedule.vp().model_time(jnp.array([3, 7]))),
                                [3.0, 7.0])


# -- timestep grids ---------------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 25, 50])
def test_vp_timesteps_match_diffusers(spacing, n):
  for offset in (0, 1):
    ddim = schedulers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **SDXL)
    ddim.set_timesteps(n)
    np.testing.assert_array_equal(
        S.vp_timesteps(n, spacing, steps_offset=offset), ddim.timesteps.numpy())
    euler = schedulers.EulerDiscreteScheduler(timestep_spacing=spacing,
                                              steps_offset=offset, **SDXL)
    euler.set_timesteps(n)
    ours = S.vp_timesteps(n, spacing, steps_offset=offset, integer=False)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, euler.timesteps.numpy())


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 4, 28, 50])
def test_flow_sigmas_match_diffusers(shift, n):
  sch = schedulers.FlowMatchEulerDiscreteScheduler(shift=shift)
  sch.set_timesteps(n)
  np.testing.assert_array_equal(S.flow_sigmas(n, shift), sch.sigmas.numpy())
  times = Schedule.flow(shift).sampling_times(n)
  assert times[-1] == 0.0 and len(times) == n + 1
  np.testing.assert_allclose(np.asarray(Schedule.flow(shift).model_time(times[:-1])),
                             sch.timesteps.numpy(), rtol=1e-6)


def test_few_step_lists():
  np.testing.assert_array_equal(S.dmd2_timesteps(4), [999, 749, 499, 249])
  np.testing.assert_array_equal(S.dmd2_timesteps(1), [999])
  np.testing.assert_array_equal(S.dmd2_timesteps(2), [999, 499])
  np.testing.assert_array_equal(Schedule.vp().few_step_times(4), [999, 749, 499, 249])
  np.testing.assert_allclose(Schedule.flow(3.0).few_step_times(4), [1.0, 0.75, 0.5, 0.25])
  assert Schedule.vp().time_span / 64 == 15.625 and Schedule.flow().time_span == 1.0
  ts = Schedule.vp().sampling_times(4)
  np.testing.assert_array_equal(ts, [999, 749, 499, 249, -1])


# -- ODE steps vs diffusers ------------------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,n,alpha_one", [("trailing", 4, True), ("leading", 10, True),
                                                 ("trailing", 3, False)])
def test_ddim_step_matches_diffusers(prediction_type, spacing, n, alpha_one):
  ref = schedulers.DDIMScheduler(prediction_type=prediction_type, timestep_spacing=spacing,
                                 set_alpha_to_one=alpha_one, clip_sample=False, **SDXL)
  ref.set_timesteps(n)
  param = P.make(prediction_type, set_alpha_to_one=alpha_one)
  shape = SHAPES[0]
  for i, t in enumerate(ref.timesteps.numpy()):
    x, out = _rand(10 + i, shape), _rand(20 + i, shape)
    want = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x)).prev_sample.numpy()
    t_prev = t - 1000 // n                              # diffusers' DDIM previous step
    tb = np.full((shape[0],), t)
    got = param.ode_step(x, param.to_x0(out, x, tb), tb, np.full((shape[0],), t_prev))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@needs_diffusers
def test_cogvideox_ddim_step_matches_diffusers():
  ref = schedulers.CogVideoXDDIMScheduler(prediction_type="v_prediction",
                                          timestep_spacing="trailing",
                                          rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                          **SDXL)
  cfg = dict(ref.config)
  cfg["_class_name"] = "CogVideoXDDIMScheduler"
  param = P.from_diffusers_config(cfg)
  assert isinstance(param, P.VPrediction)
  ref.set_timesteps(5)
  shape = SHAPES[1]
  for i, t in enumerate(ref.timesteps.numpy()):       # starts at t = 999 (alpha = 0)
    x, out = _rand(30 + i, shape), _rand(40 + i, shape)
    want = ref.step(torch.from_numpy(out).double(), int(t),
                    torch.from_numpy(x).double()).prev_sample.numpy()
    tb = np.full((shape[0],), t)
    got = param.ode_step(x, param.to_x0(out, x, tb), tb, tb - 200)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_vp_euler_step_matches_diffusers(spacing):
  n = 7
  ref = schedulers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=1, **SDXL)
  ref.set_timesteps(n)
  sig = ref.sigmas.numpy()                            # [n + 1] VE sigmas, last 0
  shape = SHAPES[0]
  sample = torch.from_numpy(_rand(50, shape)) * ref.init_noise_sigma
  sch = Schedule.vp()
  for i, t in enumerate(ref.timesteps):
    x_t = ref.scale_model_input(sample, t)             # VP-scaled model input
    out = _rand(60 + i, shape)
    sample = ref.step(torch.from_numpy(out), t, sample).prev_sample
    a, s = S.alpha_sigma_from_ve_sigma(sig[i])
    a2, s2 = S.alpha_sigma_from_ve_sigma(sig[i + 1])
    x0 = S.eps_to_x0(out, x_t.numpy(), a, s)
    got = S.vp_euler_step(x_t.numpy(), x0, a, s, a2, s2)
    np.testing.assert_allclose(np.asarray(got / a2), sample.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(S.ddim_step(x_t.numpy(), x0, a, s, a2, s2)),
                               np.asarray(got), rtol=1e-5, atol=1e-5)
    if spacing == "trailing":                          # integer timesteps: our table
      tb, tn = float(t), (float(ref.timesteps[i + 1]) if i + 1 < n else -1.0)
      a_o, s_o = sch.alpha_sigma(tb)
      np.testing.assert_allclose(float(S.ve_sigma(a_o, s_o)), sig[i], rtol=1e-5)
      got2 = P.EpsilonVP(sch).ode_step(x_t.numpy(), x0, tb, tn)
      np.testing.assert_allclose(np.asarray(got2), np.asarray(got), rtol=1e-4, atol=1e-4)


@needs_diffusers
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_matches_diffusers(shift):
  n = 6
  ref = schedulers.FlowMatchEulerDiscreteScheduler(shift=shift)
  ref.set_timesteps(n)
  param = P.make("flow", shift=shift)
  times = param.schedule.sampling_times(n)
  shape = SHAPES[1]
  sample = torch.from_numpy(_rand(70, shape))
  for i, t in enumerate(ref.timesteps):
    x = sample.numpy()
    u = _rand(80 + i, shape)
    sample = ref.step(torch.from_numpy(u), t, sample).prev_sample
    sig = ref.sigmas.numpy()
    got = S.flow_euler_step(x, u, sig[i], sig[i + 1])
    np.testing.assert_allclose(np.asarray(got), sample.numpy(), rtol=1e-6, atol=1e-6)
    tb = np.full((shape[0],), times[i], np.float32)
    tn = np.full((shape[0],), times[i + 1], np.float32)
    got2 = param.ode_step(x, param.to_x0(u, x, tb), tb, tn)
    np.testing.assert_allclose(np.asarray(got2), sample.numpy(), rtol=1e-5, atol=1e-5)


# -- exact Gaussian score ---------------------------------------------------------------
#
# Data x0 ~ N(mu, s²) per dimension, x_t = a x0 + σ ε. Then x_t ~ N(a mu, V_t) with
# V_t = a² s² + σ², E[x0 | x_t] = mu + (a s² / V_t)(x_t - a mu), and the PF-ODE transports
# the standardised value: x_{t'} - a' mu = sqrt(V_{t'} / V_t) (x_t - a mu).
# One DDIM step with the exact posterior mean gives instead
#   x_{t'} - a' mu = (σ σ' + a a' s²) / V_t · (x_t - a mu),
# which is exact only when the SNRs at t and t' are equal (Cauchy-Schwarz); the error is
# O(Δ²) per step, so N steps converge to the closed form at rate O(1/N).


def _gauss_x0(x, a, sig, mu, s2):
  v = a * a * s2 + sig * sig
  return mu + (a * s2 / v) * (x - a * mu)


@pytest.mark.parametrize("param,t0,t1", [
    (P.make("epsilon"), 900.0, 100.0),
    (P.make("v_prediction", rescale_zero_snr=True, snr_shift_scale=3.0), 999.0, 50.0),
    (P.make("flow", shift=3.0), 0.95, 0.05),
    (P.make("flow", shift=1.0), 1.0, 0.1),
])
def test_ode_step_gaussian_closed_form(param, t0, t1):
  mu, s2 = 0.7, 0.3 ** 2
  x = jnp.asarray(_rand(90, (4, 3, 5, 5, 2)))              # [B, T, H, W, C]
  a0, g0 = param.alpha_sigma(t0)
  a1, g1 = param.alpha_sigma(t1)
  x = a0 * mu + jnp.sqrt(a0 ** 2 * s2 + g0 ** 2) * x       # a sample of the marginal at t0
  v0, v1 = a0 ** 2 * s2 + g0 ** 2, a1 ** 2 * s2 + g1 ** 2
  exact = a1 * mu + jnp.sqrt(v1 / v0) * (x - a0 * mu)
  # One step: the derived affine map, exactly.
  one = param.ode_step(x, _gauss_x0(x, a0, g0, mu, s2), t0, t1)
  factor = (g0 * g1 + a0 * a1 * s2) / v0
  np.testing.assert_allclose(np.asarray(one), np.asarray(a1 * mu + factor * (x - a0 * mu)),
                             rtol=1e-5, atol=1e-5)
  # N steps converge to the PF-ODE solution at first order.
  errs = []
  for n in (4, 16, 64, 256):
    ts = np.linspace(t0, t1, n + 1)
    y = x
    step = jax.jit(lambda y, t, tn: param.ode_step(
        y, _gauss_x0(y, *param.alpha_sigma(t), mu, s2), t, tn))
    for t, tn in zip(ts[:-1], ts[1:]):
      y = step(y, jnp.float32(t), jnp.float32(tn))
    errs.append(float(jnp.max(jnp.abs(y - exact))))
  assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
  assert errs[-1] < 0.05 * errs[0], errs
  assert errs[-2] / errs[-1] > 2.5, errs                    # ~4x per 4x steps


# -- samplers ---------------------------------------------------------------------------


def _ks(samples, cdf):
  x = np.sort(np.asarray(samples, np.float64))
  n = len(x)
  f = cdf(x)
  return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def test_samplers():
  key = jax.random.key(0)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  n = 20000
  crit = 1.95 / math.sqrt(n)                                 # KS at the 0.1% level
  t = np.asarray(S.sample_uniform_int(k1, n, 20, 980))
  assert t.dtype == np.int32 and t.min() == 20 and t.max() == 980
  u = np.asarray(S.sample_uniform(k2, n, 0.0, 1.0))
  assert u.min() >= 0.0 and u.max() < 1.0
  assert _ks(u, lambda x: x) < crit
  c = np.asarray(S.sample_cubic(k3, n, 1000.0))
  assert c.min() >= 0.0 and c.max() <= 1000.0
  assert _ks(c, lambda x: 1.0 - np.cbrt(1.0 - x / 1000.0)) < crit
  assert np.mean(c > 500.0) > 0.75                           # P(t > T/2) = 0.5^(1/3)
  ln = np.asarray(S.sample_logit_normal(k4, n, 0.5, 1.2))
  assert ln.min() > 0.0 and ln.max() < 1.0
  z = np.log(ln) - np.log1p(-ln)
  assert abs(z.mean() - 0.5) < 0.05 and abs(z.std() - 1.2) < 0.05
  sh = np.asarray(S.sample_shifted(k5, n, 3.0))
  assert sh.min() >= 0.0 and sh.max() <= 1.0
  assert _ks(sh, lambda x: S.flow_unshift(x, 3.0)) < crit


# -- guidance ---------------------------------------------------------------------------


def _toy_apply(calls):
  def apply_fn(params, x, mt, cond):
    calls.append(x.shape[0])
    tok = cond["tokens"].mean(axis=(1, 2))                  # [B]
    pooled = cond["pooled"].sum(-1)                         # [B]
    scal = (params["a"] * tok + params["b"] * pooled + 1e-3 * mt)
    return params["w"] * x + S.bcast(scal, x)
  return apply_fn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("param", [P.make("epsilon"), P.make("v_prediction"),
                                   P.make("flow", shift=3.0)], ids=lambda p: p.name)
def test_predict_x0_cfg(param, shape):
  b = shape[0]
  params = {"a": 0.5, "b": -0.25, "w": 0.9}
  cond = {"tokens": _rand(1, (b, 7, 6)), "pooled": _rand(2, (b, 5))}
  uncond = jax.tree.map(jnp.zeros_like, cond)               # SDXL: zeros
  x = _rand(3, shape)
  t = _interior_times(param, b, 4)
  calls = []
  fn = _toy_apply(calls)
  mt = param.model_time(t)
  out_c = fn(params, x, mt, cond)
  out_u = fn(params, x, mt, uncond)
  calls.clear()
  w = 7.5
  got = P.predict_x0(fn, params, x, t, cond, uncond, w, param=param)
  assert calls == [2 * b]                                   # one batched forward pass
  want = param.to_x0(out_u + w * (out_c - out_u), x, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for w_low in (1.0, 0.5, 0.0):                             # w <= 1: conditional only
    calls.clear()
    got = P.predict_x0(fn, params, x, t, cond, None, w_low, param=param)
    assert calls == [b]
    np.testing.assert_allclose(np.asarray(got), np.asarray(param.to_x0(out_c, x, t)),
                               rtol=1e-6, atol=1e-6)
  # A traced scale selects at run time.
  jitted = jax.jit(lambda w: P.predict_x0(fn, params, x, t, cond, uncond, w, param=param))
  np.testing.assert_allclose(np.asarray(jitted(jnp.float32(7.5))), np.asarray(want),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jitted(jnp.float32(0.5))),
                             np.asarray(param.to_x0(out_c, x, t)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    P.predict_x0(fn, params, x, t, cond, None, 2.0, param=param)


# -- registry, configs, jit -------------------------------------------------------------


@needs_diffusers
def test_registry_and_configs():
  assert set(P.PARAMETERIZATIONS) == {"epsilon", "v_prediction", "flow"}
  assert isinstance(P.make("epsilon"), P.EpsilonVP)
  assert P.make("flow", shift=3.0).schedule == Schedule.flow(3.0)
  with pytest.raises(ValueError):
    P.make("sample")
  with pytest.raises(ValueError):
    P.FlowVelocity(Schedule.vp())
  for cls, pred in [(schedulers.EulerDiscreteScheduler, "epsilon"),
                    (schedulers.DDIMScheduler, "v_prediction")]:
    cfg = dict(cls(prediction_type=pred, **SDXL).config)
    cfg["_class_name"] = cls.__name__
    p = P.from_diffusers_config(cfg)
    assert p.name == pred and p.schedule == Schedule.vp()
  cfg = dict(schedulers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
  cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
  assert P.from_diffusers_config(cfg) == P.make("flow", shift=3.0)


def test_jit_static_schedule():
  for param in _all_params():
    assert hash(param) == hash(type(param)(param.schedule))
    x0, eps = _rand(5, SHAPES[1]), _rand(6, SHAPES[1])
    t = _interior_times(param, SHAPES[1][0], 7)
    eager = param.add_noise(x0, eps, t)
    closed = jax.jit(lambda x0, e, t: param.add_noise(x0, e, t))(x0, eps, t)
    as_arg = jax.jit(lambda p, x0, e, t: p.add_noise(x0, e, t))(param, x0, eps, t)
    assert jax.tree.leaves(param) == []
    np.testing.assert_allclose(np.asarray(closed), np.asarray(eager), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(as_arg), np.asarray(eager), rtol=1e-6, atol=1e-6)
