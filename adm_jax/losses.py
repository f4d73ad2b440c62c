"""Distillation losses: DMD2 distribution matching, denoising, GAN, ODE-pair regression.

Pure functions on ``jnp`` arrays; all maths in float32 (inputs are cast up). Latents may
have any rank, ``[B, H, W, C]`` images or ``[B, T, H, W, C]`` videos: every per-sample
reduction runs over *all* non-batch axes, and per-sample scalars (``t``, ``s``,
weights, ``[B]``) broadcast over the trailing axes. Nothing here knows the model family:
the teacher / fake score / student are reached through a
:class:`~adm_jax.parameterization.Parameterization` (``to_x0``, ``add_noise``,
``target``, ``ode_step``).

References (see ``shared/reference/algorithms.md``):

* DMD2 (Yin et al. 2024): :func:`dm_loss` (§1.1, official
  ``SDGuidance.compute_distribution_matching_loss``), :func:`fake_score_loss`
  (``compute_loss_fake``), the non-saturating GAN (Eq. 4;
  ``compute_guidance_clean_cls_loss`` / ``compute_generator_clean_cls_loss``).
* ADM / DMDX (Lu et al. 2025): hinge GAN on one-PF-ODE-step-ahead latents
  (:func:`hinge_d`, :func:`hinge_g`, :func:`ode_step_pair`, Δt = T / 64, §2.1) and ADP's
  hybrid latent / pixel discriminators (:func:`weighted_hinge_d`,
  :func:`weighted_hinge_g`, λ1 = 0.85, λ2 = 0.15) on rectified-flow interpolants of ODE
  pairs (:func:`rectified_flow_interp`).
* ODE-pair regression (DMD2 one-step pre-training, Diffusion2GAN, ADP's velocity MSE):
  :func:`regression_loss` with MSE or the pseudo-Huber loss of improved consistency
  training (Song & Dhariwal 2023).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from adm_jax import schedules as S
from adm_jax.parameterization import ApplyFn, Parameterization

Array = jax.Array


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def _non_batch_axes(x: Array) -> tuple[int, ...]:
  return tuple(range(1, jnp.ndim(x)))


def _per_sample_mean(x: Array) -> Array:
  """Mean over all non-batch axes: ``[B, ...] -> [B]``."""
  return jnp.mean(x, axis=_non_batch_axes(x))


def _weighted_batch_mean(per_sample: Array, weight=None) -> Array:
  """``mean_b(w_b * l_b)`` (``w = 1`` when ``weight`` is None); scalar."""
  if weight is None:
    return jnp.mean(per_sample)
  return jnp.mean(S.bcast(weight, per_sample) * per_sample)


# ---------------------------------------------------------------------------------------
# DMD2 distribution matching.
# ---------------------------------------------------------------------------------------


def dm_grad(x: Array, x0_real: Array, x0_fake: Array) -> tuple[Array, Array]:
  """DMD2's normalised distribution-matching direction (no gradient flows through it).

  Official ``compute_distribution_matching_loss`` (under ``torch.no_grad``)::

    p_real = x - x0_real ; p_fake = x - x0_fake
    grad = (p_real - p_fake) / |p_real|.mean(dim=[1, 2, 3], keepdim=True)
    grad = torch.nan_to_num(grad)

  i.e. ``(x0_fake - x0_real) / mean|x - x0_real|`` per sample. This is the paper's Eq. 2
  score difference ``s_fake - s_real`` (up to the per-sample scale), with the mean
  taken over every non-batch axis so that video latents work alike.

  Args:
    x: ``[B, ...]`` generator output (x0 sample).
    x0_real: ``[B, ...]`` real-score (teacher, with CFG) x0 prediction at ``(x_t, t)``.
    x0_fake: ``[B, ...]`` fake-score x0 prediction at ``(x_t, t)``.

  Returns:
    ``(grad, normaliser)``: ``[B, ...]`` and ``[B]``, float32, stop-gradiented.
  """
  x = jax.lax.stop_gradient(_f32(x))
  x0_real = jax.lax.stop_gradient(_f32(x0_real))
  x0_fake = jax.lax.stop_gradient(_f32(x0_fake))
  p_real = x - x0_real                                                   # [B, ...]
  p_fake = x - x0_fake                                                   # [B, ...]
  normaliser = _per_sample_mean(jnp.abs(p_real))                         # [B]
  grad = (p_real - p_fake) / S.bcast(normaliser, p_real)                 # [B, ...]
  # torch.nan_to_num: NaN -> 0, ±inf -> ±float max (as upstream; 0/0 when x == x0_real).
  grad = jnp.nan_to_num(grad)
  return grad, normaliser


def dm_loss(x: Array, x0_real: Array, x0_fake: Array) -> tuple[Array, dict[str, Array]]:
  """DMD2 distribution-matching loss, as the official code (algorithms.md §1.1).

  ``loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")`` with ``grad``
  from :func:`dm_grad`, so ``d loss / d x = grad / x.size``: a gradient-descent step
  moves ``x`` along ``(x0_real - x0_fake) / mean|x - x0_real|``. The value itself is
  ``0.5 * mean(grad²)`` (it is a surrogate; only its gradient matters). ``x0_real`` and
  ``x0_fake`` are treated as constants.

  Note (as upstream): where ``x == x0_real`` on a whole sample but ``x0_fake`` differs,
  ``grad`` becomes ±float-max and the loss value overflows to ``inf``.

  Args:
    x: ``[B, ...]`` generator output; the gradient flows into it.
    x0_real: ``[B, ...]`` real-score x0 prediction (constant).
    x0_fake: ``[B, ...]`` fake-score x0 prediction (constant).

  Returns:
    ``(loss, aux)``: scalar float32 loss; ``aux`` has ``loss_dm``, ``dm_grad_norm``
    (``mean|grad|``), ``dm_grad_l2`` (``||grad||_2`` over the batch, upstream's
    ``dmtrain_gradient_norm``) and ``dm_normalizer`` (batch mean of
    ``mean|x - x0_real|``).
  """
  x = _f32(x)                                                            # [B, ...]
  grad, normaliser = dm_grad(x, x0_real, x0_fake)                        # [B, ...], [B]
  target = jax.lax.stop_gradient(x - grad)                               # [B, ...]
  loss = 0.5 * jnp.mean(jnp.square(x - target))                          # scalar
  aux = {
      "loss_dm": loss,
      "dm_grad_norm": jnp.mean(jnp.abs(grad)),
      "dm_grad_l2": jnp.sqrt(jnp.sum(jnp.square(grad))),
      "dm_normalizer": jnp.mean(normaliser),
  }
  return loss, aux


# ---------------------------------------------------------------------------------------
# Fake-score denoising loss.
# ---------------------------------------------------------------------------------------


def denoising_loss(pred: Array, target: Array, weight=None) -> Array:
  """Mean squared error of a denoiser in its own parameterisation.

  Official DMD2 ``compute_loss_fake`` (SD / SDXL): ``mean((eps_pred - eps)²)`` over all
  elements; here the target is whatever ``param.target`` gives (ε, v or flow velocity).

  Args:
    pred: ``[B, ...]`` raw network output.
    target: ``[B, ...]`` regression target.
    weight: optional per-sample weights ``[B]``: ``mean_b(w_b * mean_{...}(d²))``.

  Returns:
    Scalar float32.
  """
  se = jnp.square(_f32(pred) - _f32(target))                             # [B, ...]
  return _weighted_batch_mean(_per_sample_mean(se), weight)


def fake_score_loss(apply_fn: ApplyFn, params, x0: Array, eps: Array, t, cond,
                    param: Parameterization, weight=None) -> Array:
  """Denoising loss of the fake score on (detached) generator samples.

  DMD2 ``compute_loss_fake``: ``x_t = add_noise(x0.detach(), eps, t)``, no CFG, MSE
  between the network output and the target in the model's own parameterisation.

  Args:
    apply_fn: ``apply_fn(params, x_t, model_time, cond) -> raw output [B, ...]``.
    params: fake-score parameters (the gradient flows into these).
    x0: ``[B, ...]`` generator samples (stop-gradiented here).
    eps: ``[B, ...]`` Gaussian noise.
    t: ``[B]`` (or scalar) times in the schedule's convention.
    cond: conditioning pytree with leading batch axis.
    param: the fake score's :class:`Parameterization`.
    weight: optional per-sample weights ``[B]``.

  Returns:
    Scalar float32 loss.
  """
  x0 = jax.lax.stop_gradient(_f32(x0))                                   # [B, ...]
  eps = _f32(eps)                                                        # [B, ...]
  t_b = jnp.broadcast_to(jnp.asarray(t), (x0.shape[0],))                 # [B]
  x_t = param.add_noise(x0, eps, t_b)                                    # [B, ...]
  pred = apply_fn(params, x_t, param.model_time(t_b), cond)              # [B, ...]
  target = param.target(x0, eps, t_b)                                    # [B, ...]
  return denoising_loss(pred, target, weight)


# ---------------------------------------------------------------------------------------
# GAN losses on logits (any shape; means are taken separately for real and fake).
# ---------------------------------------------------------------------------------------


def gan_d_nonsaturating(real_logits: Array, fake_logits: Array) -> Array:
  """Non-saturating discriminator loss (DMD2 Eq. 4).

  Official ``compute_guidance_clean_cls_loss``:
  ``mean(softplus(D_fake)) + mean(softplus(-D_real))``
  ``= -mean(log(1 - sigmoid(D_fake))) - mean(log sigmoid(D_real))``.
  """
  return (jnp.mean(jax.nn.softplus(_f32(fake_logits)))
          + jnp.mean(jax.nn.softplus(-_f32(real_logits))))


def gan_g_nonsaturating(fake_logits: Array) -> Array:
  """Non-saturating generator loss (DMD2 Eq. 4, ``compute_generator_clean_cls_loss``):
  ``mean(softplus(-D_fake)) = -mean(log sigmoid(D_fake))``."""
  return jnp.mean(jax.nn.softplus(-_f32(fake_logits)))


def hinge_d(real_logits: Array, fake_logits: Array) -> Array:
  """Hinge discriminator loss (ADM L_D(τ), algorithms.md §2.1):
  ``mean(relu(1 + D_fake)) + mean(relu(1 - D_real))``."""
  return (jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
          + jnp.mean(jax.nn.relu(1.0 - _f32(real_logits))))


def hinge_g(fake_logits: Array) -> Array:
  """Hinge generator loss (ADM L_G(θ) = E[-D(x_fake)], algorithms.md §2.1)."""
  return -jnp.mean(_f32(fake_logits))


GanPair = tuple[Callable[[Array, Array], Array], Callable[[Array], Array]]

GAN_LOSSES: dict[str, GanPair] = {
    "nonsaturating": (gan_d_nonsaturating, gan_g_nonsaturating),
    "hinge": (hinge_d, hinge_g),
}


def get_gan_loss(kind: str):
  """``(d_fn, g_fn)`` of :data:`GAN_LOSSES`; ``ValueError`` naming the valid kinds."""
  try:
    return GAN_LOSSES[kind]
  except KeyError:
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of "
                     f"{sorted(GAN_LOSSES)}") from None


# ADP's hybrid discriminators: latent-space teacher discriminator D_τ1 (λ1) and
# pixel-space SAM discriminator D_τ2 (λ2) (algorithms.md §2.1).
ADP_DISC_WEIGHTS: dict[str, float] = {"latent": 0.85, "pixel": 0.15}


def _head_mean(fn: Callable[[Array], Array], logits) -> Array:
  """``fn`` on one logits array, or the mean of ``fn`` over a sequence of heads."""
  if isinstance(logits, (list, tuple)):
    if not logits:
      raise ValueError("empty sequence of discriminator logits")
    return sum(fn(l) for l in logits) / len(logits)
  return fn(logits)


def _check_keys(weights: Mapping[str, float], *logit_dicts: Mapping[str, Any]) -> None:
  for d in logit_dicts:
    if set(d) != set(weights):
      raise ValueError(f"discriminator logits have keys {sorted(d)} but weights have "
                       f"{sorted(weights)}")


def weighted_hinge_d(real_logits: Mapping[str, Any], fake_logits: Mapping[str, Any],
                     weights: Mapping[str, float] | None = None) -> Array:
  """Weighted hinge discriminator loss over several discriminators (ADP).

  algorithms.md §2.1::

    L_D = E[ λ1 max(0, 1 + D_τ1(x̃_t')) + λ2 max(0, 1 + D_τ2(x̃_0))
           + λ1 max(0, 1 - D_τ1(x_t'))  + λ2 max(0, 1 - D_τ2(x_0)) ]

  i.e. ``sum_k w_k * hinge_d(real_k, fake_k)``.

  Args:
    real_logits: ``{name: logits}`` on real (teacher ODE target) inputs; a value may be
      a list / tuple of per-head logits, whose hinge terms are averaged.
    fake_logits: ``{name: logits}`` on generator inputs, same keys.
    weights: ``{name: λ}``; default :data:`ADP_DISC_WEIGHTS` (latent 0.85, pixel 0.15).

  Returns:
    Scalar float32.
  """
  weights = ADP_DISC_WEIGHTS if weights is None else weights
  _check_keys(weights, real_logits, fake_logits)
  total = jnp.float32(0.0)
  for k, w in weights.items():
    real_term = _head_mean(lambda l: jnp.mean(jax.nn.relu(1.0 - _f32(l))), real_logits[k])
    fake_term = _head_mean(lambda l: jnp.mean(jax.nn.relu(1.0 + _f32(l))), fake_logits[k])
    total = total + jnp.float32(w) * (real_term + fake_term)
  return total


def weighted_hinge_g(fake_logits: Mapping[str, Any],
                     weights: Mapping[str, float] | None = None) -> Array:
  """Weighted hinge generator loss (ADP, algorithms.md §2.1):
  ``L_G = -E[λ1 D_τ1(x̃_t') + λ2 D_τ2(x̃_0)] = sum_k w_k * hinge_g(fake_k)``.

  Args:
    fake_logits: ``{name: logits}`` (a value may be a list / tuple of per-head logits,
      averaged).
    weights: ``{name: λ}``; default :data:`ADP_DISC_WEIGHTS`.
  """
  weights = ADP_DISC_WEIGHTS if weights is None else weights
  _check_keys(weights, fake_logits)
  total = jnp.float32(0.0)
  for k, w in weights.items():
    total = total + jnp.float32(w) * _head_mean(hinge_g, fake_logits[k])
  return total


# ---------------------------------------------------------------------------------------
# ODE-pair regression.
# ---------------------------------------------------------------------------------------


def default_huber_c(x: Array) -> float:
  """Improved consistency training's ``c = 0.00054 * sqrt(d)``, ``d`` = elements per
  sample of ``x`` (``[B, ...]``) (Song & Dhariwal 2023, §3.3)."""
  d = math.prod(jnp.shape(x)[1:])
  return 0.00054 * math.sqrt(d)


def mse_per_sample(pred: Array, target: Array) -> Array:
  """``mean_{non-batch}((pred - target)²)``: ``[B, ...] -> [B]``."""
  return _per_sample_mean(jnp.square(_f32(pred) - _f32(target)))


def pseudo_huber_per_sample(pred: Array, target: Array, c: float | None = None) -> Array:
  """Pseudo-Huber ``sqrt(||pred - target||² + c²) - c`` per sample (iCT §3.3).

  The norm is the L2 norm over all non-batch elements. ``≈ ||d||² / (2c)`` for
  ``||d|| << c`` and ``≈ ||d|| - c`` for ``||d|| >> c``. ``[B, ...] -> [B]``.

  Args:
    pred, target: ``[B, ...]``.
    c: the Huber scale; default :func:`default_huber_c`.
  """
  pred, target = _f32(pred), _f32(target)
  c = default_huber_c(pred) if c is None else c
  c = jnp.float32(c)
  sq = jnp.sum(jnp.square(pred - target), axis=_non_batch_axes(pred))   # [B]
  # sqrt(sq + c²) - c written as sq / (sqrt(sq + c²) + c): equal, but free of float32
  # cancellation when ||d|| << c.
  return sq / (jnp.sqrt(sq + c * c) + c)


REGRESSION_LOSSES: dict[str, Callable[..., Array]] = {
    "mse": mse_per_sample,
    "pseudo_huber": pseudo_huber_per_sample,
}


def regression_loss(pred: Array, target: Array, kind: str = "mse",
                    huber_c: float | None = None, weight=None) -> Array:
  """Regression of a student output onto an ODE-pair target, batch-averaged.

  ``"mse"``: ``mean((pred - target)²)`` (ADP's velocity MSE / "Rectified Flow"
  ablation; note DMD2's official one-step pre-training uses LPIPS, not MSE).
  ``"pseudo_huber"``: :func:`pseudo_huber_per_sample` (iCT; Diffusion2GAN's ablation).

  Args:
    pred, target: ``[B, ...]``.
    kind: a key of :data:`REGRESSION_LOSSES`.
    huber_c: pseudo-Huber ``c`` (default ``0.00054 * sqrt(d)``); ignored for ``"mse"``.
    weight: optional per-sample weights ``[B]``.

  Returns:
    Scalar float32.

  Raises:
    ValueError: unknown ``kind``.
  """
  if kind not in REGRESSION_LOSSES:
    raise ValueError(f"unknown regression loss {kind!r}; expected one of "
                     f"{sorted(REGRESSION_LOSSES)}")
  if kind == "pseudo_huber":
    per_sample = pseudo_huber_per_sample(pred, target, huber_c)          # [B]
  else:
    per_sample = REGRESSION_LOSSES[kind](pred, target)                   # [B]
  return _weighted_batch_mean(per_sample, weight)


# ---------------------------------------------------------------------------------------
# ADM: one PF-ODE step ahead with the real and fake scores.
# ---------------------------------------------------------------------------------------

ADM_DT_DIVISIONS = 64


def adm_delta_t(schedule: S.Schedule, divisions: int = ADM_DT_DIVISIONS) -> float:
  """ADM's step length ``Δt = T / 64`` in the schedule's time units (VP: 15.625
  timesteps, fractional; flow: 1/64 of unshifted time) (algorithms.md §2.1)."""
  return schedule.time_span / divisions


def ode_step_pair(param: Parameterization, x_t: Array, t, x0_real: Array,
                  x0_fake: Array, dt: float | None = None
                  ) -> tuple[Array, Array, Array]:
  """ADM's real / fake latents one PF-ODE step ahead (algorithms.md §2.1).

  ``x_{t-Δt}^real = param.ode_step(x_t, x0_real, t, t - Δt)`` (teacher with CFG) and
  ``x_{t-Δt}^fake`` the same with the fake score's x0, where ``x_t = add_noise(x̂0, ε,
  t)`` from the generator sample. The discriminator is then fed both at ``t - Δt``.
  ``t - Δt`` is clipped at ``schedule.t_clean`` (VP: any ``t < 0`` means ᾱ = final;
  flow: 0), so a step from ``t < Δt`` lands on the clean end. Gradients flow through
  ``x_t`` and both x0 predictions as given; the caller decides what to stop-gradient.

  Args:
    param: the :class:`Parameterization` of the teacher (supplies ``ode_step``).
    x_t: ``[B, ...]`` noisy generator sample at ``t``.
    t: ``[B]`` (or scalar) times.
    x0_real: ``[B, ...]`` real-score x0 prediction at ``(x_t, t)``.
    x0_fake: ``[B, ...]`` fake-score x0 prediction at ``(x_t, t)``.
    dt: step length; default :func:`adm_delta_t` (``time_span / 64``).

  Returns:
    ``(x_real_next, x_fake_next, t_next)``: ``[B, ...]``, ``[B, ...]`` float32 and
    ``t_next`` of the shape of ``t``.
  """
  dt = adm_delta_t(param.schedule) if dt is None else dt
  t = _f32(t)
  t_next = jnp.maximum(t - jnp.float32(dt), jnp.float32(param.schedule.t_clean))
  x_real = param.ode_step(x_t, x0_real, t, t_next)                       # [B, ...]
  x_fake = param.ode_step(x_t, x0_fake, t, t_next)                       # [B, ...]
  return x_real, x_fake, t_next


# ---------------------------------------------------------------------------------------
# ADP: rectified-flow interpolation of ODE pairs.
# ---------------------------------------------------------------------------------------


def rectified_flow_interp(noise: Array, x0: Array, s) -> tuple[Array, Array]:
  """ADP's student input and target on an ODE pair (algorithms.md §2.1).

  ``x_s = (1 - s) x0 + s noise`` and velocity ``v = d x_s / d s = noise - x0``, with
  ``(noise, x0)`` a teacher ODE pair ``(x_T, x_0)``.

  Args:
    noise: ``[B, ...]`` the pair's starting noise.
    x0: ``[B, ...]`` the pair's ODE endpoint.
    s: ``[B]`` (or scalar) interpolation times in ``[0, 1]`` (1 = pure noise).

  Returns:
    ``(x_s, v_target)``, both ``[B, ...]`` float32.
  """
  noise, x0 = _f32(noise), _f32(x0)
  s_b = S.bcast(s, x0)                                                   # [B, 1, ...]
  x_s = (1.0 - s_b) * x0 + s_b * noise                                   # [B, ...]
  return x_s, noise - x0


__all__ = [
    "dm_grad", "dm_loss", "denoising_loss", "fake_score_loss",
    "gan_d_nonsaturating", "gan_g_nonsaturating", "hinge_d", "hinge_g", "GAN_LOSSES",
    "get_gan_loss", "ADP_DISC_WEIGHTS", "weighted_hinge_d", "weighted_hinge_g",
    "default_huber_c", "mse_per_sample", "pseudo_huber_per_sample", "REGRESSION_LOSSES",
    "regression_loss", "ADM_DT_DIVISIONS", "adm_delta_t", "ode_step_pair",
    "rectified_flow_interp",
]
