"""Pure train steps for every method: ``(state, frozen, batch, rng) -> (state, metrics)``.

Builders close over a :class:`Nets` bundle (apply functions, optimisers, the teacher's
parameterisation and the method's hyperparameters) and return pure functions that the
trainer jits once with explicit shardings and donation. Nothing here knows the model
family: networks are reached only through

* ``apply(params, x_t, model_time, cond, features=False)`` -> raw output ``[B, ...]``
  (and, with ``features``, a dict of intermediate features ``[B, h, w, c]``), and
* the parameterisation adapter (``to_x0``, ``add_noise``, ``target``, ``ode_step``).

``frozen`` holds every frozen network's parameters: ``{"teacher": ...}`` plus, for ADP's
pixel discriminator, ``"decoder"`` (the VAE) and ``"pixel"`` (the SAM encoder). They are
an argument, never part of the state: not donated, not given to an optimiser and they
receive no gradient (every use is under ``stop_gradient``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from adm_jax import losses
from adm_jax import parameterization as P
from adm_jax import schedules as S
from adm_jax import tree
from adm_jax.models import layers
from adm_jax.state import DistillState, NetState

Array = jax.Array
Apply = Callable[..., Any]
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Nets:
  """Everything a step needs besides the state (static; closed over by the builders).

  Attributes:
    param: the teacher's parameterisation; the students share it.
    teacher: apply function of the frozen teacher (also the ADM discriminator backbone).
    student: apply function of the generator (and of the fake score unless ``fake``
      is given): the teacher's architecture for real families; a small MLP for the
      exact-score toy.
    disc: ``disc(params, features) -> logits [B]``: discriminator heads.
    txs: ``{"generator" | "fake_score" | "discriminator": optax transform}``.
    latent_shape: one sample's latent shape, e.g. ``(128, 128, 4)``.
    gen_times: generator conditioning times, noisiest first (``(399,)`` for the SDXL
      one-step student; ``(999, 749, 499, 249)`` for four steps).
    cfg_scale: real-score (teacher) guidance.
    hp: method hyperparameters (see :func:`default_hparams`).
    decode: ``decode(frozen["decoder"], latents) -> images [B, H, W, 3]`` in [-1, 1]
      (ADP's pixel branch; ``None`` without one).
    pixel: ``pixel(frozen["pixel"], images) -> {name: [B, h, w, c]}``: the frozen
      pixel-space encoder (SAM).
    pixel_disc: ``pixel_disc(params, features) -> logits [B]``: heads on ``pixel``.
    fake: apply function of the fake score when it differs from ``student`` (the same
      architecture with another memory policy, e.g. rematerialisation).
    pixel_microbatches: ADP's pixel branch runs as this many sequential passes
      (:func:`layers.map_microbatches`).
  """
  param: P.Parameterization
  teacher: Apply
  student: Apply
  disc: Apply | None
  txs: Mapping[str, optax.GradientTransformation]
  latent_shape: tuple[int, ...]
  gen_times: tuple[float, ...]
  cfg_scale: float
  hp: Mapping[str, Any]
  decode: Apply | None = None
  pixel: Apply | None = None
  pixel_disc: Apply | None = None
  fake: Apply | None = None
  pixel_microbatches: int = 1

  @property
  def fake_apply(self) -> Apply:
    return self.fake if self.fake is not None else self.student


def default_hparams(**overrides) -> dict:
  """Official DMD2 values; ADM's Δt = T/64; ADP's λ1 / λ2 = 0.85 / 0.15 (algorithms.md
  §1.1–1.2, §2.1). ``adp_weights`` without ``"pixel"`` turns the pixel branch off;
  ``adp_regression_weight`` > 0 adds the (unconfirmed) velocity-MSE term to ADP, in the
  teacher's output space (``adp_regression_space="target"``: the velocity on flow
  teachers) or on the x0 prediction (``"x0"``: on an ε teacher the ε-MSE weights x0
  errors by the SNR, ~0.005 at the one-step t = 999, so it hardly anchors the
  one-step output). ``adp_onestep_fraction``: the expected share of each ADP batch
  given the one-step student's own input (the pair's pure noise at the first
  conditioning time) instead of the cubic-time interpolation."""
  hp = dict(dm_t_min=20, dm_t_max=980, gan_weight_g=5e-3, gan_weight_d=1e-2,
            gan_loss="nonsaturating", gan_feature="mid", adm_dt_fraction=1 / 64,
            regression="mse", dm_weight=1.0, adp_weights=dict(losses.ADP_DISC_WEIGHTS),
            adp_regression_weight=0.0, adp_regression_space="target",
            adp_onestep_fraction=0.0)
  hp.update(overrides)
  if not 0.0 <= float(hp["adp_onestep_fraction"]) <= 1.0:
    raise ValueError(f"adp_onestep_fraction {hp['adp_onestep_fraction']!r}: must be in "
                     "[0, 1]")
  if hp["adp_regression_space"] not in ("target", "x0"):
    raise ValueError(f"adp_regression_space {hp['adp_regression_space']!r}: valid: "
                     "'target', 'x0'")
  hp["adp_weights"] = {k: float(v) for k, v in dict(hp["adp_weights"]).items()}
  unknown = set(hp["adp_weights"]) - {"latent", "pixel"}
  if unknown or not hp["adp_weights"]:
    raise ValueError(f"adp_weights keys {sorted(hp['adp_weights'])}: valid keys are "
                     "'latent' and 'pixel'")
  return hp


# ---------------------------------------------------------------------------- helpers


def _apply_grads(net: NetState, grads, tx, name: str):
  """One optimiser update; returns the new net state and its l2 norms."""
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  params = optax.apply_updates(net.params, updates)
  metrics = {f"{name}/grad_norm": tree.l2_norm(grads),
             f"{name}/update_norm": tree.l2_norm(updates),
             f"{name}/param_norm": tree.l2_norm(params)}
  return net.replace(params=params, opt_state=opt_state, step=net.step + 1), metrics


def _train(state: DistillState, nets: Nets, name: str, loss_fn):
  """One update of network ``name`` on ``loss_fn(params) -> (loss, metrics)``."""
  net = getattr(state, name)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(net.params)
  net, m = _apply_grads(net, grads, nets.txs[name], name)
  return state.replace(**{name: net}), {**metrics, **m}


def _x0(nets: Nets, apply, params, x_t, t, cond):
  """x0 prediction of a student network (no guidance) at ``t`` ``[B]``."""
  out = apply(params, x_t, nets.param.model_time(t), cond)
  return nets.param.to_x0(out, x_t, t)


def _batch_t(value, b):
  return jnp.full((b,), value, jnp.float32)


def generate(nets: Nets, params, noise: Array, cond, k, rng) -> Array:
  """Generator sample with DMD2 backward simulation (official ``sample_backward``).

  ``k`` no-grad generator steps from pure noise (predict x0, re-noise with fresh noise to
  the next conditioning time), then one step with gradient at ``gen_times[k]``. ``k`` is
  the same on every device (drawn from the replicated step key). With one conditioning
  time (``k = 0``) this is the one-step student: pure noise in, told ``t = gen_times[0]``.
  """
  times = jnp.asarray(nets.gen_times, jnp.float32)
  b = noise.shape[0]

  def body(i, x):
    x0 = sg(_x0(nets, nets.student, params, x, _batch_t(times[i], b), cond))
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape)     # fresh noise
    return nets.param.add_noise(x0, eps, _batch_t(times[i + 1], b))
  x = jax.lax.fori_loop(0, k, body, noise) if len(nets.gen_times) > 1 else noise
  return _x0(nets, nets.student, params, x, _batch_t(times[k], b), cond)


def _draw_k(nets: Nets, rng):
  """Backward-simulation depth ``k ~ U{0..N-1}`` (DMD2 §4.4), one value per step."""
  return jax.random.randint(rng, (), 0, len(nets.gen_times))


def _noise(nets: Nets, rng, cond) -> Array:
  b = jax.tree.leaves(cond)[0].shape[0]
  return jax.random.normal(rng, (b, *nets.latent_shape))


def _disc_logits(nets: Nets, backbone: Apply, backbone_params, disc_params, x_t, t, cond):
  """Discriminator = a frozen backbone's features at ``(x_t, t)`` + trainable heads.

  DMD2: the fake-score network's mid-block (its params get the D-loss gradient in the
  guidance turn). ADM: the frozen teacher's features at several levels.
  """
  _, feats = backbone(backbone_params, x_t, nets.param.model_time(t), cond, return_features=True)
  return nets.disc(disc_params, feats)


def _interleave(a, b):
  """``[B, ...]`` x2 -> ``[2B, ...]`` with rows a0, b0, a1, b1, ...: each device's rows of a
  batch-sharded pair stay on that device (a plain concat would move half the batch)."""
  return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def _real_and_fake(fn, real, fake):
  """``(fn(*real), fn(*fake))`` from one call of ``fn`` on the interleaved batch: one
  backbone pass over 2B samples instead of two over B (every network here treats samples
  independently: GroupNorm, attention and the heads are per sample)."""
  out = fn(*jax.tree.map(_interleave, real, fake))
  return jax.tree.map(lambda z: z[0::2], out), jax.tree.map(lambda z: z[1::2], out)


def _sample_t(rng, b, lo, hi):
  return S.sample_uniform_int(rng, b, lo, hi).astype(jnp.float32)


# ------------------------------------------------------------------- fake score (+ D)


def make_fake_score_step(nets: Nets, *, gan: bool = False) -> Callable:
  """Fake-score update on stop-gradient generator samples (DMD2 ``compute_loss_fake``:
  t ~ U[0, T), denoising loss in the teacher's parameterisation, no CFG).

  With ``gan`` (DMD2) this is the whole "guidance turn": the fake score and the
  classifier head on its mid-block features take one step on
  ``L_fake + gan_weight_d * L_D`` (DMD2 Eq. 4 with diffusion-GAN noising).
  """
  hp = nets.hp

  def step(state: DistillState, frozen, batch, rng):
    del frozen                              # the guidance turn never reads the teacher
    r = jax.random.split(rng, 6)
    cond = batch["cond"]
    noise = _noise(nets, r[0], cond)
    x0 = sg(generate(nets, state.generator.params, noise, cond, _draw_k(nets, r[1]), r[2]))
    b = x0.shape[0]
    t = _t_uniform(nets, r[3], b)
    eps = jax.random.normal(r[4], x0.shape)

    def loss_fn(fake_params, disc_params):
      loss = losses.fake_score_loss(nets.fake_apply, fake_params, x0, eps, t, cond, nets.param)
      metrics = {"fake_score/loss": loss}
      if gan:
        d_loss, m = _dmd2_d_loss(nets, fake_params, disc_params, x0, batch, r[5])
        loss = loss + hp["gan_weight_d"] * d_loss
        metrics.update(m)
      return loss, metrics

    disc_params = state.discriminator.params if gan else None
    (_, metrics), (g_fake, g_disc) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                        has_aux=True)(
        state.fake_score.params, disc_params)
    fake, m = _apply_grads(state.fake_score, g_fake, nets.txs["fake_score"], "fake_score")
    metrics.update(m)
    state = state.replace(fake_score=fake)
    if gan:
      disc, m = _apply_grads(state.discriminator, g_disc, nets.txs["discriminator"],
                             "discriminator")
      metrics.update(m)
      state = state.replace(discriminator=disc)
    return state, metrics
  return step


def _t_uniform(nets: Nets, rng, b):
  """Integer t ~ U{0..T-1} on VP schedules, continuous U(0, 1) on flow."""
  sched = nets.param.schedule
  if sched.is_vp:
    return _sample_t(rng, b, 0, sched.num_train_timesteps - 1)
  return S.sample_uniform(rng, b, 0.0, 1.0)


def _dmd2_d_loss(nets: Nets, fake_params, disc_params, x0_fake, batch, rng):
  """DMD2 D loss: real latents and generator samples, each noised at its own t (diffusion
  GAN, t ~ U[0, T)), scored by the head on the fake score's features (official
  ``compute_guidance_clean_cls_loss``: softplus(D_fake) + softplus(-D_real))."""
  d_fn, _ = losses.GAN_LOSSES[nets.hp["gan_loss"]]
  r = jax.random.split(rng, 4)
  real = batch["real"]
  b = real.shape[0]
  t_f, t_r = _t_uniform(nets, r[0], x0_fake.shape[0]), _t_uniform(nets, r[1], b)
  xf = nets.param.add_noise(x0_fake, jax.random.normal(r[2], x0_fake.shape), t_f)
  xr = nets.param.add_noise(real, jax.random.normal(r[3], real.shape), t_r)
  lr, lf = _real_and_fake(
      lambda x, t, c: _disc_logits(nets, nets.fake_apply, fake_params, disc_params, x, t, c),
      (xr, t_r, batch["real_cond"]), (xf, t_f, batch["cond"]))
  loss = d_fn(lr, lf)
  return loss, {"discriminator/loss": loss, "discriminator/real_logit": lr.mean(),
                "discriminator/fake_logit": lf.mean()}


# ------------------------------------------------------------------------- DMD2 G


def make_dmd2_generator_step(nets: Nets, *, gan: bool = True) -> Callable:
  """DMD2 generator update: distribution matching (DMD2 Eq. 2 as implemented in
  ``compute_distribution_matching_loss``) + the non-saturating GAN term."""
  hp = nets.hp

  def step(state: DistillState, frozen, batch, rng):
    r = jax.random.split(rng, 7)
    cond, uncond = batch["cond"], batch.get("uncond")
    noise = _noise(nets, r[0], cond)
    k = _draw_k(nets, r[1])
    fake_params = sg(state.fake_score.params)
    disc_params = sg(state.discriminator.params) if gan else None

    def loss_fn(gen_params):
      x0 = generate(nets, gen_params, noise, cond, k, r[2])              # [B, ...]
      b = x0.shape[0]
      # DM loss: t ~ U{20..980}, noising and both scores without gradient.
      t = _sample_t(r[3], b, hp["dm_t_min"], hp["dm_t_max"]) if nets.param.schedule.is_vp \
          else S.sample_uniform(r[3], b, hp["dm_t_min"] / 1000, hp["dm_t_max"] / 1000)
      x_t = sg(nets.param.add_noise(x0, jax.random.normal(r[4], x0.shape), t))
      x0_real = P.predict_x0(nets.teacher, sg(frozen["teacher"]), x_t, t, cond, uncond,
                             nets.cfg_scale, param=nets.param)
      x0_fake = _x0(nets, nets.fake_apply, fake_params, x_t, t, cond)
      l_dm, aux = losses.dm_loss(x0, x0_real, x0_fake)
      loss = hp["dm_weight"] * l_dm
      metrics = {"generator/dm_loss": l_dm, **{f"generator/{k_}": v for k_, v in aux.items()}}
      if gan:
        _, g_fn = losses.GAN_LOSSES[hp["gan_loss"]]
        t_g = _t_uniform(nets, r[5], b)
        x_g = nets.param.add_noise(x0, jax.random.normal(r[6], x0.shape), t_g)
        l_g = g_fn(_disc_logits(nets, nets.fake_apply, fake_params, disc_params, x_g, t_g,
                                cond))
        loss = loss + hp["gan_weight_g"] * l_g
        metrics["generator/gan_loss"] = l_g
      metrics["generator/loss"] = loss
      return loss, metrics

    return _train(state, nets, "generator", loss_fn)
  return step


# -------------------------------------------------------------------------------- ADM


def _adm_dt(nets: Nets) -> float:
  """ADM's Δt = T/64 (algorithms.md §2.1), in the schedule's own time units."""
  return nets.hp["adm_dt_fraction"] * nets.param.schedule.time_span


def _adm_t(nets: Nets, rng, b):
  """t ~ U(Δt, t_max) so that t - Δt stays on the schedule (fractional on VP)."""
  return S.sample_uniform(rng, b, _adm_dt(nets), nets.param.schedule.t_max)


def _adm_next(nets: Nets, apply, params, x_t, t, cond, uncond=None, cfg=1.0):
  """One PF-ODE step of length Δt from ``x_t`` with a score network (ADM's
  "latent prediction" x_{t-Δt}); CFG for the real score only."""
  x0 = P.predict_x0(apply, params, x_t, t, cond, uncond, cfg, param=nets.param)
  return nets.param.ode_step(x_t, x0, t, t - _adm_dt(nets))


def make_adm_generator_step(nets: Nets) -> Callable:
  """ADM generator update: L_G = -E[D(x^fake_{t-Δt}, t-Δt)] (hinge generator loss); the
  gradient reaches θ through x_t and the frozen fake score's ODE step."""

  def step(state: DistillState, frozen, batch, rng):
    r = jax.random.split(rng, 5)
    cond = batch["cond"]
    noise = _noise(nets, r[0], cond)
    k = _draw_k(nets, r[1])
    fake_params, disc_params = sg(state.fake_score.params), sg(state.discriminator.params)

    def loss_fn(gen_params):
      x0 = generate(nets, gen_params, noise, cond, k, r[2])
      t = _adm_t(nets, r[3], x0.shape[0])
      x_t = nets.param.add_noise(x0, jax.random.normal(r[4], x0.shape), t)
      fake_next = _adm_next(nets, nets.fake_apply, fake_params, x_t, t, cond)
      logits = _disc_logits(nets, nets.teacher, sg(frozen["teacher"]), disc_params, fake_next,
                            t - _adm_dt(nets), cond)
      loss = losses.hinge_g(logits)
      return loss, {"generator/loss": loss, "generator/adm_fake_logit": logits.mean()}

    return _train(state, nets, "generator", loss_fn)
  return step


def make_adm_discriminator_step(nets: Nets) -> Callable:
  """ADM discriminator update: hinge on the teacher's (CFG) vs the fake score's ODE step
  from the same x_t (data-free: no real images)."""

  def step(state: DistillState, frozen, batch, rng):
    r = jax.random.split(rng, 5)
    cond, uncond = batch["cond"], batch.get("uncond")
    noise = _noise(nets, r[0], cond)
    x0 = sg(generate(nets, state.generator.params, noise, cond, _draw_k(nets, r[1]), r[2]))
    t = _adm_t(nets, r[3], x0.shape[0])
    x_t = nets.param.add_noise(x0, jax.random.normal(r[4], x0.shape), t)
    real_next = sg(_adm_next(nets, nets.teacher, frozen["teacher"], x_t, t, cond, uncond,
                             nets.cfg_scale))
    fake_next = sg(_adm_next(nets, nets.fake_apply, state.fake_score.params, x_t, t, cond))
    t_next = t - _adm_dt(nets)

    def loss_fn(disc_params):
      lr, lf = _real_and_fake(
          lambda x, t, c: _disc_logits(nets, nets.teacher, sg(frozen["teacher"]),
                                       disc_params, x, t, c),
          (real_next, t_next, cond), (fake_next, t_next, cond))
      loss = losses.hinge_d(lr, lf)
      return loss, {"discriminator/loss": loss, "discriminator/real_logit": lr.mean(),
                    "discriminator/fake_logit": lf.mean()}

    return _train(state, nets, "discriminator", loss_fn)
  return step


# ------------------------------------------------------------------------- regression


def make_regression_step(nets: Nets) -> Callable:
  """ODE-pair regression pre-training (DMD2 one-step recipe; ADM ablation A1): the
  one-step generator maps the pair's noise to the teacher's latent; loss from config."""

  def step(state: DistillState, frozen, batch, rng):
    del frozen
    cond, noise, target = batch["cond"], batch["pair_noise"], batch["pair_latent"]

    def loss_fn(gen_params):
      x0 = generate(nets, gen_params, noise, cond, 0, rng)
      loss = losses.regression_loss(x0, target, nets.hp["regression"])
      return loss, {"generator/regression_loss": loss}

    return _train(state, nets, "generator", loss_fn)
  return step


# -------------------------------------------------------------------------------- ADP


def _t_cubic(nets: Nets, rng, b):
  """ADP's generator times ``t = (1 - u³) t_max``, biased to high noise (§2.1)."""
  return S.sample_cubic(rng, b, nets.param.schedule.t_max)


def _adp_input(nets: Nets, batch, rng):
  """The generator's input on an ODE pair ``(x_T, x_0)``: the pair interpolated at a
  cubic time. On a flow teacher ``add_noise`` *is* the rectified-flow interpolation
  ``(1 - t) x_0 + t x_T`` of the paper; on VP / v teachers it is the teacher's own
  forward process between the same two endpoints (same pair coupling, and the
  students keep the teacher's input scaling). ``hp["adp_onestep_fraction"]`` of the
  rows (in expectation) are the pure noise ``x_T`` at the student's one-step time."""
  noise, x0 = batch["pair_noise"], batch["pair_latent"]
  r_t, r_mask = jax.random.split(rng)
  t = _t_cubic(nets, r_t, x0.shape[0])                                     # [B]
  x_t = nets.param.add_noise(x0, noise, t)
  frac = nets.hp["adp_onestep_fraction"]
  if frac:          # rows given exactly what the one-step student sees at sampling time
    onestep = jax.random.bernoulli(r_mask, frac, t.shape)                  # [B]
    t = jnp.where(onestep, jnp.float32(nets.gen_times[0]), t)
    x_t = jnp.where(onestep.reshape(-1, *[1] * (x0.ndim - 1)), noise, x_t)
  return x_t, t


def _adp_logits(nets: Nets, frozen, disc_params, x0, cond, t, eps) -> dict:
  """``{"latent": D_τ1(x0 re-noised to t), "pixel": D_τ2(decode(x0))}`` (the branches
  that ``hp["adp_weights"]`` names). D_τ1 = frozen teacher + heads; D_τ2 = frozen pixel
  encoder on VAE-decoded images + heads."""
  out = {}
  if "latent" in nets.hp["adp_weights"]:
    x_t = nets.param.add_noise(x0, eps, t)
    out["latent"] = _disc_logits(nets, nets.teacher, sg(frozen["teacher"]),
                                 disc_params["latent"], x_t, t, cond)
  if "pixel" in nets.hp["adp_weights"]:
    decoder, encoder = sg(frozen["decoder"]), sg(frozen["pixel"])
    features = layers.map_microbatches(                  # decode: [B, H, W, 3] images
        lambda z: nets.pixel(encoder, nets.decode(decoder, z)), x0, nets.pixel_microbatches)
    out["pixel"] = nets.pixel_disc(disc_params["pixel"], features)
  return out


def make_adp_generator_step(nets: Nets) -> Callable:
  """ADP generator update (algorithms.md §2.1): from the pair interpolated at a cubic
  time, predict x̃_0; ``L_G = -E[λ1 D_τ1(x̃_t', t') + λ2 D_τ2(x̃_0)]`` with t' uniform
  (hinge generator loss), plus ``adp_regression_weight`` × the MSE to the pair's
  target in the teacher's parameterisation (the velocity on flow teachers), or on the
  x0 prediction with ``adp_regression_space="x0"``."""
  hp = nets.hp

  def step(state: DistillState, frozen, batch, rng):
    r = jax.random.split(rng, 3)
    cond = batch["cond"]
    x_t, t = _adp_input(nets, batch, r[0])
    t_d = _t_uniform(nets, r[1], x_t.shape[0])
    eps = jax.random.normal(r[2], x_t.shape)
    disc_params = sg(state.discriminator.params)

    def loss_fn(gen_params):
      out = nets.student(gen_params, x_t, nets.param.model_time(t), cond)
      x0 = nets.param.to_x0(out, x_t, t)
      logits = _adp_logits(nets, frozen, disc_params, x0, cond, t_d, eps)
      loss = losses.weighted_hinge_g(logits, hp["adp_weights"])
      metrics = {"generator/adp_gan_loss": loss,
                 **{f"generator/{k}_fake_logit": v.mean() for k, v in logits.items()}}
      if hp["adp_regression_weight"]:
        if hp["adp_regression_space"] == "x0":
          l_reg = losses.regression_loss(x0, batch["pair_latent"], hp["regression"])
        else:
          target = nets.param.target(batch["pair_latent"], batch["pair_noise"], t)
          l_reg = losses.regression_loss(out, target, hp["regression"])
        loss = loss + hp["adp_regression_weight"] * l_reg
        metrics["generator/regression_loss"] = l_reg
      metrics["generator/loss"] = loss
      return loss, metrics

    return _train(state, nets, "generator", loss_fn)
  return step


def make_adp_discriminator_step(nets: Nets) -> Callable:
  """ADP discriminator update: weighted hinge (λ1 latent, λ2 pixel) with the teacher's
  ODE target x_0 as real and the generator's x̃_0 as fake, both re-noised to the same
  uniform t' for the latent branch (algorithms.md §2.1)."""

  def step(state: DistillState, frozen, batch, rng):
    r = jax.random.split(rng, 4)
    cond = batch["cond"]
    x_t, t = _adp_input(nets, batch, r[0])
    out = nets.student(state.generator.params, x_t, nets.param.model_time(t), cond)
    x0_fake = sg(nets.param.to_x0(out, x_t, t))
    t_d = _t_uniform(nets, r[1], x_t.shape[0])
    eps_r, eps_f = (jax.random.normal(k, x_t.shape) for k in r[2:])

    def loss_fn(disc_params):
      real, fake = _real_and_fake(
          lambda x, c, t, e: _adp_logits(nets, frozen, disc_params, x, c, t, e),
          (batch["pair_latent"], cond, t_d, eps_r), (x0_fake, cond, t_d, eps_f))
      loss = losses.weighted_hinge_d(real, fake, nets.hp["adp_weights"])
      metrics = {"discriminator/loss": loss}
      for k in real:
        metrics[f"discriminator/{k}_real_logit"] = real[k].mean()
        metrics[f"discriminator/{k}_fake_logit"] = fake[k].mean()
      return loss, metrics

    return _train(state, nets, "discriminator", loss_fn)
  return step
