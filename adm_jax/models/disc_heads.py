"""Discriminator heads on frozen (or shared) backbone features.

Every head maps one feature map ``[B, h, w, c]`` to one float32 logit per sample ``[B]``.
The backbone is whatever produced the features (the fake-score UNet's mid block for
DMD2, the frozen teacher's intermediate layers for ADM, SAM ViT blocks for ADP's pixel
discriminator): the heads only see a dict ``name -> [B, h, w, c]``, so they are
family-agnostic.

* :class:`DMD2Head`: the official DMD2 ``cls_pred_branch`` (``main/sd_guidance.py``,
  ``main/edm/edm_guidance.py``): ``log2(resolution / 4)`` blocks of
  [Conv 4x4 stride 2 padding 1 -> GroupNorm -> SiLU] down to 4x4, then
  [Conv 4x4 stride 4 -> GroupNorm -> SiLU] to 1x1, then a 1x1 conv to one logit. The
  width stays ``channels`` throughout (1280 for SD1.5 / SDXL).
* :class:`ADMHead2D`: the SDXL-Lightning-style 2D head of ADM (App. B.1):
  ``num_down`` x [Conv 4x4 stride 2 -> GN -> SiLU], [Conv 3x3 -> GN -> SiLU], global
  average pooling, Linear -> one logit (zero-initialised by default).
* :class:`MultiHeadDiscriminator`: one head per named feature, logits averaged over
  heads (ADM).

Heads are built by name through :data:`HEADS` (``make_head``); a head class takes
``(channels, *, resolution, dtype, param_dtype, rngs, **options)``, which leaves room for
the 3-D video heads (``resolution`` a ``(t, h, w)`` tuple) to register later.

Parameter names: ``DMD2Head`` holds ``down.i.{conv,norm}``, ``pool.{conv,norm}`` and
``out``; the official ``nn.Sequential`` indices are ``cls_pred_branch.{3i, 3i+1}`` for
``down.i``, ``{3n, 3n+1}`` for ``pool`` and ``3n+3`` for ``out`` (``n`` stride-2 blocks).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax.models.layers import Conv2d, GroupNorm, Linear

Array = jax.Array
Resolution = int | Sequence[int]


def _hw(resolution: Resolution) -> tuple[int, int]:
  """``resolution`` as ``(h, w)``: an int is square."""
  if isinstance(resolution, int):
    return resolution, resolution
  res = tuple(int(r) for r in resolution)
  if len(res) != 2:
    raise ValueError(f"a 2D head wants an int or (h, w) resolution, got {resolution!r}")
  return res


def torch_default_init(layer: nnx.Module, rngs: nnx.Rngs) -> None:
  """Draws ``layer.kernel`` / ``layer.bias`` as ``torch.nn.Conv2d`` / ``Linear`` do.

  torch's default is ``kaiming_uniform_(a=sqrt(5))`` for the weight and
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the bias, i.e. both uniform with bound
  ``1/sqrt(fan_in)`` (``fan_in`` = input channels x kernel area). The official DMD2 head
  is trained from scratch with this initialisation. ``layer`` may be abstract (built
  under ``nnx.eval_shape``): its variables are replaced, not read.
  """
  shape, dtype = layer.kernel.shape, layer.kernel.dtype   # [kh, kw, I, O] or [I, O]
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  layer.kernel.set_value(jax.random.uniform(rngs.params(), shape, dtype, -bound, bound))
  if getattr(layer, "bias", None) is not None:
    layer.bias.set_value(jax.random.uniform(rngs.params(), layer.bias.shape,
                                            layer.bias.dtype, -bound, bound))


def _zero_init(layer: nnx.Module) -> None:
  layer.kernel.set_value(jnp.zeros(layer.kernel.shape, layer.kernel.dtype))
  if getattr(layer, "bias", None) is not None:
    layer.bias.set_value(jnp.zeros(layer.bias.shape, layer.bias.dtype))


def torch_conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> Conv2d:
  """A :class:`Conv2d` (with bias) initialised as torch's default.

  The layer is built abstractly and filled once, so no flax initialiser is drawn and
  thrown away (random-number programs dominate XLA:CPU compile time).
  """
  conv = nnx.eval_shape(lambda: Conv2d(in_channels, out_channels, kernel_size,
                                       stride=stride, padding=padding, dtype=dtype,
                                       param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  torch_default_init(conv, rngs)
  return conv


def torch_linear(in_features: int, out_features: int, *, zero: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> Linear:
  """A :class:`Linear` initialised as torch's default, or all zeros with ``zero``."""
  layer = nnx.eval_shape(lambda: Linear(in_features, out_features, dtype=dtype,
                                        param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  if zero:
    _zero_init(layer)
  else:
    torch_default_init(layer, rngs)
  return layer


class ConvNormAct(nnx.Module):
  """Conv2d -> GroupNorm -> SiLU (channels-last)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
               stride: int, padding: int, groups: int, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.conv = torch_conv(in_channels, out_channels, kernel_size, stride=stride,
                           padding=padding, rngs=rngs, **kw)
    self.norm = GroupNorm(groups, out_channels, **kw)

  def __call__(self, x: Array) -> Array:            # [B, h, w, c]
    return jax.nn.silu(self.norm(self.conv(x)))      # [B, h', w', c']


class DMD2Head(nnx.Module):
  """The official DMD2 GAN classifier (``cls_pred_branch``) on one square feature map.

  ``n = log2(resolution / 4)`` stride-2 blocks bring the map to 4x4 (SDXL's 32x32 mid
  block: three; SD1.5's and ImageNet-64's 8x8: one), a 4x4 stride-4 block pools it to
  1x1 and a 1x1 conv gives the logit. All convs keep ``channels`` and have biases; the
  initialisation is torch's default.

  The official code runs the head in float32 outside autocast; that is the default here
  (``dtype=float32``). A lower ``dtype`` computes the convs in it; the logits are
  float32 either way.

  Args:
    channels: Feature channels ``c`` (1280 for SD1.5 / SDXL mid blocks).
    resolution: Feature side ``h == w``; a power of two >= 4 (or an ``(h, w)`` pair with
      ``h == w``).
    groups: GroupNorm groups (32, as the official code).
    dtype: Compute dtype.
    param_dtype: Parameter storage dtype.
    rngs: Initialisation randomness.
  """

  def __init__(self, channels: int, resolution: Resolution, *, groups: int = 32,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    h, w = _hw(resolution)
    if h != w or h < 4 or h & (h - 1):
      raise ValueError(f"DMD2Head needs a square power-of-two feature map of side >= 4, "
                       f"got {h}x{w}")
    self.resolution = h
    self.dtype = dtype
    kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    num_down = int(math.log2(h // 4))
    self.down = nnx.List([ConvNormAct(channels, channels, 4, stride=2, padding=1, **kw)
                          for _ in range(num_down)])
    self.pool = ConvNormAct(channels, channels, 4, stride=4, padding=0, **kw)
    self.out = torch_conv(channels, 1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  @property
  def num_down(self) -> int:
    return len(self.down)

  def __call__(self, feat: Array) -> Array:
    """``feat`` ``[B, r, r, c]`` -> logits ``[B]`` float32."""
    if feat.shape[1:3] != (self.resolution, self.resolution):
      raise ValueError(f"DMD2Head built for {self.resolution}x{self.resolution} features, "
                       f"got {feat.shape[1]}x{feat.shape[2]}")
    x = feat.astype(self.dtype)                      # [B, r, r, c]
    for block in self.down:
      x = block(x)                                   # [B, r/2, r/2, c] ... [B, 4, 4, c]
    x = self.pool(x)                                 # [B, 1, 1, c]
    return self.out(x)[:, 0, 0, 0].astype(jnp.float32)  # [B]


class ADMHead2D(nnx.Module):
  """ADM's SDXL-Lightning-style 2D head (App. B.1 / Fig. 6).

  ``num_down`` x [Conv 4x4 stride 2 padding 1 -> GN -> SiLU] (the first conv projects
  ``channels`` -> ``hidden``), [Conv 3x3 stride 1 padding 1 -> GN -> SiLU], global
  average pooling over ``h, w``, Linear ``hidden -> 1``. ``hidden=256`` and the
  zero-initialised output layer follow the one public re-implementation (the paper is
  silent on both); with ``zero_init_out`` every logit is exactly 0 at initialisation
  (and at that first step only the output layer receives a gradient). The convs are
  initialised as torch's defaults, like :class:`DMD2Head`.

  Small maps: a 4x4 stride-2 padding-1 conv takes a side ``s`` to ``floor(s / 2)``, so
  it cannot be applied to a 1-wide map. When ``resolution`` is given, the head keeps
  only ``min(num_down, floor(log2(min(h, w))))`` stride-2 blocks (the dropped ones are
  not built at all, so every parameter is used); a 1x1 feature gets no stride-2 block
  and the 3x3 conv does the input projection. Without ``resolution`` all ``num_down``
  blocks are built and a too-small feature raises at call time.

  Args:
    channels: Feature channels ``c``.
    resolution: Feature size ``h`` or ``(h, w)`` (optional, see above).
    hidden: Width of the head.
    groups: GroupNorm groups (must divide ``hidden``).
    num_down: Requested number of stride-2 blocks.
    zero_init_out: Zero the output Linear's kernel and bias (else torch's default).
    dtype: Compute dtype; the logits are float32.
    param_dtype: Parameter storage dtype.
    rngs: Initialisation randomness.
  """

  def __init__(self, channels: int, *, resolution: Resolution | None = None,
               hidden: int = 256, groups: int = 32, num_down: int = 3,
               zero_init_out: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_down < 0:
      raise ValueError(f"ADMHead2D: num_down={num_down} < 0")
    if resolution is not None:
      h, w = _hw(resolution)
      if min(h, w) < 1:
        raise ValueError(f"ADMHead2D: empty feature map {h}x{w}")
      num_down = min(num_down, int(math.floor(math.log2(min(h, w)))))
    self.dtype = dtype
    kw = dict(groups=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = [channels] + [hidden] * num_down
    self.down = nnx.List([ConvNormAct(widths[i], hidden, 4, stride=2, padding=1, **kw)
                          for i in range(num_down)])
    self.conv = ConvNormAct(widths[-1], hidden, 3, stride=1, padding=1, **kw)
    self.out = torch_linear(hidden, 1, zero=zero_init_out, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  @property
  def num_down(self) -> int:
    return len(self.down)

  def __call__(self, feat: Array) -> Array:
    """``feat`` ``[B, h, w, c]`` -> logits ``[B]`` float32."""
    if min(feat.shape[1:3]) < 2 ** self.num_down:
      raise ValueError(f"ADMHead2D with {self.num_down} stride-2 blocks needs features of "
                       f"at least {2 ** self.num_down}x{2 ** self.num_down}, got "
                       f"{feat.shape[1]}x{feat.shape[2]}; pass resolution= when building")
    x = feat.astype(self.dtype)                      # [B, h, w, c]
    for block in self.down:
      x = block(x)                                   # [B, h/2, w/2, hidden] ...
    x = self.conv(x)                                 # [B, h', w', hidden]
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)  # [B, hidden]
    return self.out(pooled)[:, 0].astype(jnp.float32)  # [B]


# name -> head class; a head is built as cls(channels, resolution=..., dtype=...,
# param_dtype=..., rngs=..., **options).
HEADS: dict[str, Callable[..., nnx.Module]] = {
    "dmd2": DMD2Head,
    "admhead2d": ADMHead2D,
}


def register_head(name: str):
  """Class decorator adding a head to :data:`HEADS` (for the 3-D video heads)."""
  def wrap(cls):
    if name in HEADS:
      raise ValueError(f"discriminator head {name!r} is already registered")
    HEADS[name] = cls
    return cls
  return wrap


def make_head(kind: str, channels: int, resolution: Any, *, dtype=jnp.float32,
              param_dtype=jnp.float32, rngs: nnx.Rngs, **options) -> nnx.Module:
  """Builds the head registered as ``kind`` for ``channels`` features at ``resolution``."""
  try:
    cls = HEADS[kind]
  except KeyError:
    raise ValueError(f"unknown discriminator head {kind!r} (known: {sorted(HEADS)})") \
        from None
  return cls(channels, resolution=resolution, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs, **options)


class MultiHeadDiscriminator(nnx.Module):
  """One head per named feature; the logit is the mean of the heads' logits (ADM).

  Args:
    feature_specs: ``{name: (channels, resolution)}`` of the features the heads read;
      ``resolution`` is an int or ``(h, w)``. Names must not contain ``"."`` (they become
      parameter path components, ``heads.<name>....``).
    head: Registered head kind (``"admhead2d"`` or ``"dmd2"``).
    dtype: Compute dtype of every head (logits are float32).
    param_dtype: Parameter storage dtype.
    rngs: Initialisation randomness.
    **head_kw: Options passed to every head (``hidden``, ``groups``, ``num_down`` ...).
  """

  def __init__(self, feature_specs: Mapping[str, tuple[int, Any]], head: str = "admhead2d",
               *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, **head_kw):
    if not feature_specs:
      raise ValueError("MultiHeadDiscriminator needs at least one feature")
    for name in feature_specs:
      if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"feature name {name!r}: want a non-empty string without '.'")
    self.names = tuple(feature_specs)
    self.kind = head
    self.heads = nnx.Dict({
        name: make_head(head, channels, resolution, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs, **head_kw)
        for name, (channels, resolution) in feature_specs.items()})

  def __call__(self, features: Mapping[str, Array], *,
               return_per_head: bool = False) -> Array | tuple[Array, dict[str, Array]]:
    """Scores a batch of features.

    Args:
      features: ``{name: [B, h, w, c]}``; names outside ``feature_specs`` are ignored.
      return_per_head: Also return ``{name: [B]}`` (for logging).

    Returns:
      Logits ``[B]`` float32 (and the per-head logits).

    Raises:
      KeyError: naming a feature the discriminator needs but ``features`` lacks.
    """
    missing = [n for n in self.names if n not in features]
    if missing:
      raise KeyError(f"features missing for discriminator heads: {missing} "
                     f"(given: {sorted(features)})")
    per_head = {n: self.heads[n](features[n]) for n in self.names}   # {name: [B]}
    logits = jnp.mean(jnp.stack([per_head[n] for n in self.names]), axis=0)  # [B]
    return (logits, per_head) if return_per_head else logits
