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


def _setup(gen_times=(399.0,), cfg_scale=2.0, head="admhead2d", hp=None, txs=None):
  teacher = toy.ToyDenoiser(CFG, rngs=nnx.Rngs(0))
  graphdef, teacher_params = nnx.split(teacher)
  disc = disc_heads.MultiHeadDiscriminator({"mid": (CFG.hidden, 1)}, head=head,
                                           hidden=32, groups=8, zero_init_out=False,
                                           rngs=nnx.Rngs(1))
  dgraph, disc_params = nnx.split(disc)
  apply = toy.denoiser_apply(graphdef)
  nets = steps.Nets(
      param=P.make("epsilon"), teacher=apply, student=apply,
      disc=lambda p, feats: nnx.merge(dgraph, p)(feats), txs=txs or _txs(),
      latent_shape=(CFG.data_dim,), gen_times=tuple(gen_times), cfg_scale=cfg_scale,
      hp=steps.default_hparams(**(hp or {})))
  copy = lambda p: jax.tree.map(jnp.copy, p)
  state = state_lib.init_state(copy(teacher_params), copy(teacher_params), disc_params,
                               nets.txs, ema=False, seed=0)
  return nets, state, teacher_params


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
}


FOUR_STEP = (999.0, 749.0, 499.0, 249.0)


@pytest.mark.parametrize("name,gen_times", [(n, (399.0,)) for n in sorted(STEP_BUILDERS)]
                         + [("dmd2_generator", FOUR_STEP), ("adm_discriminator", FOUR_STEP)])
def test_one_trace_and_teacher_untouched(name, gen_times):
  chex.clear_trace_counter()       # the counter is per function name, across tests
  nets, state, teacher_params = _setup(gen_times)
  before = jax.tree.map(np.array, teacher_params)
  fn = chex.assert_max_traces(n=1)(STEP_BUILDERS[name](nets))
  jitted = jax.jit(fn, donate_argnums=0)
  changed = None
  for i in range(3):
    old = jax.tree.map(np.array, state)
    state, metrics = jitted(state, teacher_params, _batch(i), jax.random.key(i))
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values()), metrics
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), old, state)
  for k, v in tree.flatten(before).items():
    np.testing.assert_array_equal(v, np.asarray(tree.flatten(teacher_params)[k]), err_msg=k)
  # Exactly the networks this step owns were updated.
  owned = {"fake_score": {"fake_score"}, "fake_score_gan": {"fake_score", "discriminator"},
           "dmd2_generator": {"generator"}, "adm_generator": {"generator"},
           "adm_discriminator": {"discriminator"}, "regression": {"generator"}}[name]
  for net in state_lib.NETWORKS:
    moved = any(jax.tree.leaves(getattr(changed, net).params))
    assert moved == (net in owned), (net, moved)


def test_dm_gradient_vanishes_when_fake_equals_real():
  # Fake score == teacher and no guidance: x0_fake == x0_real, so the DM gradient is 0.
  nets, state, teacher_params = _setup(cfg_scale=1.0)
  step = steps.make_dmd2_generator_step(nets, gan=False)
  _, m = jax.jit(step)(state, teacher_params, _batch(), jax.random.key(0))
  assert float(m["generator/grad_norm"]) == 0.0
  assert float(m["generator/dm_loss"]) == 0.0
  # With guidance the real score moves and the generator gets a gradient.
  nets, state, teacher_params = _setup(cfg_scale=3.0)
  _, m = jax.jit(steps.make_dmd2_generator_step(nets, gan=False))(
      state, teacher_params, _batch(), jax.random.key(0))
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
  nets, state, teacher_params = _setup(txs=_txs(lr=3e-3))
  step = jax.jit(steps.make_regression_step(nets))
  batch = _batch()
  losses = []
  for i in range(60):
    state, m = step(state, teacher_params, batch, jax.random.key(i))
    losses.append(float(m["generator/regression_loss"]))
  assert losses[-1] < 0.3 * losses[0], losses[::10]


def _two_steps(state, teacher_params, nets, jit_kw):
  # Without the GAN terms to keep compilation short; the GAN paths share the sharded
  # parameter / batch handling exercised here.
  fake = jax.jit(steps.make_fake_score_step(nets, gan=False), **jit_kw)
  gen = jax.jit(steps.make_dmd2_generator_step(nets, gan=False), **jit_kw)
  out = []
  for i in range(2):
    batch = _batch(i)
    if "in_shardings" in jit_kw:
      batch = jax.device_put(batch, jit_kw["in_shardings"][2])
    state, m1 = fake(state, teacher_params, batch, jax.random.key(i))
    state, m2 = gen(state, teacher_params, batch, jax.random.key(100 + i))
    out.append({**m1, **m2})
  return out


def test_one_device_equals_fsdp_mesh():
  assert jax.device_count() == 8
  nets, state, teacher_params = _setup()
  ref = _two_steps(jax.tree.map(jnp.copy, state), teacher_params, nets, {})

  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  rules = [(r".*", "fsdp")]
  st_sh = state_lib.state_shardings(state, {n: rules for n in state_lib.NETWORKS}, mesh)
  te_sh = sharding.infer_param_shardings(teacher_params, rules, mesh)
  batch_sh = jax.tree.map(lambda a: sharding.batch_sharding(mesh, a.ndim), _batch())
  sharded_state = jax.device_put(state, st_sh)
  kernel = tree.flatten(sharded_state.generator.params)["blocks.0.fc1.kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  jit_kw = dict(in_shardings=(st_sh, te_sh, batch_sh, None), out_shardings=(st_sh, None),
                donate_argnums=0)
  got = _two_steps(sharded_state, jax.device_put(teacher_params, te_sh), nets, jit_kw)
  for a, b in zip(ref, got):
    for k in a:
      np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=2e-5, atol=1e-6,
                                 err_msg=k)
