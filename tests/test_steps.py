"""Train steps on the toy family: invariants, one trace each, mesh equivalence."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adm_jax import optim, sharding, state as state_lib, steps, tree
from adm_jax import parameterization as P
from adm_jax.models import disc_heads, toy

B = 8
CFG = toy.ToyConfig()


def _txs(lr=1e-3, wd=0.0):
  cfg = dict(name="adamw", lr=lr, warmup_steps=0, grad_clip=10.0, weight_decay=wd,
             b1=0.9, b2=0.999)
  return {n: optim.make_optimizer(cfg) for n in state_lib.NETWORKS}


def _setup(gen_times=(399.0,), cfg_scale=2.0, head="admhead2d", hp=None, txs=None,
           adp=False):
  teacher = toy.ToyDenoiser(CFG, rngs=nnx.Rngs(0))
  graphdef, teacher_params = nnx.split(teacher)
  disc = disc_heads.MultiHeadDiscriminator({"mid": (CFG.hidden, 1)}, head=head,
                                           hidden=32, groups=8, zero_init_out=False,
                                           rngs=nnx.Rngs(1))
  dgraph, disc_params = nnx.split(disc)
  apply = toy.denoiser_apply(graphdef)
  if adp:                       # ADP's discriminator params are per branch
    disc_params = {"latent": disc_params}
    hp = {"adp_weights": {"latent": 1.0}, **(hp or {})}
  nets = steps.Nets(
      param=P.make("epsilon"), teacher=apply, student=apply,
      disc=lambda p, feats: nnx.merge(dgraph, p)(feats), txs=txs or _txs(),
      latent_shape=(CFG.data_dim,), gen_times=tuple(gen_times), cfg_scale=cfg_scale,
      hp=steps.default_hparams(**(hp or {})))
  copy = lambda p: jax.tree.map(jnp.copy, p)
  state = state_lib.init_state(copy(teacher_params), copy(teacher_params), disc_params,
                               nets.txs, ema=False, seed=0)
  return nets, state, {"teacher": teacher_params}


def _batch(seed=0):
  mix = toy.ToyMixture()
  r = jax.random.split(jax.random.key(seed), 4)
  labels = jax.random.randint(r[0], (B,), 0, mix.num_modes)
  cond = {"label": labels}
  real = mix.sample(r[1], B, label=labels)
  return dict(cond=cond, uncond=toy.uncond_like(cond), real=real, real_cond=cond,
              pair_noise=jax.random.normal(r[2], (B, 2)), pair_latent=real)


STEP_BUILDERS = {
    "fake_score": lambda n: steps.make_fake_score_step(n, gan=False),
    "fake_score_gan": lambda n: steps.make_fake_score_step(n, gan=True),
    "dmd2_generator": lambda n: steps.make_dmd2_generator_step(n, gan=True),
    "adm_generator": steps.make_adm_generator_step,
    "adm_discriminator": steps.make_adm_discriminator_step,
    "regression": steps.make_regression_step,
    "adp_generator": steps.make_adp_generator_step,
    "adp_discriminator": steps.make_adp_discriminator_step,
}


FOUR_STEP = (999.0, 749.0, 499.0, 249.0)


@pytest.mark.parametrize("name,gen_times", [(n, (399.0,)) for n in sorted(STEP_BUILDERS)]
                         + [("dmd2_generator", FOUR_STEP), ("adm_discriminator", FOUR_STEP)])
def test_one_trace_and_teacher_untouched(name, gen_times):
  chex.clear_trace_counter()       # the counter is per function name, across tests
  nets, state, frozen = _setup(gen_times, adp=name.startswith("adp"))
  before = jax.tree.map(np.array, frozen)
  fn = chex.assert_max_traces(n=1)(STEP_BUILDERS[name](nets))
  jitted = jax.jit(fn, donate_argnums=0)
  changed = None
  for i in range(3):
    old = jax.tree.map(np.array, state)
    state, metrics = jitted(state, frozen, _batch(i), jax.random.key(i))
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values()), metrics
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), old, state)
  for k, v in tree.flatten(before).items():
    np.testing.assert_array_equal(v, np.asarray(tree.flatten(frozen)[k]), err_msg=k)
  # Exactly the networks this step owns were updated.
  owned = {"fake_score": {"fake_score"}, "fake_score_gan": {"fake_score", "discriminator"},
           "dmd2_generator": {"generator"}, "adm_generator": {"generator"},
           "adm_discriminator": {"discriminator"}, "regression": {"generator"},
           "adp_generator": {"generator"}, "adp_discriminator": {"discriminator"}}[name]
  for net in state_lib.NETWORKS:
    moved = any(jax.tree.leaves(getattr(changed, net).params))
    assert moved == (net in owned), (net, moved)


def test_dm_gradient_vanishes_when_fake_equals_real():
  # Fake score == teacher and no guidance: x0_fake == x0_real, so the DM gradient is 0.
  nets, state, frozen = _setup(cfg_scale=1.0)
  step = steps.make_dmd2_generator_step(nets, gan=False)
  _, m = jax.jit(step)(state, frozen, _batch(), jax.random.key(0))
  assert float(m["generator/grad_norm"]) == 0.0
  assert float(m["generator/dm_loss"]) == 0.0
  # With guidance the real score moves and the generator gets a gradient.
  nets, state, frozen = _setup(cfg_scale=3.0)
  _, m = jax.jit(steps.make_dmd2_generator_step(nets, gan=False))(
      state, frozen, _batch(), jax.random.key(0))
  assert float(m["generator/grad_norm"]) > 0


def test_backward_simulation_depth_zero_is_one_step_from_noise():
  nets, state, _ = _setup(FOUR_STEP)
  noise = jax.random.normal(jax.random.key(3), (B, 2))
  cond = _batch()["cond"]
  x0 = steps.generate(nets, state.generator.params, noise, cond, 0, jax.random.key(0))
  out = nets.student(state.generator.params, noise, nets.param.model_time(
      jnp.full((B,), 999.0)), cond)
  ref = nets.param.to_x0(out, noise, jnp.full((B,), 999.0))
  np.testing.assert_allclose(np.asarray(x0), np.asarray(ref), atol=1e-6)
  # k = 2 depends on the re-noising randomness (fresh noise per simulated step).
  a = steps.generate(nets, state.generator.params, noise, cond, 2, jax.random.key(0))
  b = steps.generate(nets, state.generator.params, noise, cond, 2, jax.random.key(1))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_regression_step_learns():
  nets, state, frozen = _setup(txs=_txs(lr=3e-3))
  step = jax.jit(steps.make_regression_step(nets))
  batch = _batch()
  losses = []
  for i in range(60):
    state, m = step(state, frozen, batch, jax.random.key(i))
    losses.append(float(m["generator/regression_loss"]))
  assert losses[-1] < 0.3 * losses[0], losses[::10]


def _two_steps(state, frozen, nets, jit_kw):
  # Without the GAN terms to keep compilation short; the GAN paths share the sharded
  # parameter / batch handling exercised here.
  fake = jax.jit(steps.make_fake_score_step(nets, gan=False), **jit_kw)
  gen = jax.jit(steps.make_dmd2_generator_step(nets, gan=False), **jit_kw)
  out = []
  for i in range(2):
    batch = _batch(i)
    if "in_shardings" in jit_kw:
      batch = jax.device_put(batch, jit_kw["in_shardings"][2])
    state, m1 = fake(state, frozen, batch, jax.random.key(i))
    state, m2 = gen(state, frozen, batch, jax.random.key(100 + i))
    out.append({**m1, **m2})
  return out


def test_one_device_equals_fsdp_mesh():
  assert jax.device_count() == 8
  nets, state, frozen = _setup()
  ref = _two_steps(jax.tree.map(jnp.copy, state), frozen, nets, {})

  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  rules = [(r".*", "fsdp")]
  st_sh = state_lib.state_shardings(state, {n: rules for n in state_lib.NETWORKS}, mesh)
  te_sh = sharding.infer_param_shardings(frozen, rules, mesh)
  batch_sh = jax.tree.map(lambda a: sharding.batch_sharding(mesh, a.ndim), _batch())
  sharded_state = jax.device_put(state, st_sh)
  kernel = tree.flatten(sharded_state.generator.params)["blocks.0.fc1.kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  jit_kw = dict(in_shardings=(st_sh, te_sh, batch_sh, None), out_shardings=(st_sh, None),
                donate_argnums=0)
  got = _two_steps(sharded_state, jax.device_put(frozen, te_sh), nets, jit_kw)
  for a, b in zip(ref, got):
    for k in a:
      np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=2e-5, atol=1e-6,
                                 err_msg=k)


def _pixel_nets(nets, weights):
  """ADP's pixel path on the toy: a frozen linear "decoder" to 4x4 RGB images and a
  frozen conv "encoder" to 2x2 features, plus heads on them."""
  dec_w = jax.random.normal(jax.random.key(5), (CFG.data_dim, 4 * 4 * 3))
  enc_w = jax.random.normal(jax.random.key(6), (2, 2, 3, 8))
  decode = lambda p, x: jnp.tanh(x @ p["w"]).reshape(-1, 4, 4, 3)
  pixel = lambda p, im: {"p": jax.lax.conv_general_dilated(
      im, p["w"], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))}
  heads = disc_heads.MultiHeadDiscriminator({"p": (8, 2)}, head="admhead2d", hidden=16,
                                            groups=4, zero_init_out=False, rngs=nnx.Rngs(2))
  hgraph, hparams = nnx.split(heads)
  nets = steps.Nets(**{**nets.__dict__, "decode": decode, "pixel": pixel,
                       "pixel_disc": lambda p, f: nnx.merge(hgraph, p)(f),
                       "hp": steps.default_hparams(adp_weights=weights)})
  return nets, {"w": dec_w}, {"w": enc_w}, hparams


def _adp_with_pixel_branch(txs=None):
  """ADP nets, state and frozen nets with both branches (λ1 = 0.85 latent, 0.15 pixel)."""
  nets, state, frozen = _setup(adp=True, txs=txs)
  nets, dec, enc, pixel_heads = _pixel_nets(nets, {"latent": 0.85, "pixel": 0.15})
  frozen = {**frozen, "decoder": dec, "pixel": enc}
  params = {**state.discriminator.params, "pixel": pixel_heads}
  state = state.replace(discriminator=state_lib.make_net_state(params, nets.txs[
      "discriminator"]))
  return nets, state, frozen


def test_adp_pixel_branch_trains_heads_and_generator_only():
  nets, state, frozen = _adp_with_pixel_branch()
  before = jax.tree.map(np.array, frozen)
  d_step = jax.jit(steps.make_adp_discriminator_step(nets))
  g_step = jax.jit(steps.make_adp_generator_step(nets))
  old = jax.tree.map(np.array, state.discriminator.params)
  state, m = d_step(state, frozen, _batch(), jax.random.key(0))
  for branch in ("latent", "pixel"):
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                         old[branch], state.discriminator.params[branch])
    assert any(jax.tree.leaves(moved)), branch
    assert f"discriminator/{branch}_real_logit" in m
  # The generator's gradient reaches it through the frozen decoder and encoder alone.
  nets_pixel_only = steps.Nets(**{**nets.__dict__, "hp": steps.default_hparams(
      adp_weights={"pixel": 1.0})})
  state_p = state.replace(discriminator=state.discriminator.replace(
      params={"pixel": state.discriminator.params["pixel"]}))
  _, m = jax.jit(steps.make_adp_generator_step(nets_pixel_only))(
      state_p, frozen, _batch(), jax.random.key(1))
  assert float(m["generator/grad_norm"]) > 0 and "generator/pixel_fake_logit" in m
  _, m = g_step(state, frozen, _batch(), jax.random.key(1))
  assert np.isfinite(float(m["generator/loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_pixel_microbatches_give_the_same_steps():
  """ADP's pixel branch in sequential, rematerialised passes: same losses, same updates.
  Plain SGD, so an update is linear in its gradient: Adam's first step, lr·g/(|g| + ε),
  turns rounding-level differences of a gradient near ε into differences near lr."""
  import optax
  nets, state, frozen = _adp_with_pixel_branch(
      txs={n: optax.sgd(1e-2) for n in state_lib.NETWORKS})
  outs = []
  for n in (1, 4):
    micro = steps.Nets(**{**nets.__dict__, "pixel_microbatches": n})
    s, m_d = jax.jit(steps.make_adp_discriminator_step(micro))(state, frozen, _batch(),
                                                               jax.random.key(0))
    s, m_g = jax.jit(steps.make_adp_generator_step(micro))(s, frozen, _batch(),
                                                           jax.random.key(1))
    outs.append((jax.tree.map(np.asarray, s), {**m_d, **m_g}))
  (s1, m1), (s4, m4) = outs
  assert m1.keys() == m4.keys() and "generator/pixel_fake_logit" in m1
  for k in m1:
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_map_microbatches_keeps_rows_values_and_gradients():
  from adm_jax.models import layers
  w = jax.random.normal(jax.random.key(0), (3, 5))
  x = jax.random.normal(jax.random.key(1), (8, 3))
  fn = lambda w, x: {"y": jnp.tanh(x @ w), "s": jnp.sum(x ** 2, -1)}
  loss = lambda w, x, n: sum(jnp.sum(v ** 3) for v in jax.tree.leaves(
      layers.map_microbatches(lambda z: fn(w, z), x, n)))
  ref, ref_g = jax.value_and_grad(loss, argnums=(0, 1))(w, x, 1)
  out = layers.map_microbatches(lambda z: fn(w, z), x, 4)
  for k, v in fn(w, x).items():
    np.testing.assert_allclose(out[k], v, rtol=1e-6, err_msg=k)       # row order kept
  val, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(w, x, 4)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  for a, b in zip(ref_g, g):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="a batch of 8 does not split into 3 microbatches"):
    layers.map_microbatches(lambda z: fn(w, z), x, 3)


def test_adp_input_is_the_rectified_flow_interpolant_on_flow_teachers():
  nets, _, _ = _setup(adp=True)
  nets = steps.Nets(**{**nets.__dict__, "param": P.make("flow")})
  batch = _batch()
  x_t, t = steps._adp_input(nets, batch, jax.random.key(4))
  t = np.asarray(t)[:, None]
  want = (1 - t) * np.asarray(batch["pair_latent"]) + t * np.asarray(batch["pair_noise"])
  np.testing.assert_allclose(np.asarray(x_t), want, rtol=1e-6, atol=1e-6)
  # Cubic schedule t = 1 - u³, biased to high noise: P(t > 1/2) = 2^(-1/3) ≈ 0.79.
  ts = np.asarray(steps._t_cubic(nets, jax.random.key(0), 20000))
  assert abs((ts > 0.5).mean() - 0.5 ** (1 / 3)) < 0.01


def test_adp_onestep_rows_are_the_students_sampling_input():
  """``adp_onestep_fraction``: that share of rows (in expectation) is the pair's pure
  noise at the one-step time, the rest the interpolant; 0 and 1 are the two ends."""
  batch = _batch()
  noise = np.asarray(batch["pair_noise"])
  for frac in (0.0, 0.5, 1.0):
    nets, _, _ = _setup(gen_times=(999.0,), adp=True, hp={"adp_onestep_fraction": frac})
    onestep = []
    for seed in range(40):
      x_t, t = map(np.asarray, steps._adp_input(nets, batch, jax.random.key(seed)))
      hit = (x_t == noise).all(axis=-1)          # the interpolant is never exactly x_T
      np.testing.assert_array_equal(t[hit], 999.0)
      want = nets.param.add_noise(batch["pair_latent"], batch["pair_noise"], t)
      np.testing.assert_allclose(x_t[~hit], np.asarray(want)[~hit], rtol=1e-6, atol=1e-6)
      onestep.append(hit.mean())
    assert abs(np.mean(onestep) - frac) < (0.06 if 0 < frac < 1 else 0.02), frac
  with pytest.raises(ValueError, match="adp_onestep_fraction"):
    steps.default_hparams(adp_onestep_fraction=1.5)


def test_adp_weights_are_checked():
  with pytest.raises(ValueError, match="adp_weights"):
    steps.default_hparams(adp_weights={"latent": 1.0, "pxel": 0.1})


def test_real_and_fake_in_one_call_matches_two_calls_and_stays_local():
  """The D steps score real and fake in one interleaved backbone call: same logits as two
  calls, and on a data-sharded batch no sample moves between devices."""
  nets, state, frozen = _setup()
  batch = _batch()

  def logits(x, t, cond):
    return steps._disc_logits(nets, nets.teacher, frozen["teacher"],
                              state.discriminator.params, x, t, cond)

  real = (batch["real"], jnp.full((B,), 300.0), batch["cond"])
  fake = (batch["pair_noise"], jnp.full((B,), 700.0), toy.uncond_like(batch["cond"]))
  lr, lf = steps._real_and_fake(logits, real, fake)
  np.testing.assert_allclose(lr, logits(*real), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lf, logits(*fake), rtol=1e-5, atol=1e-6)
  assert not np.allclose(lr, lf)

  mesh = sharding.make_mesh([("data", 8)])
  x = jax.device_put(batch["real"], sharding.batch_sharding(mesh, 2))
  both = jax.jit(steps._interleave, out_shardings=sharding.batch_sharding(mesh, 2))
  hlo = both.lower(x, x).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert op not in hlo, op
