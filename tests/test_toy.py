"""The toy family: exact mixture posterior, exact teacher, PF-ODE, MLP denoiser, metrics.

Compilation dominates on CPU, so each test runs its arithmetic in one or two jitted
functions and checks the results with numpy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adm_jax import models, sampling, tree
from adm_jax import parameterization as P
from adm_jax.models import toy

MIX = toy.ToyMixture()
K = MIX.num_modes
PARAMS = {
    "epsilon": P.make("epsilon"),
    "v_prediction": P.make("v_prediction"),
    "flow": P.make("flow", shift=1.0),
    "flow_shift3": P.make("flow", shift=3.0),
}


def _np(tree_):
  return jax.tree.map(np.asarray, tree_)


_sample_from = jax.jit(MIX.sample_from)


def _data(n, seed, label=None):
  """Exact ``(x0, eps)`` ``[n, 2]`` from numpy randomness (jax's threefry is slow to
  compile on CPU)."""
  rng = np.random.default_rng(seed)
  u = rng.random(n, np.float32)
  z = rng.standard_normal((n, 4), np.float32)
  x0 = _sample_from(u, z[:, :2], None if label is None else np.asarray(label, np.int32))
  return np.asarray(x0), z[:, 2:]


@functools.partial(jax.jit, static_argnums=0)
def _add_noise(param, x0, eps, t_frac):
  t = t_frac * param.schedule.t_max
  return t, param.add_noise(x0, eps, t)


# ---------------------------------------------------------------------------------------
# The mixture itself.
# ---------------------------------------------------------------------------------------


def test_mixture_defaults_and_sampling():
  assert MIX.num_modes == 8 and MIX.dim == 2 and MIX.null_label == 8
  np.testing.assert_allclose(np.linalg.norm(np.asarray(MIX.means), axis=1), 2.0, rtol=1e-6)
  np.testing.assert_allclose(sum(MIX.weights), 1.0, rtol=1e-6)
  assert hash(MIX) == hash(toy.ToyMixture.ring(8, 2.0, 0.1))
  assert toy.ToyMixture.from_dict(MIX.to_dict()) == MIX
  assert toy.ToyMixture.from_dict({"num_modes": 4, "radius": 1.0}).num_modes == 4
  # Labels: 3 -> mode 3; -1 and K -> the whole mixture.
  label = np.concatenate([np.full(1000, 3), np.full(1000, -1), np.full(1000, K)])
  x = np.asarray(MIX.sample(jax.random.key(0), 3000, label))
  assert x.dtype == np.float32
  np.testing.assert_allclose(x[:1000].mean(0), MIX.means[3], atol=0.02)
  np.testing.assert_allclose(x[:1000].std(0), MIX.std, rtol=0.1)
  counts = np.asarray(toy.mode_counts(x[1000:], MIX))
  assert counts.sum() > 0.98 * 2000 and counts.min() > 180, counts
  # Unequal weights are honoured.
  mix = toy.ToyMixture.ring(2, 2.0, 0.1, weights=(3.0, 1.0))
  frac0 = np.mean(np.asarray(mix.sample(jax.random.key(1), 4000))[:, 0] > 0)
  assert abs(frac0 - 0.75) < 0.03
  # log_prob integrates to one (grid over [-3, 3]^2).
  g = np.linspace(-3, 3, 301, dtype=np.float32)
  grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
  mass = np.exp(np.asarray(MIX.log_prob(grid), np.float64)).sum() * (g[1] - g[0]) ** 2
  np.testing.assert_allclose(mass, 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Exact posterior: Tweedie and Monte Carlo.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _tweedie_case(param, x_t, t, label):
  alpha, sigma = param.alpha_sigma(t)
  grad_logp = jax.grad(lambda x: jnp.sum(MIX.log_prob_t(x, alpha, sigma, label)))(x_t)
  out = MIX.teacher_apply(param)(None, x_t, param.model_time(t), {"label": label})
  x0_hat = MIX.x0_mean(x_t, alpha, sigma, label)
  return dict(
      grad_logp=grad_logp, score=MIX.score(x_t, alpha, sigma, label), x0_hat=x0_hat,
      x0_tweedie=(x_t + sigma[:, None] ** 2 * grad_logp) / alpha[:, None],
      eps_hat=MIX.eps_mean(x_t, alpha, sigma, label), minus_sigma_score=-sigma[:, None]
      * grad_logp, out=out, out_to_x0=param.to_x0(out, x_t, t),
      out_to_eps=param.to_eps(out, x_t, t), from_x0=param.from_x0(x0_hat, x_t, t))


@pytest.mark.parametrize("name", list(PARAMS))
def test_exact_teacher_is_tweedie(name):
  """The teacher's x0 / eps equal Tweedie's formula on jax.grad of the noised density."""
  param = PARAMS[name]
  b = 16
  label = np.asarray([-1, 0, 3, K] * 4, np.int32)
  x0, eps = _data(b, 0, np.maximum(label, 0) % K)
  t, x_t = _add_noise(param, x0, eps, np.linspace(0.02, 0.98, b, dtype=np.float32))
  r = _np(_tweedie_case(param, x_t, t, label))
  tol = dict(rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(r["score"], r["grad_logp"], **tol)
  np.testing.assert_allclose(r["x0_hat"], r["x0_tweedie"], **tol)
  np.testing.assert_allclose(r["eps_hat"], r["minus_sigma_score"], **tol)
  # The raw output in the parameterisation's convention.
  assert r["out"].shape == (b, 2) and r["out"].dtype == np.float32
  np.testing.assert_allclose(r["out_to_x0"], r["x0_hat"], **tol)
  np.testing.assert_allclose(r["out"], r["from_x0"], **tol)
  np.testing.assert_allclose(r["out_to_eps"], r["minus_sigma_score"], **tol)


def test_model_time_inverse():
  for param in PARAMS.values():
    t = np.asarray([0.0, 0.013, 0.5, 0.77, 1.0], np.float32) * param.schedule.t_max
    inverse = jax.jit(lambda t, p=param: (
        toy.alpha_sigma_from_model_time(p, p.model_time(t)) + p.alpha_sigma(t)))
    a, s, t_back, a_ref, s_ref = _np(inverse(t))
    np.testing.assert_allclose(a, a_ref, atol=1e-6)
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    np.testing.assert_allclose(t_back, t, atol=1e-5 * param.schedule.t_max)
  # sigma = 0 (VP t < 0, flow t = 0) gives finite outputs (x0 = x_t / alpha, eps = 0).
  x = np.ones((2, 2), np.float32)
  for param in (PARAMS["epsilon"], PARAMS["flow"]):
    mt = np.float32(-1.0 if param.schedule.is_vp else 0.0)      # model_time(t_clean)
    out = np.asarray(MIX.teacher_apply(param)(None, x, np.full(2, mt), None))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, -x if not param.schedule.is_vp else 0 * x, atol=1e-6)


@pytest.mark.parametrize("name", ["epsilon", "flow_shift3"])
def test_posterior_mean_monte_carlo(name):
  """E[x0 | x_t] by self-normalised importance weighting of exact data samples."""
  param = PARAMS[name]
  x0s = _data(200_000, 3)[0].astype(np.float64)                         # [N, 2]
  queries = np.asarray([[0.3, -0.2], [1.2, 0.9], [-1.5, 0.1]], np.float32)
  for frac in (0.3, 0.6):
    t = np.float32(frac * param.schedule.t_max)
    alpha, sigma = (float(v) for v in jax.jit(param.alpha_sigma)(t))
    logw = -((queries[:, None] - alpha * x0s[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)                                         # [Q, N]
    assert (1.0 / (w ** 2).sum(1)).min() > 500                            # ESS
    np.testing.assert_allclose(MIX.x0_mean(queries, alpha, sigma), w @ x0s, atol=0.03)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _bayes_case(param, name, x0, eps, t, label):
  x_t = param.add_noise(x0, eps, t)
  target = param.target(x0, eps, t)
  out = MIX.teacher_apply(param)(None, x_t, param.model_time(t), {"label": label})
  alpha, sigma = param.alpha_sigma(t)
  # target = a(x_t) - c x0 with c = alpha / sigma (eps) or 1 / sigma (v, flow), so the
  # Bayes error is E|target - E[target|x_t]|^2 = c^2 E[tr Var(x0 | x_t)].
  c = alpha / sigma if name == "epsilon" else 1.0 / sigma
  _, var = MIX.x0_posterior(x_t, alpha, sigma, label)
  res = {"loss": jnp.mean(jnp.sum(jnp.square(out - target), -1)),
         "bayes": jnp.mean(jnp.square(c) * jnp.sum(var, -1))}
  for i, g in enumerate((jnp.full_like(out, 0.05), 0.05 * x_t,
                         0.05 * jnp.sin(3 * x_t[:, ::-1]))):
    res[f"loss_{i}"] = jnp.mean(jnp.sum(jnp.square(out + g - target), -1))
    res[f"gain_{i}"] = jnp.mean(jnp.sum(jnp.square(g), -1))
  return res


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "flow"])
def test_teacher_denoising_loss_is_bayes_error(name):
  param = PARAMS[name]
  n = 60_000
  label = np.random.default_rng(4).integers(-1, K, n).astype(np.int32)    # -1: null
  x0, eps = _data(n, 5, label)
  for frac in (0.25, 0.5, 0.8):
    r = _np(_bayes_case(param, name, x0, eps,
                        np.full(n, frac * param.schedule.t_max, np.float32), label))
    np.testing.assert_allclose(r["loss"], r["bayes"], rtol=0.03)
    # Any perturbation g(x_t) raises the loss by ~ |g|^2 (the residual is orthogonal).
    for i in range(3):
      assert r[f"loss_{i}"] > r["loss"]
      np.testing.assert_allclose(r[f"loss_{i}"] - r["loss"], r[f"gain_{i}"], rtol=0.25)


# ---------------------------------------------------------------------------------------
# Conditioning and guidance.
# ---------------------------------------------------------------------------------------


def test_conditional_and_null_labels():
  param = PARAMS["flow"]
  apply = MIX.teacher_apply(param)
  b = 8
  x_t = np.random.default_rng(5).standard_normal((b, 2), np.float32)
  cond = {"label": jnp.full((b,), 2)}

  @jax.jit
  def case(x_t):
    t = jnp.full((b,), 0.4)
    a, s = param.alpha_sigma(t)
    mt = param.model_time(t)
    r = {
        # Pure noise (flow t = 1, alpha = 0): E[x0 | x_t, k] = mu_k; null: sum_k w_k mu_k.
        "pure_cond": MIX.x0_mean(x_t, 0.0, 1.0, jnp.arange(b)),
        "pure_uncond": MIX.x0_mean(x_t, 0.0, 1.0),
        "uncond": apply(None, x_t, mt, None),
        "nulls": [apply(None, x_t, mt, c) for c in (
            {}, {"label": jnp.full((b,), -1)}, {"label": jnp.full((b,), K)},
            toy.uncond_like({"label": jnp.arange(b)}))],
        "resp": MIX.responsibilities(x_t, a, s),                             # [B, K]
        "per_k": jnp.stack([MIX.x0_mean(x_t, a, s, jnp.full((b,), k))
                            for k in range(K)], 1),                          # [B, K, 2]
        "x0_uncond": MIX.x0_mean(x_t, a, s),
        "cond": apply(None, x_t, mt, cond),
        "guided": P.guided_output(apply, None, x_t, t, cond, toy.uncond_like(cond), 3.0,
                                  param=param),
    }
    return r

  r = _np(case(x_t))
  np.testing.assert_allclose(r["pure_cond"], MIX.means, atol=1e-5)
  np.testing.assert_allclose(r["pure_uncond"], np.zeros((b, 2)), atol=1e-5)
  for out in r["nulls"]:
    np.testing.assert_allclose(out, r["uncond"], atol=1e-6)
  # Unconditional mean = sum_k P(k | x_t) E[x0 | x_t, k].
  np.testing.assert_allclose(r["x0_uncond"], np.einsum("bk,bkd->bd", r["resp"], r["per_k"]),
                             atol=1e-5)
  # The conditional mean is pulled to its own mode.
  cm = r["per_k"][:, 2]
  assert np.all(np.argmin(np.linalg.norm(cm[:, None] - np.asarray(MIX.means)[None], axis=-1),
                          -1) == 2)
  # Classifier-free guidance through the generic adapter.
  np.testing.assert_allclose(r["guided"], r["uncond"] + 3.0 * (r["cond"] - r["uncond"]),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# PF-ODE with the exact teacher.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["epsilon", "flow_shift3"])
def test_pf_ode_reproduces_the_mixture(name):
  param = PARAMS[name]
  n, nc = 2000, 256
  ode = sampling.make_ode_sampler(MIX.teacher_apply(param), param, 50)
  ode_cfg = sampling.make_ode_sampler(MIX.teacher_apply(param), param, 50, cfg_scale=3.0)

  @jax.jit
  def run(noise, noise_c, ref):
    x = ode(None, noise, {}, None)
    cond = {"label": jnp.full((nc,), 5)}
    return dict(
        coverage=toy.mode_coverage(x, MIX), in_mode=toy.in_mode_fraction(x, MIX),
        counts=toy.mode_counts(x, MIX), mmd=toy.mmd(x, ref),
        sw=toy.sliced_wasserstein(x, ref),
        counts_cfg=toy.mode_counts(ode_cfg(None, noise_c, cond, toy.uncond_like(cond)),
                                   MIX))

  rng = np.random.default_rng(6)
  r = _np(run(rng.standard_normal((n, 2), np.float32),
              rng.standard_normal((nc, 2), np.float32), _data(n, 7)[0]))
  assert r["coverage"] == 1.0
  assert r["in_mode"] > 0.95
  assert np.all(np.abs(r["counts"] - n / K) < 0.2 * n / K), r["counts"]
  # Exact vs exact gives mmd ~0.075 at n = 2000, half the modes ~0.78. DDIM's trailing
  # 50-step grid ends with one jump from t = 19 (sigma ~ 0.13 > std) that shrinks the
  # modes to ~0.064 rms (mmd ~0.15); flow's grid ends at sigma ~ 0.01 (mmd ~0.08).
  assert r["mmd"] < 0.2
  assert r["sw"] < 0.1
  # Class-conditional sampling with CFG lands on the requested mode.
  assert r["counts_cfg"][5] >= nc - 6 and r["counts_cfg"].sum() == r["counts_cfg"][5]


# ---------------------------------------------------------------------------------------
# The MLP denoiser.
# ---------------------------------------------------------------------------------------


def test_toy_denoiser_shapes_and_features():
  cfg = toy.ToyConfig(hidden=32, depth=2)
  model = toy.init_denoiser(cfg, 0)
  graphdef, params = nnx.split(model)
  apply = toy.denoiser_apply(graphdef)
  teacher = MIX.teacher_apply(PARAMS["epsilon"], feature_dim=16)
  x = jnp.ones((5, 2))
  t = jnp.full((5,), 3.0)

  @jax.jit
  def case(params):
    labels = jnp.asarray([[0, 1, 7, 8, -1], [-1] * 5, [K] * 5, [0] * 5])
    outs = [apply(params, x, t, {"label": lab}) for lab in labels]
    return dict(
        feat=apply(params, x, jnp.arange(5.0), {"label": labels[0]}, return_features=True),
        none=apply(params, x, 3.0, None), null_m1=outs[1], null_k=outs[2], zero=outs[3],
        teacher=teacher({}, x, jnp.full((5,), 500.0), {}, return_features=True))

  r = _np(case(params))
  out, feats = r["feat"]
  assert out.shape == (5, 2) and out.dtype == np.float32
  assert set(feats) == {"mid"} and feats["mid"].shape == (5, 1, 1, 32)
  # No conditioning == the null labels; a real label changes the output.
  np.testing.assert_allclose(r["null_m1"], r["none"], rtol=1e-6)
  np.testing.assert_allclose(r["null_k"], r["none"], rtol=1e-6)
  assert not np.allclose(r["zero"], r["none"])
  # The exact teacher's features have the same layout.
  t_out, t_feats = r["teacher"]
  assert t_out.shape == (5, 2) and t_feats["mid"].shape == (5, 1, 1, 16 + 8 + 2)
  assert np.abs(t_feats["mid"]).max() <= 1.0


def test_fit_to_teacher_reduces_error():
  param = PARAMS["epsilon"]
  model = toy.init_denoiser(toy.ToyConfig(hidden=64, depth=1), 1)
  graphdef, init = nnx.split(model)
  apply = toy.denoiser_apply(graphdef)
  n = 4096
  rng = np.random.default_rng(9)
  label = rng.integers(-1, K, n).astype(np.int32)
  t, x_t = _add_noise(param, *_data(n, 10, label), rng.random(n, np.float32))

  @jax.jit
  def err(p):
    mt, cond = param.model_time(t), {"label": label}
    want = MIX.teacher_apply(param)(None, x_t, mt, cond)
    return jnp.mean(jnp.sum(jnp.square(apply(p, x_t, mt, cond) - want), -1))

  fitted = toy.fit_to_teacher(model, MIX, param, steps=300, rng=jax.random.key(0))
  assert jax.tree.structure(fitted) == jax.tree.structure(init)
  e0, e1 = float(err(init)), float(err(fitted))
  assert e1 < 0.05 * e0, (e0, e1)               # measured: 2.7 -> ~0.05
  # The model itself is left as it was.
  assert float(err(nnx.split(model)[1])) == e0


# ---------------------------------------------------------------------------------------
# Component kind "toy_mlp" and metrics.
# ---------------------------------------------------------------------------------------


def test_component_kind_round_trip(tmp_path):
  kind = models.ComponentKind("adm_jax.models.toy", "adm_jax.models.toy", "ToyConfig",
                              "from_dict", "to_dict")
  cfg = toy.ToyConfig(hidden=16, depth=1, num_classes=4)
  assert kind.config_from(kind.config_to(cfg)) == cfg
  with pytest.raises(ValueError, match="unknown key"):
    toy.ToyConfig.from_dict({"hidden": 8, "width": 3})
  model = toy.init_denoiser(cfg, 2)
  _, params = nnx.split(model)
  _, abstract = kind.module().abstract_model(cfg)
  assert tree.shapes(abstract) == tree.shapes(params)
  kind.module().export(cfg, params, tmp_path / "denoiser")
  cfg2, graphdef2, params2 = kind.module().load(tmp_path / "denoiser")
  assert cfg2 == cfg
  for k, v in tree.flatten(params).items():
    np.testing.assert_array_equal(tree.flatten(params2)[k], v)
  assert nnx.merge(graphdef2, params2).config == cfg


@jax.jit
def _metrics(a, b):
  return dict(coverage=toy.mode_coverage(a, MIX), in_mode=toy.in_mode_fraction(a, MIX),
              mmd=toy.mmd(a, b), sw=toy.sliced_wasserstein(a, b))


def test_metrics_detect_collapse():
  n = 1000
  rng = np.random.default_rng(12)
  ref, other = _data(n, 13)[0], _data(n, 14)[0]
  half = _data(n, 15, rng.integers(0, 4, n))[0]                # modes 0-3 only
  stray = np.concatenate([half[:n - 10], ref[:10]])           # 10 samples off 4 modes
  blurred = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
  good, bad, strays, blur = (_np(_metrics(x, other)) for x in (ref, half, stray, blurred))
  assert good["coverage"] == 1.0 and good["in_mode"] > 0.97
  assert bad["coverage"] == 0.5
  assert bad["mmd"] > 5 * good["mmd"]
  assert bad["sw"] > 3 * good["sw"]
  assert strays["coverage"] == 0.5          # a few stragglers do not count as coverage
  assert blur["coverage"] == 1.0 and blur["in_mode"] < 0.6
