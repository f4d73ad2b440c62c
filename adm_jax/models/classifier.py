"""A small CNN that classifies (and embeds) the digits benchmark images.

:class:`DigitClassifier` scores generated digits (:mod:`adm_jax.evaluation`): its
128-d feature layer is the embedding for FID and the diversity score, its logits give
prompt alignment. It is an *evaluation-only* network: no discriminator, loss or
generator may use it, or the generator would learn to please its judge.

Architecture (channels-last, float32, ~111k parameters)::

  [B, H, W, 3] in [-1, 1]
  conv3x3  3 -> 32, SiLU, avg-pool 2     [B, H/2, W/2, 32]
  conv3x3 32 -> 64, SiLU, avg-pool 2     [B, H/4, W/4, 64]
  conv3x3 64 -> 128, SiLU, global mean   [B, 128]
  linear 128 -> 128 (features)           [B, 128]
  SiLU, linear 128 -> 10 (logits)        [B, 10]

The global mean pool lets the same weights take any side that is a multiple of 8 (the
weights shipped in ``adm_jax/assets/digits/classifier`` are trained at 32x32).
Parameter paths: ``conv{1,2,3}.{kernel,bias}``, ``fc.{kernel,bias}``,
``head.{kernel,bias}``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax.models.layers import Conv2d, Linear

Array = jax.Array


def avg_pool_2x(x: Array) -> Array:
  """2x2 average pooling with stride 2 of ``[B, H, W, C]`` (``H``, ``W`` even)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))   # [B, H/2, W/2, C]


class DigitClassifier(nnx.Module):
  """Three conv stages, global mean pooling, a 128-d feature layer and 10 logits."""

  def __init__(self, *, widths: Sequence[int] = (32, 64, 128), feature_dim: int = 128,
               num_classes: int = 10, in_channels: int = 3, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if len(widths) != 3:
      raise ValueError(f"DigitClassifier wants 3 conv widths, got {widths}")
    self.widths = widths
    self.feature_dim = int(feature_dim)
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    c0, c1, c2 = widths
    self.conv1 = Conv2d(in_channels, c0, 3, padding=1, rngs=rngs)
    self.conv2 = Conv2d(c0, c1, 3, padding=1, rngs=rngs)
    self.conv3 = Conv2d(c1, c2, 3, padding=1, rngs=rngs)
    self.fc = Linear(c2, feature_dim, rngs=rngs)
    self.head = Linear(feature_dim, num_classes, rngs=rngs)

  def _check(self, x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"DigitClassifier wants images [B, H, W, {self.in_channels}], "
                       f"got shape {tuple(x.shape)}")
    if x.shape[1] % 8 or x.shape[2] % 8 or x.shape[1] == 0 or x.shape[2] == 0:
      raise ValueError(f"DigitClassifier wants H and W multiples of 8, got "
                       f"{tuple(x.shape[1:3])}")

  def features(self, x: Array) -> Array:
    """Images ``[B, H, W, 3]`` in ``[-1, 1]`` -> float32 features ``[B, feature_dim]``."""
    self._check(x)
    h = x.astype(jnp.float32)
    h = avg_pool_2x(jax.nn.silu(self.conv1(h)))          # [B, H/2, W/2, c0]
    h = avg_pool_2x(jax.nn.silu(self.conv2(h)))          # [B, H/4, W/4, c1]
    h = jax.nn.silu(self.conv3(h)).mean(axis=(1, 2))     # [B, c2]
    return self.fc(h)                                    # [B, feature_dim]

  def logits_from_features(self, f: Array) -> Array:
    return self.head(jax.nn.silu(f))                     # [B, num_classes]

  def __call__(self, x: Array) -> Array:
    """Images ``[B, H, W, 3]`` in ``[-1, 1]`` -> logits ``[B, num_classes]``."""
    return self.logits_from_features(self.features(x))
