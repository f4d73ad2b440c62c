"""Model-output adapters: ε (SDXL), v (CogVideoX) and flow velocity (SD3).

Every loss and sampler talks to a teacher, fake score or student through one of these,
so none of them knows the model family:

* ``param.add_noise(x0, eps, t)``: forward process at time ``t`` (``[B]``).
* ``param.model_time(t)``: what the network is fed (VP: the (fractional) timestep;
  flow: ``sigma * 1000``).
* ``param.to_x0(pred, x_t, t)`` / ``param.to_eps(...)``: raw network output -> x0 / ε.
* ``param.from_x0(x0, x_t, t)``: the raw output that would give ``x0`` (inverse).
* ``param.target(x0, eps, t)``: the regression target of a denoising loss in the
  model's own parameterisation (ε, v or ``eps - x0``).
* ``param.ode_step(x_t, x0_pred, t, t_next)``: one deterministic PF-ODE step
  (DDIM for VP, Euler for flow; the same update, see :mod:`adm_jax.schedules`).

:func:`predict_x0` adds classifier-free guidance on the raw output, with the
conditional and unconditional inputs batched into one forward pass.

Time conventions (from :class:`~adm_jax.schedules.Schedule`): VP ``t`` is the timestep
in ``[0, T - 1]`` (fractional allowed, ``t < 0`` = clean); flow ``t`` is the unshifted
time in ``[0, 1]``. Per-sample ``t`` (``[B]``) broadcasts over all trailing latent axes.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from adm_jax import schedules as S
from adm_jax.schedules import Schedule

Array = jax.Array
ApplyFn = Callable[[Any, Array, Array, Any], Array]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Base adapter; subclasses fix the meaning of the raw model output.

  Attributes:
    schedule: the forward process.
  """
  schedule: Schedule
  name: str = dataclasses.field(default="", init=False)

  # -- forward process ------------------------------------------------------------------

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """``(alpha_t, sigma_t)``, float32 of the shape of ``t``."""
    return self.schedule.alpha_sigma(t)

  def model_time(self, t) -> Array:
    """The time the network is conditioned on (float32, shape of ``t``)."""
    return self.schedule.model_time(t)

  def add_noise(self, x0: Array, eps: Array, t) -> Array:
    """``x_t = alpha_t x0 + sigma_t eps``; ``x0, eps``: ``[B, ...]``, ``t``: ``[B]``."""
    return self.schedule.add_noise(x0, eps, t)

  # -- conversions (subclasses) ---------------------------------------------------------

  def to_x0(self, pred: Array, x_t: Array, t) -> Array:
    raise NotImplementedError

  def to_eps(self, pred: Array, x_t: Array, t) -> Array:
    raise NotImplementedError

  def from_x0(self, x0: Array, x_t: Array, t) -> Array:
    raise NotImplementedError

  def target(self, x0: Array, eps: Array, t) -> Array:
    raise NotImplementedError

  # -- solver ---------------------------------------------------------------------------

  def ode_step(self, x_t: Array, x0_pred: Array, t, t_next) -> Array:
    """Deterministic PF-ODE step from ``t`` to ``t_next`` given an x0 prediction.

    DDIM (eta = 0) for VP (``t_next < 0``: the final step to ᾱ = final, i.e. x0 with
    ``set_alpha_to_one``); identical to the Euler step for flow. ``[B, ...]`` float32.
    """
    a, s = self.alpha_sigma(t)
    a2, s2 = self.alpha_sigma(t_next)
    return S.ddim_step(x_t, x0_pred, a, s, a2, s2)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EpsilonVP(Parameterization):
  """ε-prediction on a discrete VP schedule (SD / SDXL)."""
  schedule: Schedule = dataclasses.field(default_factory=Schedule.vp)
  name: str = dataclasses.field(default="epsilon", init=False)

  def to_x0(self, pred, x_t, t):
    return S.eps_to_x0(pred, x_t, *self.alpha_sigma(t))

  def to_eps(self, pred, x_t, t):
    del x_t, t
    return jnp.asarray(pred, jnp.float32)

  def from_x0(self, x0, x_t, t):
    return S.x0_to_eps(x0, x_t, *self.alpha_sigma(t))

  def target(self, x0, eps, t):
    del x0, t
    return jnp.asarray(eps, jnp.float32)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPrediction(Parameterization):
  """v-prediction ``v = alpha eps - sigma x0`` on a VP schedule (CogVideoX)."""
  schedule: Schedule = dataclasses.field(default_factory=Schedule.vp)
  name: str = dataclasses.field(default="v_prediction", init=False)

  def to_x0(self, pred, x_t, t):
    return S.v_to_x0(pred, x_t, *self.alpha_sigma(t))

  def to_eps(self, pred, x_t, t):
    return S.v_to_eps(pred, x_t, *self.alpha_sigma(t))

  def from_x0(self, x0, x_t, t):
    return S.x0_to_v(x0, x_t, *self.alpha_sigma(t))

  def target(self, x0, eps, t):
    return S.v_target(x0, eps, *self.alpha_sigma(t))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FlowVelocity(Parameterization):
  """Rectified-flow velocity ``u = eps - x0`` (SD3), ``x_s = (1 - s) x0 + s eps``."""
  schedule: Schedule = dataclasses.field(default_factory=lambda: Schedule.flow(3.0))
  name: str = dataclasses.field(default="flow", init=False)

  def __post_init__(self):
    if self.schedule.is_vp:
      raise ValueError("FlowVelocity needs a flow schedule")

  def to_x0(self, pred, x_t, t):
    return S.flow_to_x0(pred, x_t, self.alpha_sigma(t)[1])

  def to_eps(self, pred, x_t, t):
    return S.flow_to_eps(pred, x_t, self.alpha_sigma(t)[1])

  def from_x0(self, x0, x_t, t):
    return S.x0_to_flow(x0, x_t, self.alpha_sigma(t)[1])

  def target(self, x0, eps, t):
    del t
    return S.flow_target(x0, eps)

  def ode_step(self, x_t, x0_pred, t, t_next):
    """Euler ``x_{s'} = x_s + (s' - s) u`` with ``u = (x_s - x0) / s``."""
    s, s2 = self.alpha_sigma(t)[1], self.alpha_sigma(t_next)[1]
    return S.flow_euler_step(x_t, S.x0_to_flow(x0_pred, x_t, s), s, s2)


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    "epsilon": EpsilonVP,
    "v_prediction": VPrediction,
    "flow": FlowVelocity,
}


def make(name: str, schedule: Schedule | None = None, **schedule_kw) -> Parameterization:
  """Builds a parameterisation by registry name.

  Args:
    name: ``"epsilon"``, ``"v_prediction"`` or ``"flow"``.
    schedule: the forward process; if ``None`` it is built from ``schedule_kw`` with
      :meth:`Schedule.vp` (epsilon / v) or :meth:`Schedule.flow` (flow), e.g.
      ``make("flow", shift=3.0)`` or ``make("v_prediction", rescale_zero_snr=True,
      snr_shift_scale=3.0)``.
  """
  try:
    cls = PARAMETERIZATIONS[name]
  except KeyError:
    raise ValueError(f"unknown parameterization {name!r}; "
                     f"expected one of {sorted(PARAMETERIZATIONS)}") from None
  if schedule is None:
    schedule = (Schedule.flow(**schedule_kw) if cls is FlowVelocity
                else Schedule.vp(**schedule_kw))
  elif schedule_kw:
    raise TypeError("pass either a schedule or schedule keywords, not both")
  return cls(schedule)


def from_diffusers_config(config: dict) -> Parameterization:
  """Parameterisation of a diffusers ``scheduler_config.json`` dict (flow-matching
  schedulers -> ``"flow"``; otherwise its ``prediction_type``)."""
  schedule = S.schedule_from_diffusers_config(config)
  if not schedule.is_vp:
    return FlowVelocity(schedule)
  pred = config.get("prediction_type", "epsilon")
  if pred not in ("epsilon", "v_prediction"):
    raise NotImplementedError(f"prediction_type {pred!r}")
  return PARAMETERIZATIONS[pred](schedule)


# ---------------------------------------------------------------------------------------
# Classifier-free guidance.
# ---------------------------------------------------------------------------------------


def _concat_batch(a, b):
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def guided_output(apply_fn: ApplyFn, params, x_t: Array, t, cond, uncond=None,
                  cfg_scale: float = 1.0, *, param: Parameterization) -> Array:
  """Raw model output with classifier-free guidance, float32 ``[B, ...]``.

  ``out = out_uncond + w (out_cond - out_uncond)`` when ``w > 1``, computed in one
  forward pass on the batch ``[cond; uncond]``. For ``w <= 1`` the plain conditional
  output is returned (official DMD2: no guidance, not ``uncond + w (cond - uncond)``),
  and ``uncond`` is not used.

  Args:
    apply_fn: ``apply_fn(params, x_t, model_time, cond) -> raw output`` ``[B, ...]``.
    params: network parameters (any pytree).
    x_t: ``[B, ...]`` noisy latents (passed in their own dtype).
    t: ``[B]`` (or scalar) times in the schedule's convention.
    cond: conditioning pytree, every leaf with leading batch axis ``B``.
    uncond: unconditional pytree of the same structure (required when ``w > 1``).
    cfg_scale: guidance scale ``w``. A Python number selects the branch at trace time;
      a traced scalar runs the batched pass and selects with ``jnp.where``.
    param: the :class:`Parameterization` (gives ``model_time``).
  """
  b = x_t.shape[0]
  t_b = jnp.broadcast_to(jnp.asarray(t), (b,) + jnp.shape(t)[1:])        # [B, ...]
  mt = param.model_time(t_b)                                             # [B, ...]
  static = isinstance(cfg_scale, numbers.Real)
  if static and cfg_scale <= 1.0:
    return jnp.asarray(apply_fn(params, x_t, mt, cond), jnp.float32)
  if uncond is None:
    raise ValueError("classifier-free guidance with cfg_scale > 1 needs `uncond`")
  out = apply_fn(params, jnp.concatenate([x_t, x_t], 0), jnp.concatenate([mt, mt], 0),
                 _concat_batch(cond, uncond))                            # [2B, ...]
  out = jnp.asarray(out, jnp.float32)
  out_c, out_u = out[:b], out[b:]                                        # [B, ...]
  w = jnp.asarray(cfg_scale, jnp.float32)
  guided = out_u + w * (out_c - out_u)
  if static:
    return guided
  return jnp.where(w > 1.0, guided, out_c)


def predict_x0(apply_fn: ApplyFn, params, x_t: Array, t, cond, uncond=None,
               cfg_scale: float = 1.0, *, param: Parameterization) -> Array:
  """x0 prediction with classifier-free guidance on the raw output, float32 ``[B, ...]``.

  See :func:`guided_output`; guidance is applied to the model's own output (ε, v or
  velocity), which is affine in x0 for fixed ``(x_t, t)``, so it equals guidance on x0.
  """
  out = guided_output(apply_fn, params, x_t, t, cond, uncond, cfg_scale, param=param)
  return param.to_x0(out, x_t, t)


__all__ = ["Parameterization", "EpsilonVP", "VPrediction", "FlowVelocity",
           "PARAMETERIZATIONS", "make", "from_diffusers_config", "guided_output",
           "predict_x0"]
