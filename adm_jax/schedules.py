"""Noise schedules, parameterisation conversions, timestep samplers and ODE steps.

Two families of forward process, both written as ``x_t = alpha_t * x0 + sigma_t * eps``:

* **Discrete VP** (SDXL, CogVideoX): a table ``alphas_cumprod`` (ᾱ) of ``T = 1000``
  entries, ``alpha = sqrt(ᾱ_t)``, ``sigma = sqrt(1 - ᾱ_t)``. The time ``t`` is the
  timestep index in ``[0, T - 1]``; fractional ``t`` interpolates ᾱ linearly in the
  table (ADM's ``Δt = T / 64`` steps land between entries), and ``t < 0`` means "past
  the end of the chain": ``ᾱ = final_alpha_cumprod`` (1 with diffusers'
  ``set_alpha_to_one``).
* **Rectified flow** (SD3): ``x_t = (1 - s) x0 + s eps``, so ``alpha = 1 - s`` and
  ``sigma = s``. The time ``t`` is the *unshifted* time in ``[0, 1]`` and
  ``s = flow_shift(t, shift)``; with ``shift = 1``, ``t == s``. The network is fed
  ``s * 1000`` (SD3 convention).

Conversions between the ε / x0 / v / flow-velocity parameterisations, timestep samplers
(``(rng, batch_size, ...) -> [B]``), diffusers-exact inference timestep lists and one
PF-ODE step per family live here as small pure functions on ``jnp`` arrays. Every
per-sample scalar (``alpha``, ``sigma``, ``t``: ``[B]`` or a scalar) broadcasts over all
trailing axes of the latents, so images ``[B, H, W, C]`` and videos ``[B, T, H, W, C]``
are handled alike. Maths runs in float32.

:class:`Schedule` bundles one forward process behind ``alpha_sigma(t)`` so that callers
don't branch on the family; :mod:`adm_jax.parameterization` builds the model-output
adapters (ε, v, flow velocity) on top of it.

**One solver for every family.** With ``eps = (x_t - alpha x0) / sigma``, the DDIM step
(eta = 0) ``x_{t'} = alpha' x0 + sigma' eps`` equals

* diffusers' ``EulerDiscreteScheduler`` step (an Euler step of ``dx/dσ = eps`` in the
  variance-exploding variables ``x / alpha``, ``σ = sigma / alpha``), once its sample is
  rescaled by ``alpha`` (see :func:`vp_euler_step`), and
* the rectified-flow Euler step ``x_{s'} = x_s + (s' - s) u`` with ``u = eps - x0``
  (:func:`flow_euler_step`) when ``alpha = 1 - sigma``.

So :func:`ddim_step` is the deterministic PF-ODE step for all three teachers; the
family-specific functions exist for parity with the diffusers schedulers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

VP = "vp"
FLOW = "flow"


# ---------------------------------------------------------------------------------------
# Broadcasting.
# ---------------------------------------------------------------------------------------


def bcast(a, x: Array) -> Array:
  """Reshapes per-sample scalars ``a`` (``[]``, ``[B]`` or ``[B, ...]``) to broadcast
  against ``x`` (``[B, ...]``) by appending singleton axes; float32."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------------------
# Discrete VP schedule.
# ---------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit (CPU).

  torch rounds the endpoints and the step to float32 and evaluates ``start + step * i``
  (first half) / ``end - step * (steps - 1 - i)`` (second half) with a single rounding
  (fused multiply-add); ``step * i`` is exact in float64, so float64 then one cast to
  float32 reproduces it.
  """
  a, b = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([a], np.float32)
  step = np.float64((b - a) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  lo = np.float64(a) + step * i
  hi = np.float64(b) - step * (steps - 1 - i)
  return np.where(np.arange(steps) < steps // 2, lo, hi).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _vp_table(num_train_timesteps: int, beta_start: float, beta_end: float,
              beta_schedule: str, snr_shift_scale: float,
              rescale_zero_snr: bool, betas_float64: bool) -> np.ndarray:
  if beta_schedule == "scaled_linear" and betas_float64:
    # CogVideoXDDIMScheduler: the whole table in float64, rounded to float32 at the end.
    betas = np.square(np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps))
  elif beta_schedule == "scaled_linear":
    betas = np.square(_torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5,
                                          num_train_timesteps))
  elif beta_schedule == "linear":
    betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
  else:
    raise ValueError(f"unknown beta_schedule {beta_schedule!r} "
                     "(expected 'scaled_linear' or 'linear')")
  dt = betas.dtype                                                     # f32 or f64
  alphas = dt.type(1.0) - betas                                        # [T]
  # torch.cumprod accumulates float32 inputs in float64 on CPU.
  ac = np.cumprod(alphas.astype(np.float64)).astype(dt)               # [T]
  if snr_shift_scale != 1.0:
    # CogVideoXDDIMScheduler: SNR divided by snr_shift_scale.
    s = dt.type(snr_shift_scale)
    ac = (ac / (s + (dt.type(1.0) - s) * ac)).astype(dt)
  if rescale_zero_snr:
    # Lin et al. 2023, Algorithm 1, on sqrt(ᾱ): shift the last entry to 0, keep the first.
    sq = np.sqrt(ac)
    sq0, sqt = sq[0].copy(), sq[-1].copy()
    sq = (sq - sqt) * (sq0 / (sq0 - sqt))
    ac = np.square(sq)
  ac = ac.astype(np.float32)
  ac.setflags(write=False)
  return ac


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                      *, snr_shift_scale: float = 1.0,
                      rescale_zero_snr: bool = False,
                      betas_float64: bool = False) -> np.ndarray:
  """The ᾱ table of a discrete VP schedule, as diffusers builds it (float32).

  ``scaled_linear``: ``betas = linspace(sqrt(b0), sqrt(b1), T) ** 2``; ``linear``:
  ``betas = linspace(b0, b1, T)``; then ``ᾱ = cumprod(1 - betas)``. The float32 rounding
  of torch (``linspace`` / ``cumprod``) is reproduced, so the table equals
  ``DDPMScheduler(...).alphas_cumprod`` bit for bit on CPU.

  Args:
    num_train_timesteps: ``T``.
    beta_start: first beta.
    beta_end: last beta.
    beta_schedule: ``"scaled_linear"`` (SD / SDXL / CogVideoX) or ``"linear"``.
    snr_shift_scale: CogVideoX's SNR shift, ``ᾱ / (s + (1 - s) ᾱ)``; 1 is a no-op.
    rescale_zero_snr: rescale to zero terminal SNR (``rescale_betas_zero_snr``; applied
      to ᾱ after the SNR shift, as ``CogVideoXDDIMScheduler``).
    betas_float64: build a ``scaled_linear`` table in float64 (then round to float32),
      as ``CogVideoXDDIMScheduler`` does; ``DDPM/DDIM/EulerDiscreteScheduler`` use float32.

  Returns:
    Read-only ``np.ndarray`` ``[T]`` float32, strictly decreasing.
  """
  return _vp_table(int(num_train_timesteps), float(beta_start), float(beta_end),
                   str(beta_schedule), float(snr_shift_scale), bool(rescale_zero_snr),
                   bool(betas_float64))


def vp_alphas_cumprod_at(t, alphas_cumprod, final_alpha_cumprod: float = 1.0) -> Array:
  """ᾱ at integer or fractional timesteps ``t`` (any shape), float32.

  Integer ``t`` indexes the table. Fractional ``t`` interpolates linearly between the two
  neighbouring entries (exact at integer values). ``t < 0`` gives ``final_alpha_cumprod``
  (the "previous" ᾱ of DDIM's last step); ``t > T - 1`` is clipped to ``T - 1``.
  """
  ac = _f32(alphas_cumprod)                                            # [T]
  n = ac.shape[0]
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    abar = ac[jnp.clip(t, 0, n - 1)]
  else:
    tf = t.astype(jnp.float32)
    tc = jnp.clip(tf, 0.0, n - 1.0)
    i0 = jnp.clip(jnp.floor(tc), 0, n - 2).astype(jnp.int32)
    w = tc - i0.astype(jnp.float32)                                    # in [0, 1]
    abar = ac[i0] * (1.0 - w) + ac[i0 + 1] * w
  return jnp.where(t < 0, jnp.float32(final_alpha_cumprod), abar)


def vp_alpha_sigma(t, alphas_cumprod, final_alpha_cumprod: float = 1.0
                   ) -> tuple[Array, Array]:
  """``(alpha, sigma) = (sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`` for integer or fractional ``t``.

  See :func:`vp_alphas_cumprod_at` for the interpolation and ``t < 0``.
  """
  abar = vp_alphas_cumprod_at(t, alphas_cumprod, final_alpha_cumprod)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def snr(alpha, sigma) -> Array:
  """Signal-to-noise ratio ``alpha² / sigma²``."""
  return jnp.square(_f32(alpha)) / jnp.square(_f32(sigma))


def log_snr(alpha, sigma) -> Array:
  """``log(alpha² / sigma²)`` (``-inf`` at zero terminal SNR, ``+inf`` at sigma = 0)."""
  return 2.0 * (jnp.log(_f32(alpha)) - jnp.log(_f32(sigma)))


def ve_sigma(alpha, sigma) -> Array:
  """Variance-exploding (Karras / ``EulerDiscreteScheduler``) sigma ``sigma / alpha``."""
  return _f32(sigma) / _f32(alpha)


def alpha_sigma_from_ve_sigma(sigma_ve) -> tuple[Array, Array]:
  """Inverse of :func:`ve_sigma` for a VP process: ``alpha = 1 / sqrt(1 + σ²)``."""
  s = _f32(sigma_ve)
  alpha = jax.lax.rsqrt(1.0 + jnp.square(s))
  return alpha, s * alpha


# ---------------------------------------------------------------------------------------
# Rectified flow.
# ---------------------------------------------------------------------------------------


def flow_shift(sigma, shift: float):
  """SD3's timestep shift ``shift * s / (1 + (shift - 1) * s)``.

  As ``FlowMatchEulerDiscreteScheduler`` (``use_dynamic_shifting=False``). Works on
  numpy or jax arrays (and Python floats); maps [0, 1] onto itself monotonically.
  """
  return shift * sigma / (1 + (shift - 1) * sigma)


def flow_unshift(sigma, shift: float):
  """Inverse of :func:`flow_shift`: ``s / (shift - (shift - 1) * s)``."""
  return sigma / (shift - (shift - 1) * sigma)


def flow_alpha_sigma(t, shift: float = 1.0) -> tuple[Array, Array]:
  """``(alpha, sigma) = (1 - s, s)`` with ``s = flow_shift(t, shift)``, float32."""
  s = flow_shift(_f32(t), shift)
  return 1.0 - s, s


# ---------------------------------------------------------------------------------------
# The Schedule dataclass.
# ---------------------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Schedule:
  """One forward process ``x_t = alpha(t) x0 + sigma(t) eps``, hashable and static.

  Only Python scalars are stored (the VP table is rebuilt from them and cached), so a
  ``Schedule`` can be closed over in ``jit``, used as a static argument, or passed as a
  (leafless) pytree.

  Attributes:
    kind: ``"vp"`` (discrete VP, ``t`` is the timestep in ``[0, T - 1]``) or ``"flow"``
      (rectified flow, ``t`` is the unshifted time in ``[0, 1]``).
    num_train_timesteps: ``T`` (1000). For flow only the model-time scale.
    beta_start, beta_end, beta_schedule, snr_shift_scale, rescale_zero_snr: VP table,
      see :func:`vp_alphas_cumprod`.
    set_alpha_to_one: VP, ᾱ at ``t < 0`` is 1 (else ``ᾱ[0]``), as diffusers' DDIM.
    betas_float64: VP table built in float64 (CogVideoX's scheduler).
    shift: flow timestep shift (SD3: 3.0).
  """
  kind: str = VP
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  snr_shift_scale: float = 1.0
  rescale_zero_snr: bool = False
  set_alpha_to_one: bool = True
  betas_float64: bool = False
  shift: float = 1.0

  def __post_init__(self):
    if self.kind not in (VP, FLOW):
      raise ValueError(f"Schedule.kind must be 'vp' or 'flow', got {self.kind!r}")

  # -- constructors ---------------------------------------------------------------------

  @classmethod
  def vp(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
         beta_end: float = 0.012, beta_schedule: str = "scaled_linear", *,
         snr_shift_scale: float = 1.0, rescale_zero_snr: bool = False,
         set_alpha_to_one: bool = True, betas_float64: bool = False) -> "Schedule":
    """Discrete VP schedule (defaults: SD / SDXL).

    CogVideoX (``CogVideoXDDIMScheduler``, v-prediction): ``rescale_zero_snr=True``,
    ``betas_float64=True`` and the checkpoint's ``snr_shift_scale`` (diffusers' default
    3.0; read it from ``scheduler_config.json``, see
    :func:`schedule_from_diffusers_config`).
    """
    return cls(VP, int(num_train_timesteps), float(beta_start), float(beta_end),
               beta_schedule, float(snr_shift_scale), bool(rescale_zero_snr),
               bool(set_alpha_to_one), bool(betas_float64))

  @classmethod
  def flow(cls, shift: float = 1.0, num_train_timesteps: int = 1000) -> "Schedule":
    """Rectified-flow schedule (SD3: ``shift=3.0``)."""
    return cls(FLOW, int(num_train_timesteps), shift=float(shift))

  # -- tables and constants -------------------------------------------------------------

  @property
  def is_vp(self) -> bool:
    return self.kind == VP

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """VP ᾱ table ``[T]`` (read-only numpy, float32)."""
    if not self.is_vp:
      raise AttributeError("a flow schedule has no alphas_cumprod table")
    return vp_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end,
                             self.beta_schedule, snr_shift_scale=self.snr_shift_scale,
                             rescale_zero_snr=self.rescale_zero_snr,
                             betas_float64=self.betas_float64)

  @property
  def final_alpha_cumprod(self) -> float:
    """VP ᾱ used for ``t < 0`` (the end of a DDIM chain)."""
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

  @property
  def time_span(self) -> float:
    """Length ``T`` of the time axis: 1000 for VP, 1 for flow (ADM: Δt = span / 64)."""
    return float(self.num_train_timesteps) if self.is_vp else 1.0

  @property
  def t_max(self) -> float:
    """The noisiest time: ``T - 1`` for VP, 1 for flow (where sigma = 1)."""
    return float(self.num_train_timesteps - 1) if self.is_vp else 1.0

  @property
  def t_clean(self) -> float:
    """A time whose ``(alpha, sigma)`` is ``(1, 0)`` (with ``set_alpha_to_one``):
    ``-1`` for VP (past the table's end), 0 for flow."""
    return -1.0 if self.is_vp else 0.0

  # -- the map t -> (alpha, sigma) ------------------------------------------------------

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    """``(alpha_t, sigma_t)``, float32 arrays of the shape of ``t``."""
    if self.is_vp:
      return vp_alpha_sigma(t, self.alphas_cumprod, self.final_alpha_cumprod)
    return flow_alpha_sigma(t, self.shift)

  def sigma_to_t(self, sigma) -> Array:
    """Flow only: the unshifted time of a noise level ``sigma`` (inverse shift)."""
    if self.is_vp:
      raise NotImplementedError("sigma_to_t is defined for flow schedules only")
    return flow_unshift(_f32(sigma), self.shift)

  def model_time(self, t) -> Array:
    """What the network is fed: ``t`` for VP (float32), ``sigma * T`` for flow (SD3)."""
    if self.is_vp:
      return _f32(t)
    return self.alpha_sigma(t)[1] * float(self.num_train_timesteps)

  def snr(self, t) -> Array:
    return snr(*self.alpha_sigma(t))

  def log_snr(self, t) -> Array:
    return log_snr(*self.alpha_sigma(t))

  def add_noise(self, x0: Array, eps: Array, t) -> Array:
    """``x_t = alpha_t x0 + sigma_t eps`` with ``t`` ``[B]`` (or scalar)."""
    alpha, sigma = self.alpha_sigma(t)
    return add_noise(x0, eps, alpha, sigma)

  # -- inference grids ------------------------------------------------------------------

  def sampling_times(self, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """``num_steps + 1`` times from noisiest to clean, for a deterministic sampler.

    VP: :func:`vp_timesteps` (integer DDIM grid) followed by ``-1`` (ᾱ = final).
    Flow: the unshifted times of :func:`flow_sigmas` (``spacing`` ignored), ending at 0.
    Step ``i`` goes from ``times[i]`` to ``times[i + 1]``.
    """
    if self.is_vp:
      ts = vp_timesteps(num_steps, spacing, self.num_train_timesteps)
      return np.concatenate([ts.astype(np.float32), np.float32([-1.0])])
    return flow_times(num_steps, self.shift, self.num_train_timesteps)

  def few_step_times(self, num_steps: int) -> np.ndarray:
    """Generator conditioning times of a few-step student, noisiest first.

    VP: the official DMD2 list (:func:`dmd2_timesteps`: 999, 749, 499, 249 for 4).
    Flow: ``1, 1 - 1/N, ..., 1/N`` in unshifted time (the schedule's shift applies) — an
    equal-spacing analogue starting at pure noise [our choice; no source fixes it].
    """
    if self.is_vp:
      return dmd2_timesteps(num_steps, self.num_train_timesteps)
    return (np.arange(num_steps, 0, -1) / num_steps).astype(np.float32)


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> Schedule:
  """A :class:`Schedule` from a diffusers ``scheduler_config.json`` dict.

  Flow-matching schedulers (``_class_name`` containing ``FlowMatch``) give a flow
  schedule with ``shift``; dynamic (resolution-dependent) shifting is refused. Everything
  else is read as a discrete VP schedule.
  """
  name = str(config.get("_class_name", ""))
  if "FlowMatch" in name:
    if config.get("use_dynamic_shifting", False):
      raise NotImplementedError("dynamic (resolution-dependent) flow shifting")
    return Schedule.flow(shift=float(config.get("shift", 1.0)),
                         num_train_timesteps=int(config.get("num_train_timesteps", 1000)))
  if config.get("trained_betas") is not None:
    raise NotImplementedError("trained_betas")
  snr_shift = config.get("snr_shift_scale", 3.0 if "CogVideoX" in name else 1.0)
  return Schedule.vp(int(config.get("num_train_timesteps", 1000)),
                     float(config.get("beta_start", 0.0001)),
                     float(config.get("beta_end", 0.02)),
                     str(config.get("beta_schedule", "linear")),
                     snr_shift_scale=float(snr_shift),
                     rescale_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
                     set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
                     betas_float64="CogVideoX" in name)


# ---------------------------------------------------------------------------------------
# Parameterisations: given x_t, alpha, sigma (per-sample, broadcast over trailing axes).
# ---------------------------------------------------------------------------------------


def add_noise(x0: Array, eps: Array, alpha, sigma) -> Array:
  """``x_t = alpha x0 + sigma eps``.  ``x0, eps``: ``[B, ...]``; float32 result."""
  x0 = _f32(x0)
  return bcast(alpha, x0) * x0 + bcast(sigma, x0) * _f32(eps)


def eps_to_x0(eps: Array, x_t: Array, alpha, sigma) -> Array:
  """``x0 = (x_t - sigma eps) / alpha``."""
  x_t = _f32(x_t)
  return (x_t - bcast(sigma, x_t) * _f32(eps)) / bcast(alpha, x_t)


def x0_to_eps(x0: Array, x_t: Array, alpha, sigma) -> Array:
  """``eps = (x_t - alpha x0) / sigma``."""
  x_t = _f32(x_t)
  return (x_t - bcast(alpha, x_t) * _f32(x0)) / bcast(sigma, x_t)


def v_target(x0: Array, eps: Array, alpha, sigma) -> Array:
  """``v = alpha eps - sigma x0`` (Salimans & Ho 2022)."""
  x0 = _f32(x0)
  return bcast(alpha, x0) * _f32(eps) - bcast(sigma, x0) * x0


def v_to_x0(v: Array, x_t: Array, alpha, sigma) -> Array:
  """``x0 = alpha x_t - sigma v`` (VP: assumes ``alpha² + sigma² = 1``, as diffusers)."""
  x_t = _f32(x_t)
  return bcast(alpha, x_t) * x_t - bcast(sigma, x_t) * _f32(v)


def v_to_eps(v: Array, x_t: Array, alpha, sigma) -> Array:
  """``eps = sigma x_t + alpha v`` (VP: assumes ``alpha² + sigma² = 1``)."""
  x_t = _f32(x_t)
  return bcast(sigma, x_t) * x_t + bcast(alpha, x_t) * _f32(v)


def x0_to_v(x0: Array, x_t: Array, alpha, sigma) -> Array:
  """``v`` from an x0 prediction and ``x_t`` (via ``eps = (x_t - alpha x0) / sigma``)."""
  return v_target(x0, x0_to_eps(x0, x_t, alpha, sigma), alpha, sigma)


def flow_target(x0: Array, eps: Array) -> Array:
  """Rectified-flow velocity ``u = eps - x0`` (``d x_s / d s`` for
  ``x_s = (1 - s) x0 + s eps``)."""
  return _f32(eps) - _f32(x0)


def flow_to_x0(u: Array, x_t: Array, sigma) -> Array:
  """``x0 = x_s - s u``."""
  x_t = _f32(x_t)
  return x_t - bcast(sigma, x_t) * _f32(u)


def flow_to_eps(u: Array, x_t: Array, sigma) -> Array:
  """``eps = x_s + (1 - s) u``."""
  x_t = _f32(x_t)
  return x_t + (1.0 - bcast(sigma, x_t)) * _f32(u)


def x0_to_flow(x0: Array, x_t: Array, sigma) -> Array:
  """``u = (x_s - x0) / s``."""
  x_t = _f32(x_t)
  return (x_t - _f32(x0)) / bcast(sigma, x_t)


# ---------------------------------------------------------------------------------------
# Timestep samplers: (rng, batch_size, ...) -> [B].
# ---------------------------------------------------------------------------------------


def sample_uniform_int(rng: Array, batch_size: int, minval: int = 0,
                       maxval: int = 999) -> Array:
  """Integers uniform in ``[minval, maxval]`` *inclusive*, int32 ``[B]``.

  DMD2: DM loss ``[20, 980]``; fake-score denoising loss ``[0, 999]``.
  """
  return jax.random.randint(rng, (batch_size,), minval, maxval + 1, dtype=jnp.int32)


def sample_uniform(rng: Array, batch_size: int, minval: float = 0.0,
                   maxval: float = 1.0) -> Array:
  """Continuous uniform in ``[minval, maxval)``, float32 ``[B]``."""
  return jax.random.uniform(rng, (batch_size,), jnp.float32, minval, maxval)


def sample_cubic(rng: Array, batch_size: int, t_max: float = 1000.0) -> Array:
  """ADP's generator schedule ``t = (1 - u³) t_max`` with ``u ~ U[0, 1)``, float32 ``[B]``.

  Biased toward high noise: ``P(t <= x) = 1 - (1 - x / t_max)^(1/3)`` on ``[0, t_max]``.
  """
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  return (1.0 - u ** 3) * t_max


def sample_logit_normal(rng: Array, batch_size: int, mean: float = 0.0,
                        std: float = 1.0) -> Array:
  """``sigmoid(mean + std * n)``, ``n ~ N(0, 1)``: SD3's logit-normal sigma in (0, 1)."""
  n = jax.random.normal(rng, (batch_size,), jnp.float32)
  return jax.nn.sigmoid(mean + std * n)


def sample_shifted(rng: Array, batch_size: int, shift: float) -> Array:
  """``flow_shift(u, shift)``, ``u ~ U[0, 1)``: shifted-uniform sigma, float32 ``[B]``.

  (For a flow :class:`Schedule` with that shift, sampling the unshifted time uniformly
  gives the same sigma distribution.)
  """
  return flow_shift(sample_uniform(rng, batch_size), shift)


# ---------------------------------------------------------------------------------------
# Inference timestep grids (host-side numpy, diffusers-exact).
# ---------------------------------------------------------------------------------------


def vp_timesteps(num_steps: int, spacing: str = "trailing",
                 num_train_timesteps: int = 1000, *, steps_offset: int = 0,
                 integer: bool = True) -> np.ndarray:
  """Timesteps of diffusers' ``DDIMScheduler`` / ``EulerDiscreteScheduler.set_timesteps``.

  Args:
    num_steps: number of inference steps ``N``.
    spacing: ``"trailing"`` (starts at ``T - 1``), ``"leading"`` (``k * (T // N) +
      steps_offset``) or ``"linspace"``.
    num_train_timesteps: ``T``.
    steps_offset: added under ``"leading"`` (SDXL's config has 1).
    integer: ``True`` as ``DDIMScheduler`` (``linspace`` rounded, int64); ``False`` as
      ``EulerDiscreteScheduler`` (``linspace`` left fractional, float32). The two only
      differ for ``"linspace"``.

  Returns:
    ``[N]`` timesteps, noisiest first. Note that diffusers' DDIM steps from ``t`` to
    ``t - T // N`` (not necessarily the next entry); Euler steps to the next entry.
  """
  T = num_train_timesteps
  if num_steps > T:
    raise ValueError(f"num_steps={num_steps} > num_train_timesteps={T}")
  if spacing == "linspace":
    if integer:
      return np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].copy().astype(np.int64)
    ts = ts + steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}")
  return ts if integer else ts.astype(np.float32)


def flow_times(num_steps: int, shift: float = 1.0,
               num_train_timesteps: int = 1000) -> np.ndarray:
  """Unshifted times ``[N + 1]`` whose shifted values are :func:`flow_sigmas`.

  diffusers spaces the grid linearly between the *shifted* training extremes
  (``1`` and ``flow_shift(1 / T)``) and then shifts again; these are the values before
  that second shift, followed by 0.
  """
  # The scheduler's smallest training sigma, computed in float32 as torch does.
  f32 = np.float32
  s1 = f32(1.0) / f32(num_train_timesteps)
  sigma_min = float(f32(shift) * s1 / (f32(1.0) + f32(shift - 1) * s1))
  ts = np.linspace(1.0 * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
  return np.concatenate([ts / num_train_timesteps, [0.0]])


def flow_sigmas(num_steps: int, shift: float = 1.0,
                num_train_timesteps: int = 1000) -> np.ndarray:
  """``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas``:
  ``[N + 1]`` float32 ending in 0. The model timesteps are ``sigmas[:-1] * T``."""
  t = flow_times(num_steps, shift, num_train_timesteps)
  s = flow_shift(t[:-1], shift)
  return np.concatenate([s.astype(np.float32), np.float32([0.0])])


def dmd2_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
  """The official DMD2 few-step list ``range(T - 1, 0, -(T // N))`` (int64).

  ``N = 4``: ``[999, 749, 499, 249]``. Reproduced verbatim: when ``N`` does not divide
  ``T`` the list can be one longer than ``N`` (``N = 6`` gives 7 entries), as upstream.
  """
  T = num_train_timesteps
  return np.array(list(range(T - 1, 0, -(T // num_steps))), np.int64)


# ---------------------------------------------------------------------------------------
# One PF-ODE step.
# ---------------------------------------------------------------------------------------


def ddim_step(x_t: Array, x0_pred: Array, alpha, sigma, alpha_next,
              sigma_next) -> Array:
  """Deterministic DDIM (eta = 0) step ``x_t -> x_{t'}`` from an x0 prediction.

  ``x_{t'} = alpha' x0 + sigma' eps`` with ``eps = (x_t - alpha x0) / sigma``, written
  as ``(sigma' / sigma) x_t + (alpha' - alpha sigma' / sigma) x0`` (CogVideoX's form,
  finite at ``alpha = 0``). Equals the VP Euler and flow Euler steps (module docstring).
  Requires ``sigma > 0``.

  Args:
    x_t: ``[B, ...]`` current latents.
    x0_pred: ``[B, ...]`` x0 prediction at ``(x_t, t)``.
    alpha, sigma: ``[B]`` (or scalars) at ``t``.
    alpha_next, sigma_next: at ``t'``.

  Returns:
    ``[B, ...]`` float32.
  """
  x_t, x0 = _f32(x_t), _f32(x0_pred)
  r = bcast(sigma_next, x_t) / bcast(sigma, x_t)                       # [B, 1, ...]
  return r * x_t + (bcast(alpha_next, x_t) - bcast(alpha, x_t) * r) * x0


def vp_euler_step(x_t: Array, x0_pred: Array, alpha, sigma, alpha_next,
                  sigma_next) -> Array:
  """diffusers ``EulerDiscreteScheduler.step`` (no churn) in VP scaling.

  diffusers keeps the sample in variance-exploding form ``x_ve = x_t / alpha`` with
  ``σ = sigma / alpha`` (its ``scale_model_input`` divides by ``sqrt(1 + σ²)`` =
  ``1 / alpha``) and steps ``x_ve' = x_ve + (σ' - σ) (x_ve - x0) / σ``. This function
  takes and returns *VP-scaled* latents: ``vp_euler_step(x_t, ...) == alpha' *
  diffusers_step(x_t / alpha)``. Algebraically identical to :func:`ddim_step`.
  """
  x_t, x0 = _f32(x_t), _f32(x0_pred)
  s, s_next = ve_sigma(alpha, sigma), ve_sigma(alpha_next, sigma_next)  # [B]
  x_ve = x_t / bcast(alpha, x_t)
  d = (x_ve - x0) / bcast(s, x_t)                                       # = eps
  return (x_ve + bcast(s_next - s, x_t) * d) * bcast(alpha_next, x_t)


def flow_euler_step(x_t: Array, u: Array, sigma, sigma_next) -> Array:
  """Rectified-flow Euler step ``x_{s'} = x_s + (s' - s) u`` (``FlowMatchEulerDiscrete``)."""
  x_t = _f32(x_t)
  return x_t + bcast(_f32(sigma_next) - _f32(sigma), x_t) * _f32(u)


__all__ = [
    "Schedule", "schedule_from_diffusers_config", "bcast",
    "vp_alphas_cumprod", "vp_alphas_cumprod_at", "vp_alpha_sigma", "snr", "log_snr",
    "ve_sigma", "alpha_sigma_from_ve_sigma",
    "flow_shift", "flow_unshift", "flow_alpha_sigma",
    "add_noise", "eps_to_x0", "x0_to_eps", "v_target", "v_to_x0", "v_to_eps", "x0_to_v",
    "flow_target", "flow_to_x0", "flow_to_eps", "x0_to_flow",
    "sample_uniform_int", "sample_uniform", "sample_cubic", "sample_logit_normal",
    "sample_shifted",
    "vp_timesteps", "flow_times", "flow_sigmas", "dmd2_timesteps",
    "ddim_step", "vp_euler_step", "flow_euler_step",
]

