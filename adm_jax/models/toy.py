"""The ``toy`` family: a 2-D Gaussian mixture whose teacher is the *exact* denoiser.

For fast tests of the distillation losses and of the trainer we need a teacher whose
score is known in closed form. :class:`ToyMixture` is a mixture of ``K`` isotropic
Gaussians ``p(x0) = sum_k w_k N(x0; mu_k, s^2 I)`` in ``D`` dimensions (default: 8 modes
on a ring of radius 2, ``s = 0.1``). Under the forward process ``x_t = alpha x0 + sigma
eps`` the noised marginal is again a mixture, ``sum_k w_k N(x_t; alpha mu_k, (alpha^2 s^2
+ sigma^2) I)``, and the posterior of ``x0`` is, per component, Gaussian:

  ``m_k = (sigma^2 mu_k + alpha s^2 x_t) / (sigma^2 + alpha^2 s^2)``,
  ``v   = s^2 sigma^2 / (sigma^2 + alpha^2 s^2)``  (per coordinate),

so ``E[x0 | x_t] = sum_k r_k(x_t) m_k`` with responsibilities ``r_k`` (softmax over the
components of the noised mixture), and likewise ``E[eps | x_t] = sum_k r_k sigma (x_t -
alpha mu_k) / (sigma^2 + alpha^2 s^2)`` (finite at ``sigma = 0``).

Conditioning is a class label ``cond = {"label": int [B]}``: a label in ``[0, K)``
selects that mode (the class-conditional density is ``N(mu_k, s^2 I)``); any other label
(``K``, ``-1``) is the *null* label, i.e. the unconditional mixture, so classifier-free
guidance can be exercised (:func:`uncond_like` gives the null label). ``cond = None``
or ``{}`` is unconditional too.

Pieces:

* :meth:`ToyMixture.teacher_apply`: the exact teacher as a pure
  ``apply(params, x_t, model_time, cond, *, return_features=False) -> raw output``
  in the parameterisation's own convention (ε / v / flow velocity); ``params`` is
  ignored.
* :class:`ToyDenoiser` (+ :class:`ToyConfig`): a small NNX MLP with the UNet's call
  convention, used as generator / fake score; :func:`init_denoiser` builds one without
  compiling, :func:`denoiser_apply` gives its trainer-style ``apply`` and
  :func:`fit_to_teacher` regresses it onto the exact teacher (a few seconds on CPU, most
  of it compilation, once per architecture).
* Component-kind functions (:func:`abstract_model`, :func:`key_table`, :func:`load`,
  :func:`export`) so ``"toy_mlp"`` can live in :data:`adm_jax.models.KINDS`; the
  on-disk layout is ``config.json`` + ``model.safetensors`` keyed by our own dotted
  parameter paths.
* Sample-quality metrics: :func:`mode_coverage`, :func:`in_mode_fraction`,
  :func:`mmd`, :func:`sliced_wasserstein`.

Everything runs in float32; per-sample ``alpha`` / ``sigma`` / ``label`` are ``[B]`` (or
scalars) and broadcast over the data axis.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adm_jax import tree
from adm_jax.models import layers as L

Array = jax.Array

# Log-weight of an excluded component: finite (no inf - inf NaNs), exp() underflows to 0.
_NEG = -1e30
# Methods of the (hashable, static) mixture compile as one program each.
_jit_method = functools.partial(jax.jit, static_argnums=0)
NULL_LABEL = -1
WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------
# The mixture and its exact posterior.
# ---------------------------------------------------------------------------------------


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def ring_means(num_modes: int = 8, radius: float = 2.0) -> tuple[tuple[float, float], ...]:
  """``num_modes`` points evenly spaced on a circle, the first at ``(radius, 0)``."""
  return tuple((radius * math.cos(2 * math.pi * k / num_modes),
                radius * math.sin(2 * math.pi * k / num_modes)) for k in range(num_modes))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ToyMixture:
  """Mixture of ``K`` isotropic Gaussians in ``D`` dims; hashable and static.

  Only Python scalars / tuples are stored, so a mixture can be closed over in ``jit`` or
  passed as a static argument (like :class:`~adm_jax.schedules.Schedule`).

  Attributes:
    means: ``K`` mean vectors of length ``D`` (default: :func:`ring_means` ``(8, 2.0)``).
    weights: ``K`` mixture weights (normalised on construction; default uniform).
    std: per-coordinate standard deviation ``s`` of every component (> 0).
  """
  means: tuple[tuple[float, ...], ...] = ()
  weights: tuple[float, ...] = ()
  std: float = 0.1

  def __post_init__(self):
    means = self.means or ring_means()
    means = tuple(tuple(float(c) for c in m) for m in means)
    if len({len(m) for m in means}) != 1:
      raise ValueError("ToyMixture: every mean must have the same dimension")
    weights = self.weights or (1.0,) * len(means)
    if len(weights) != len(means):
      raise ValueError(f"ToyMixture: {len(weights)} weights for {len(means)} means")
    if min(weights) <= 0:
      raise ValueError("ToyMixture: weights must be positive")
    total = float(sum(weights))
    if self.std <= 0:
      raise ValueError("ToyMixture: std must be positive")
    object.__setattr__(self, "means", means)
    object.__setattr__(self, "weights", tuple(float(w) / total for w in weights))
    object.__setattr__(self, "std", float(self.std))

  # -- constructors / serialisation -----------------------------------------------------

  @classmethod
  def ring(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.1,
           weights: tuple[float, ...] = ()) -> "ToyMixture":
    """``num_modes`` modes on a circle of ``radius`` with component std ``std``."""
    return cls(ring_means(num_modes, radius), tuple(weights), std)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ToyMixture":
    """From ``{"means", "weights", "std"}`` or ``{"num_modes", "radius", "std"}``."""
    d = dict(d)
    if "means" in d:
      return cls(tuple(tuple(m) for m in d["means"]), tuple(d.get("weights", ())),
                 float(d.get("std", 0.1)))
    return cls.ring(int(d.get("num_modes", 8)), float(d.get("radius", 2.0)),
                    float(d.get("std", 0.1)), tuple(d.get("weights", ())))

  def to_dict(self) -> dict[str, Any]:
    return {"means": [list(m) for m in self.means], "weights": list(self.weights),
            "std": self.std}

  # -- constants ------------------------------------------------------------------------

  @property
  def num_modes(self) -> int:
    """``K``; labels in ``[0, K)`` select a mode, anything else is null."""
    return len(self.means)

  @property
  def dim(self) -> int:
    """Data dimension ``D`` (2 by default)."""
    return len(self.means[0])

  @property
  def null_label(self) -> int:
    """The canonical null label ``K`` (``-1`` works too)."""
    return self.num_modes

  def means_array(self) -> Array:
    return _f32(self.means)                                            # [K, D]

  def log_weights(self, label=None, batch: int | None = None) -> Array:
    """Per-sample log mixture weights ``[B, K]`` (``[K]`` when ``label`` is None and
    ``batch`` is None): a label in ``[0, K)`` keeps only its mode."""
    lw = jnp.log(_f32(self.weights))                                   # [K]
    if label is None:
      return lw if batch is None else jnp.broadcast_to(lw, (batch, self.num_modes))
    label = jnp.asarray(label, jnp.int32)
    b = batch if batch is not None else (label.shape[0] if label.ndim else 1)
    label = jnp.broadcast_to(label, (b,))                              # [B]
    is_cond = (label >= 0) & (label < self.num_modes)
    onehot = jnp.arange(self.num_modes)[None, :] == label[:, None]     # [B, K]
    return jnp.where(is_cond[:, None], jnp.where(onehot, 0.0, _NEG), lw[None, :])

  # -- data -----------------------------------------------------------------------------

  @functools.partial(jax.jit, static_argnums=(0, 2))
  def sample(self, rng: Array, n: int, label=None) -> Array:
    """Exact data samples ``[n, D]``; ``label`` (``[n]`` or scalar) picks the mode,
    null / ``None`` samples the mixture."""
    k_mode, k_noise = jax.random.split(rng)
    u = jax.random.uniform(k_mode, (n,), jnp.float32)
    z = jax.random.normal(k_noise, (n, self.dim), jnp.float32)
    return self.sample_from(u, z, label)

  def sample_from(self, u: Array, z: Array, label=None) -> Array:
    """Data samples ``[n, D]`` from given randomness: ``u`` ``[n]`` uniform in [0, 1)
    picks the mode by inverse CDF (or ``label`` does), ``z`` ``[n, D]`` standard normal.
    """
    n = z.shape[0]
    if label is None:
      # (A [K] table, not a [n, K] constant: XLA would constant-fold the latter slowly.)
      cdf = jnp.cumsum(_f32(self.weights))[None, :]                    # [1, K]
    else:
      cdf = jnp.cumsum(jax.nn.softmax(self.log_weights(label, n), axis=-1), axis=-1)
    k = jnp.sum(u[:, None] >= cdf[:, :-1], axis=-1)                    # [n] in [0, K)
    return self.means_array()[k] + self.std * _f32(z)

  @_jit_method
  def log_prob(self, x: Array, label=None) -> Array:
    """``log p(x0)`` ``[B]`` of data points ``x`` ``[B, D]``."""
    return self.log_prob_t(x, 1.0, 0.0, label)

  # -- the noised marginal and the posterior --------------------------------------------

  def _terms(self, x_t: Array, alpha, sigma, label):
    """Shared pieces: ``(x [B, 1, D], alpha, sigma [B, 1, 1], var_t [B, 1, 1],
    logits [B, K])`` where ``logits`` are the unnormalised log responsibilities."""
    x = _f32(x_t)                                                      # [B, D]
    b = x.shape[0]
    a = jnp.broadcast_to(_f32(alpha), (b,))[:, None, None]             # [B, 1, 1]
    s = jnp.broadcast_to(_f32(sigma), (b,))[:, None, None]
    var_t = jnp.square(a * self.std) + jnp.square(s)                   # [B, 1, 1]
    mu = self.means_array()[None]                                      # [1, K, D]
    d2 = jnp.sum(jnp.square(x[:, None, :] - a * mu), -1)               # [B, K]
    logits = (self.log_weights(label, b) - 0.5 * d2 / var_t[:, :, 0]
              - 0.5 * self.dim * jnp.log(2 * jnp.pi * var_t[:, :, 0]))  # [B, K]
    return x[:, None, :], a, s, var_t, logits

  @_jit_method
  def log_prob_t(self, x_t: Array, alpha, sigma, label=None) -> Array:
    """``log p_t(x_t)`` ``[B]``: the mixture ``sum_k w_k N(alpha mu_k, (alpha^2 s^2 +
    sigma^2) I)``."""
    return jax.nn.logsumexp(self._terms(x_t, alpha, sigma, label)[-1], axis=-1)

  @_jit_method
  def responsibilities(self, x_t: Array, alpha, sigma, label=None) -> Array:
    """``P(k | x_t)`` ``[B, K]``."""
    return jax.nn.softmax(self._terms(x_t, alpha, sigma, label)[-1], axis=-1)

  @_jit_method
  def x0_posterior(self, x_t: Array, alpha, sigma, label=None) -> tuple[Array, Array]:
    """``(E[x0 | x_t], Var[x0 | x_t])``, both ``[B, D]`` (the variance per coordinate:
    the diagonal of the posterior covariance)."""
    x, a, s, var_t, logits = self._terms(x_t, alpha, sigma, label)
    r = jax.nn.softmax(logits, axis=-1)[..., None]                     # [B, K, 1]
    s2, sig2 = self.std ** 2, jnp.square(s)
    m_k = (sig2 * self.means_array()[None] + a * s2 * x) / var_t       # [B, K, D]
    v = s2 * sig2 / var_t                                              # [B, 1, 1]
    mean = jnp.sum(r * m_k, axis=1)                                    # [B, D]
    var = v[:, 0] + jnp.sum(r * jnp.square(m_k), axis=1) - jnp.square(mean)
    return mean, jnp.maximum(var, 0.0)

  @_jit_method
  def x0_mean(self, x_t: Array, alpha, sigma, label=None) -> Array:
    """Exact posterior mean ``E[x0 | x_t]`` ``[B, D]`` for ``x_t = alpha x0 + sigma
    eps`` (responsibilities times per-component posterior means)."""
    return self.x0_posterior(x_t, alpha, sigma, label)[0]

  @_jit_method
  def eps_mean(self, x_t: Array, alpha, sigma, label=None) -> Array:
    """Exact ``E[eps | x_t]`` ``[B, D]``, written without dividing by ``sigma`` (so
    finite, and 0, at ``sigma = 0``). Equals ``(x_t - alpha E[x0|x_t]) / sigma``."""
    x, a, s, var_t, logits = self._terms(x_t, alpha, sigma, label)
    r = jax.nn.softmax(logits, axis=-1)[..., None]                     # [B, K, 1]
    e_k = s * (x - a * self.means_array()[None]) / var_t               # [B, K, D]
    return jnp.sum(r * e_k, axis=1)

  @_jit_method
  def score(self, x_t: Array, alpha, sigma, label=None) -> Array:
    """``grad_x log p_t(x_t)`` ``[B, D]`` in closed form (Tweedie: ``(alpha E[x0|x_t] -
    x_t) / sigma^2``)."""
    x, a, s, var_t, logits = self._terms(x_t, alpha, sigma, label)
    r = jax.nn.softmax(logits, axis=-1)[..., None]                     # [B, K, 1]
    return jnp.sum(r * (a * self.means_array()[None] - x) / var_t, axis=1)

  # -- the exact teacher ----------------------------------------------------------------

  def teacher_apply(self, param, *, feature_dim: int = 64, feature_seed: int = 0
                    ) -> Callable[..., Any]:
    """The exact teacher as ``apply(params, x_t, model_time, cond, *,
    return_features=False)``.

    The raw output is the parameterisation's regression target evaluated at the exact
    posterior means, ``param.target(E[x0|x_t], E[eps|x_t], t)`` (ε for ``epsilon``,
    ``alpha eps - sigma x0`` for ``v_prediction``, ``eps - x0`` for ``flow``). Because
    ``x_t = alpha E[x0|x_t] + sigma E[eps|x_t]`` exactly, this equals
    ``param.from_x0(E[x0|x_t], x_t, t)`` wherever ``sigma > 0``, and it stays finite at
    ``sigma = 0``; ``param.to_x0`` of it gives back ``E[x0|x_t]``.

    ``model_time`` is what a network is fed (:meth:`Parameterization.model_time`) and is
    mapped back with :func:`alpha_sigma_from_model_time`.

    With ``return_features=True`` it returns ``(out, {"mid": [B, 1, 1, F + K + D]})``.
    The exact teacher has no hidden layers, so its "features" stand in for what a
    trained denoiser's layers encode: fixed random Fourier features ``[sin(z W), cos(z
    W)]`` of ``z = (x_t, model_time / T)`` (``W ~ N(0, 1)`` ``[D + 1, F / 2]`` from
    ``feature_seed``), the posterior mode responsibilities ``P(k | x_t)`` ``[K]`` (which
    mode the sample is heading to) and ``tanh(E[x0 | x_t] / 2)`` ``[D]``; all in
    ``[-1, 1]``. ADM's / ADP's discriminators (heads on the teacher's features) read
    them through heads written for the UNet's 4-D channels-last features, unchanged.

    Args:
      param: the :class:`~adm_jax.parameterization.Parameterization` (schedule + output
        convention).
      feature_dim: ``F`` (even).
      feature_seed: seed of the fixed feature projection.

    Returns:
      ``apply``; ``params`` is ignored (pass ``None`` or ``{}``), ``x_t`` ``[B, D]``,
      ``model_time`` ``[B]`` (or scalar), ``cond`` ``{"label": [B]}`` / ``None``. Output
      ``[B, D]`` float32.
    """
    return _teacher_apply(self, param, int(feature_dim), int(feature_seed))


@functools.lru_cache(maxsize=64)
def _teacher_apply(mixture: ToyMixture, param, feature_dim: int, feature_seed: int):
  """:meth:`ToyMixture.teacher_apply`, cached so that equal arguments give the same
  jitted function (and so one compilation)."""
  if feature_dim % 2:
    raise ValueError("teacher_apply: feature_dim must be even")
  w_feat = np.random.default_rng(feature_seed).normal(
      size=(mixture.dim + 1, feature_dim // 2)).astype(np.float32)     # [D + 1, F / 2]
  span = float(param.schedule.num_train_timesteps)

  def apply(params, x_t, model_time, cond, *, return_features: bool = False):
    del params
    x_t = _f32(x_t)                                                    # [B, D]
    b = x_t.shape[0]
    mt = jnp.broadcast_to(_f32(model_time), (b,))                      # [B]
    alpha, sigma, t = alpha_sigma_from_model_time(param, mt)
    label = label_of(cond)
    x0 = mixture.x0_mean(x_t, alpha, sigma, label)                     # [B, D]
    eps = mixture.eps_mean(x_t, alpha, sigma, label)                   # [B, D]
    out = _f32(param.target(x0, eps, t))                               # [B, D]
    if not return_features:
      return out
    z = jnp.concatenate([x_t, (mt / span)[:, None]], axis=-1)          # [B, D + 1]
    proj = z @ jnp.asarray(w_feat)                                     # [B, F / 2]
    resp = mixture.responsibilities(x_t, alpha, sigma, label)          # [B, K]
    feat = jnp.concatenate([jnp.sin(proj), jnp.cos(proj), resp, jnp.tanh(x0 / 2)],
                           axis=-1)                                    # [B, F + K + D]
    return out, {"mid": feat[:, None, None, :]}                        # [B, 1, 1, F+K+D]

  return jax.jit(apply, static_argnames="return_features")


def alpha_sigma_from_model_time(param, model_time) -> tuple[Array, Array, Array]:
  """Inverts :meth:`Parameterization.model_time`: ``(alpha, sigma, t)``, float32.

  VP: the network is fed ``t`` itself, so ``t = model_time`` and ``(alpha, sigma) =
  param.alpha_sigma(t)``. Flow: it is fed ``sigma * T``, so ``sigma = model_time / T``,
  ``alpha = 1 - sigma`` and ``t = schedule.sigma_to_t(sigma)`` (the unshifted time).
  """
  sched = param.schedule
  mt = _f32(model_time)
  if sched.is_vp:
    alpha, sigma = param.alpha_sigma(mt)
    return alpha, sigma, mt
  sigma = mt / float(sched.num_train_timesteps)
  return 1.0 - sigma, sigma, sched.sigma_to_t(sigma)


def label_of(cond) -> Array | None:
  """``cond["label"]`` as int32, or ``None`` (unconditional) when absent."""
  if cond is None or not isinstance(cond, Mapping) or "label" not in cond:
    return None
  return jnp.asarray(cond["label"], jnp.int32)


def uncond_like(cond: Mapping[str, Array] | None) -> dict[str, Array]:
  """The unconditional branch of a toy conditioning: every label set to the null label
  (``-1``). (:func:`adm_jax.conditioning.uncond_like` zeroes text keys only and would
  leave ``label`` as it is.)"""
  label = label_of(cond)
  if label is None:
    return {}
  return {**dict(cond), "label": jnp.full_like(label, NULL_LABEL)}


# ---------------------------------------------------------------------------------------
# The MLP denoiser (generator / fake score).
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Architecture of a :class:`ToyDenoiser`.

  Attributes:
    data_dim: ``D``, the input and output width (2).
    num_classes: ``K``; the label embedding has ``K + 1`` rows, row ``K`` is the null
      label (used for any label outside ``[0, K)``).
    hidden: MLP width ``H``.
    depth: number of residual blocks.
    time_embed_dim: width of the sinusoidal embedding of the model time.
  """
  data_dim: int = 2
  num_classes: int = 8
  hidden: int = 128
  depth: int = 3
  time_embed_dim: int = 64

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ToyConfig":
    """From :meth:`to_dict` output (``_class_name`` ignored; unknown keys refused)."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"ToyConfig: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
    return cls(**{k: int(v) for k, v in d.items()})

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": "ToyDenoiser", **dataclasses.asdict(self)}


class ToyBlock(nnx.Module):
  """Pre-norm residual MLP block with an additive conditioning embedding."""

  def __init__(self, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = L.LayerNorm(hidden, **kw)
    self.fc1 = L.Linear(hidden, hidden, rngs=rngs, **kw)
    self.emb_proj = L.Linear(hidden, hidden, rngs=rngs, **kw)
    self.fc2 = L.Linear(hidden, hidden, rngs=rngs, **kw)

  def __call__(self, h: Array, emb: Array) -> Array:     # h [B, H], emb [B, H]
    y = self.fc1(self.norm(h)) + self.emb_proj(jax.nn.silu(emb))
    return h + self.fc2(jax.nn.silu(y))


class ToyDenoiser(nnx.Module):
  """Small MLP denoiser with the UNet's call convention: ``(x [B, D], t [B],
  {"label": [B]}) -> [B, D]``.

  ``t`` is the model time (what :meth:`Parameterization.model_time` returns), embedded
  with :func:`~adm_jax.models.layers.timestep_embedding` and a two-layer MLP; the label
  gets a learned embedding (``K + 1`` rows, the last for null). The output is raw, in
  whatever parameterisation the model is trained for.
  """

  def __init__(self, config: ToyConfig = ToyConfig(), *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    h = config.hidden
    self.proj_in = L.Linear(config.data_dim, h, rngs=rngs, **kw)
    self.time_embedding = L.TimestepEmbedding(config.time_embed_dim, h, rngs=rngs, **kw)
    self.label_embedding = nnx.Embed(config.num_classes + 1, h, rngs=rngs, **kw)
    self.blocks = nnx.List([ToyBlock(h, rngs=rngs, **kw) for _ in range(config.depth)])
    self.norm_out = L.LayerNorm(h, **kw)
    self.proj_out = L.Linear(h, config.data_dim, rngs=rngs, **kw)

  def __call__(self, x: Array, t: Array, cond: Mapping[str, Array] | None = None, *,
               return_features: bool = False):
    """``x`` [B, D], ``t`` [B] (or scalar), ``cond["label"]`` [B] (optional).

    Returns the output ``[B, D]`` (float32), and with ``return_features`` also
    ``{"mid": [B, 1, 1, H]}``: the last hidden state, shaped as a 1x1 channels-last
    feature map so that 2-D discriminator heads apply unchanged.
    """
    cfg = self.config
    b = x.shape[0]
    t = jnp.broadcast_to(_f32(t), (b,))                                # [B]
    label = label_of(cond)
    if label is None:
      label = jnp.full((b,), cfg.num_classes, jnp.int32)
    label = jnp.broadcast_to(label, (b,))
    label = jnp.where((label >= 0) & (label < cfg.num_classes), label, cfg.num_classes)
    temb = L.timestep_embedding(t, cfg.time_embed_dim)                 # [B, E]
    emb = self.time_embedding(temb.astype(self.dtype)) + self.label_embedding(label)
    h = self.proj_in(x.astype(self.dtype)) + emb                       # [B, H]
    for block in self.blocks:
      h = block(h, emb)
    out = self.proj_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)  # [B, D]
    if not return_features:
      return out
    return out, {"mid": h[:, None, None, :]}                           # [B, 1, 1, H]


@functools.lru_cache(maxsize=64)
def denoiser_apply(graphdef) -> Callable[..., Any]:
  """``apply(params, x_t, model_time, cond, *, return_features=False)`` for a split
  :class:`ToyDenoiser` (``graphdef, params = nnx.split(model)``); jitted, and cached
  per ``graphdef`` so that equal architectures share one compilation."""
  def apply(params, x_t, model_time, cond, *, return_features: bool = False):
    return nnx.merge(graphdef, params)(x_t, model_time, cond,
                                       return_features=return_features)
  return jax.jit(apply, static_argnames="return_features")


def init_denoiser(config: ToyConfig = ToyConfig(), seed: int = 0, *, dtype=jnp.float32,
                  param_dtype=jnp.float32) -> ToyDenoiser:
  """A freshly initialised :class:`ToyDenoiser`, drawn with numpy (no compilation).

  Eager NNX construction (``ToyDenoiser(config, rngs=nnx.Rngs(seed))``) compiles every
  initialiser separately and takes seconds on CPU; this builds the abstract model and
  fills it from ``np.random.default_rng(seed)`` with flax's default distributions, minus
  the truncation: kernels ``N(0, 1 / fan_in)``, label embedding ``N(0, 1 / H)``, biases
  0, norm scales 1. Deterministic in ``seed``; not bit-equal to the eager constructor.
  """
  graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in tree.flatten(abstract).items():
    shape, name = tuple(leaf.shape), path.rsplit(".", 1)[-1]
    if name == "kernel":
      v = rng.standard_normal(shape) / math.sqrt(shape[0])
    elif name == "embedding":
      v = rng.standard_normal(shape) / math.sqrt(shape[-1])
    elif name == "scale":
      v = np.ones(shape)
    elif name == "bias":
      v = np.zeros(shape)
    else:
      raise ValueError(f"init_denoiser: no initialiser for parameter {path!r}")
    flat[path] = jnp.asarray(v, param_dtype)
  return nnx.merge(graphdef, tree.unflatten_like(abstract, flat))


def fit_to_teacher(model: ToyDenoiser, mixture: ToyMixture, param, steps: int = 500,
                   rng: Array | None = None, *, batch_size: int = 512,
                   learning_rate: float = 3e-3, p_uncond: float = 0.2) -> nnx.State:
  """Regresses ``model`` onto the exact teacher; returns the fitted parameters.

  A denoising regression with the exact (Rao-Blackwellised) target: ``x0`` from the
  mixture (with a random mode label, or the null label with probability ``p_uncond``),
  ``t`` uniform over the schedule (VP: continuous in ``[0, T - 1]``; flow: ``[0, 1]``),
  ``x_t = alpha x0 + sigma eps``, loss ``|model(x_t) - teacher(x_t)|^2`` in the
  parameterisation's raw output. Same minimiser as the usual denoising loss, far less
  variance. Adam with a cosine learning-rate decay (to 5 %); one jitted step, compiled
  once per architecture / mixture / parameterisation / batch size.

  ``model`` is not modified: use ``nnx.update(model, params)`` or
  ``nnx.merge(graphdef, params)``.

  Args:
    model: the denoiser (its current parameters are the starting point).
    mixture: the data distribution.
    param: the parameterisation the model outputs.
    steps: optimiser steps.
    rng: PRNG key (default ``jax.random.key(0)``).
    batch_size: samples per step.
    learning_rate: peak Adam learning rate.
    p_uncond: probability of the null label.

  Returns:
    The fitted ``nnx.State`` (same structure as ``nnx.split(model)[1]``).
  """
  rng = jax.random.key(0) if rng is None else rng
  graphdef, params = nnx.split(model)
  # The data randomness comes from numpy (seeded by ``rng``): jax's threefry is slow to
  # compile on CPU and this is a host-side utility.
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  opt_state = _ADAM.init(params)
  for i in range(steps):
    lr = learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    u = gen.random((batch_size, 4), np.float32)
    z = gen.standard_normal((batch_size, 2 * mixture.dim), np.float32)
    params, opt_state = _fit_step(graphdef, mixture, param, float(p_uncond), params,
                                  opt_state, np.float32(lr), u, z)
  return params


_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _fit_step(graphdef, mixture: ToyMixture, param, p_uncond: float, params, opt_state,
              lr, u, z):
  """One Adam step of :func:`fit_to_teacher`; compiled once per (architecture, mixture,
  parameterisation, batch size), whatever the step count and learning rate.

  ``u`` ``[B, 4]`` uniform and ``z`` ``[B, 2 D]`` normal are the step's randomness.
  """
  apply = denoiser_apply(graphdef)
  teacher = mixture.teacher_apply(param)
  k, d = mixture.num_modes, mixture.dim

  def loss_fn(p):
    label = jnp.minimum((u[:, 0] * k).astype(jnp.int32), k - 1)
    label = jnp.where(u[:, 1] < p_uncond, NULL_LABEL, label)            # [B]
    x0 = mixture.sample_from(u[:, 3], z[:, :d], label)                 # [B, D]
    t = u[:, 2] * param.schedule.t_max                                 # [B]
    x_t = param.add_noise(x0, z[:, d:], t)
    mt = param.model_time(t)
    cond = {"label": label}
    target = jax.lax.stop_gradient(teacher(None, x_t, mt, cond))
    return jnp.mean(jnp.sum(jnp.square(apply(p, x_t, mt, cond) - target), -1))

  grads = jax.grad(loss_fn)(params)
  updates, opt_state = _ADAM.update(grads, opt_state, params)
  return jax.tree.map(lambda p, g: p - lr * g, params, updates), opt_state


# ---------------------------------------------------------------------------------------
# Component kind "toy_mlp": config, abstract model, load / export.
# ---------------------------------------------------------------------------------------


def abstract_model(cfg: ToyConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """``(graphdef, abstract params)`` without allocating any weights."""
  model = nnx.eval_shape(lambda: ToyDenoiser(cfg, dtype=dtype, param_dtype=param_dtype,
                                             rngs=nnx.Rngs(0)))
  return nnx.split(model)


def key_table(cfg: ToyConfig):
  """Identity key table: the on-disk names are our dotted parameter paths."""
  _, abstract = abstract_model(cfg)
  return {k: (k, "copy") for k in tree.flatten(abstract)}


def load(path: str | Path, *, allow_pickle: bool = False, dtype=jnp.float32,
         param_dtype=jnp.float32):
  """Reads a folder written by :func:`export` (``config.json`` + safetensors).

  Returns ``(config, graphdef, params)`` with ``params`` an ``nnx.State`` of host arrays.
  """
  from adm_jax.convert import common
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"toy model not found: {path}")
  cfg = ToyConfig.from_dict(common.read_json(path / "config.json"))
  tensors = common.read_tensors(path, allow_pickle=allow_pickle)
  graphdef, abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  return cfg, graphdef, common.fill_params(tensors, key_table(cfg), abstract,
                                           param_dtype=param_dtype,
                                           what=f"toy checkpoint {path}")


def export(cfg: ToyConfig, params, out_dir: str | Path) -> Path:
  """Writes ``params`` as ``config.json`` + float32 ``model.safetensors``."""
  from adm_jax.convert import common
  return common.write_folder(out_dir, params, key_table(cfg), weights_name=WEIGHTS,
                             config=cfg.to_dict(), what="toy model")


# ---------------------------------------------------------------------------------------
# Sample-quality metrics.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def mode_counts(samples: Array, mixture: ToyMixture, num_std: float = 3.0) -> Array:
  """Number of samples within ``num_std * std`` of each mode, int32 ``[K]``."""
  d = jnp.linalg.norm(_f32(samples)[:, None, :] - mixture.means_array()[None], axis=-1)
  return jnp.sum(d < num_std * mixture.std, axis=0).astype(jnp.int32)   # [K]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def mode_coverage(samples: Array, mixture: ToyMixture, num_std: float = 3.0,
                  min_fraction: float = 0.1) -> Array:
  """Fraction of modes that are covered, float32 scalar in ``[0, 1]``.

  Mode ``k`` is covered when at least ``max(1, min_fraction * n * w_k)`` of the ``n``
  samples lie within ``num_std * std`` of ``mu_k`` (3 std hold 98.9 % of a 2-D
  Gaussian's mass), so a few stragglers do not count as coverage.
  """
  n = samples.shape[0]
  need = jnp.maximum(1.0, min_fraction * n * _f32(mixture.weights))      # [K]
  return jnp.mean((mode_counts(samples, mixture, num_std) >= need).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(1, 2))
def in_mode_fraction(samples: Array, mixture: ToyMixture, num_std: float = 3.0) -> Array:
  """Fraction of samples within ``num_std * std`` of some mode (sample quality; 0.989
  for exact 2-D samples at 3 std)."""
  d = jnp.linalg.norm(_f32(samples)[:, None, :] - mixture.means_array()[None], axis=-1)
  return jnp.mean((jnp.min(d, axis=-1) < num_std * mixture.std).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames="bandwidths")
def mmd(samples_a: Array, samples_b: Array,
        bandwidths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)) -> Array:
  """Maximum mean discrepancy with a sum of Gaussian kernels, float32 scalar.

  The square root of the biased (V-statistic) estimate of ``MMD^2``, so >= 0; about
  ``sqrt(len(bandwidths) / n)``-ish for two independent samples of one distribution.
  Memory is ``O(n m)``; keep ``n, m`` at a few thousand.
  """
  a, b = _f32(samples_a), _f32(samples_b)

  def k(x, y):
    d2 = jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), -1)          # [n, m]
    return sum(jnp.mean(jnp.exp(-d2 / (2.0 * h * h))) for h in bandwidths)

  return jnp.sqrt(jnp.maximum(k(a, a) + k(b, b) - 2.0 * k(a, b), 0.0))


@functools.partial(jax.jit, static_argnames=("num_projections", "p"))
def sliced_wasserstein(samples_a: Array, samples_b: Array, rng: Array | None = None,
                       num_projections: int = 128, p: int = 1) -> Array:
  """Sliced ``p``-Wasserstein distance, float32 scalar.

  Both samples are projected on ``num_projections`` random unit directions; the 1-D
  distance per direction compares quantiles at ``(i + 1/2) / n`` (``n`` = the smaller
  sample size) and the result is ``mean(|qa - qb|^p) ^ (1/p)`` over quantiles and
  directions. ``p = 1`` is the default: with well-separated modes the quantiles that fall
  in the gaps between modes are very noisy, which ``p = 2`` amplifies (for two 2000-sample
  draws of the default ring, SW1 is about 0.06 and SW2 about 0.16).
  """
  rng = jax.random.key(0) if rng is None else rng
  a, b = _f32(samples_a), _f32(samples_b)
  dirs = jax.random.normal(rng, (a.shape[1], num_projections), jnp.float32)
  dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)            # [D, P]
  n = min(a.shape[0], b.shape[0])
  q = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
  qa = jnp.quantile(a @ dirs, q, axis=0)                                 # [n, P]
  qb = jnp.quantile(b @ dirs, q, axis=0)
  return jnp.mean(jnp.abs(qa - qb) ** p) ** (1.0 / p)


__all__ = [
    "ToyMixture", "ring_means", "alpha_sigma_from_model_time", "label_of", "uncond_like",
    "NULL_LABEL", "ToyConfig", "ToyBlock", "ToyDenoiser", "denoiser_apply", "init_denoiser",
    "fit_to_teacher", "abstract_model", "key_table", "load", "export", "mode_counts",
    "mode_coverage", "in_mode_fraction", "mmd", "sliced_wasserstein",
]
