"""Optimisers built from ``config.optim.<network>`` and the generator EMA.

Every trained network (generator, fake score, discriminator) gets its own
``optax.GradientTransformation`` from a :func:`adm_jax.config_lib.adamw` preset::

  c.optim.generator = config_lib.adamw(5e-7)   # name, lr, warmup_steps, grad_clip, ...

The defaults follow DMD2 (Yin et al. 2024, App. F): AdamW with lr 5e-7, betas
(0.9, 0.999), weight decay 0.01, gradients clipped to a global norm of 10, and a
linear warm-up over 500 updates followed by a constant learning rate.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam")
DEFAULT_EPS = 1e-8


def _get(cfg: Mapping[str, Any], key: str, default=None):
  """``cfg.get`` that also treats an explicit ``None`` as "use the default"."""
  value = cfg.get(key, default)
  return default if value is None else value


def learning_rate_fn(cfg: Mapping[str, Any]) -> optax.Schedule:
  """Linear warm-up from 0 to ``cfg.lr`` over ``cfg.warmup_steps`` updates, then constant;
  with ``cfg.delay_steps`` = N, the learning rate is 0 for the first N updates and the
  warm-up starts after them (e.g. ADM's generator waiting while its fake score and
  discriminator catch up with the hand-over).

  The schedule is indexed by the number of updates already applied (optax's
  ``count``), so the first update uses ``lr(0) = 0``, as diffusers'
  ``constant_with_warmup`` scheduler that DMD2 trains with. Exposed so that the
  training loop can log the learning rate of any step.

  Args:
    cfg: an optimiser config (``lr``, optional ``warmup_steps``, ``delay_steps``).

  Returns:
    ``step -> learning rate``.
  """
  lr = float(cfg["lr"])
  warmup = int(_get(cfg, "warmup_steps", 0))
  delay = int(_get(cfg, "delay_steps", 0))
  if delay < 0:
    raise ValueError(f"delay_steps={delay}: must be >= 0")
  # linear_schedule holds end_value once transition_steps is reached.
  schedule = (optax.linear_schedule(0.0, lr, transition_steps=warmup) if warmup > 0
              else optax.constant_schedule(lr))
  if delay:         # frozen (lr 0) for the first ``delay`` updates, then the schedule
    schedule = optax.join_schedules([optax.constant_schedule(0.0), schedule], [delay])
  return schedule


def make_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam(W) with :func:`learning_rate_fn`.

  Args:
    cfg: ``ConfigDict`` or dict with ``name`` (one of :data:`OPTIMIZERS`), ``lr``
      and optionally ``warmup_steps``, ``delay_steps``, ``grad_clip`` (``<= 0`` or ``None``: no
      clipping), ``weight_decay``, ``b1``, ``b2``, ``eps``.

  Returns:
    The optax transformation (``init``/``update``).

  Raises:
    ValueError: an unknown ``name``, or weight decay asked of plain ``adam``.
  """
  name = _get(cfg, "name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer name {name!r}; valid choices: "
                     f"{', '.join(map(repr, OPTIMIZERS))}")
  b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
  eps = float(_get(cfg, "eps", DEFAULT_EPS))
  weight_decay = float(_get(cfg, "weight_decay", 0.0))
  lr = learning_rate_fn(cfg)
  if name == "adam":
    if weight_decay:
      # Silently dropping a configured decay would change the training run.
      raise ValueError(f"optimizer 'adam' has no weight decay but weight_decay="
                       f"{weight_decay}; use name='adamw' or set weight_decay=0")
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  else:
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  clip = float(_get(cfg, "grad_clip", 0.0))
  # Clip first, so Adam's moments only ever see clipped gradients (as torch's
  # clip_grad_norm_ before optimizer.step() in DMD2).
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt


def ema_update(ema_params, params, decay: float | jax.Array):
  """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf, in the EMA's dtype.

  Args:
    ema_params: the running average (same structure as ``params``).
    params: the current parameters.
    decay: in ``[0, 1]``; ``1`` freezes the average, ``0`` copies ``params``.

  Returns:
    The new average; the inputs are not modified.
  """
  def update(e, p):
    mixed = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
    return mixed.astype(e.dtype)
  return jax.tree.map(update, ema_params, params)
