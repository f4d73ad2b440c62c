"""``AutoencoderKL`` (SD / SDXL / SD3 / Flux image VAEs) in Flax NNX, channels-last.

A port of diffusers' ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``
blocks, a ``UNetMidBlock2D`` with one single-head self-attention (optional), and the
optional 1x1 ``quant_conv`` / ``post_quant_conv``. Parameter paths mirror the diffusers
module names (``encoder.down_blocks.0.resnets.1.conv1.kernel``), so
:mod:`adm_jax.convert.vae` is a list of renames plus layouts.

Images are ``[B, H, W, 3]`` in ``[-1, 1]``; latents are ``[B, H/f, W/f, latent_channels]``
with ``f = 2 ** (len(block_out_channels) - 1)``. :meth:`AutoencoderKL.encode` returns
latents already scaled for the diffusion model and :meth:`AutoencoderKL.decode` takes
such latents; ``encode_raw`` / ``decode_raw`` work on the unscaled latent ``z``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax.models import layers as L

Array = jax.Array

_DOWN = ("DownEncoderBlock2D",)
_UP = ("UpDecoderBlock2D",)
_ACTIVATIONS = ("silu", "swish")
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
RESNET_EPS = 1e-6   # hard-coded by diffusers' Encoder / Decoder for every norm


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Architecture and latent scaling of an ``AutoencoderKL`` (diffusers config fields).

  ``latents_mean`` / ``latents_std`` (per-channel, e.g. Playground v2.5) replace the scalar
  ``shift_factor`` when set: ``latents = (z - mean) * scaling_factor / std``, as the SDXL
  pipelines do. ``force_upcast`` and ``sample_size`` are kept for the round trip only.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    for key, types, allowed in (("down_block_types", self.down_block_types, _DOWN),
                                ("up_block_types", self.up_block_types, _UP)):
      bad = [t for t in types if t not in allowed]
      if bad:
        raise ValueError(f"AutoencoderKL config: {key} {bad} not supported "
                         f"(only {allowed[0]})")
      if len(types) != n:
        raise ValueError(f"AutoencoderKL config: {key} has {len(types)} entries for "
                         f"{n} block_out_channels")
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"AutoencoderKL config: act_fn {self.act_fn!r} not supported "
                       f"(only 'silu')")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"AutoencoderKL config: block_out_channels {bad} do not split into "
                       f"norm_num_groups={self.norm_num_groups}")
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("AutoencoderKL config: latents_mean and latents_std must be set "
                       "together")
    if self.latents_mean is not None:
      if self.shift_factor is not None:
        raise ValueError("AutoencoderKL config: shift_factor and latents_mean are both set")
      for key in ("latents_mean", "latents_std"):
        if len(getattr(self, key)) != self.latent_channels:
          raise ValueError(f"AutoencoderKL config: {key} needs {self.latent_channels} "
                           f"entries (latent_channels)")

  @property
  def downscale(self) -> int:
    """Spatial factor between images and latents."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "AutoencoderKLConfig":
    """From a diffusers ``config.json`` dict; unknown keys raise ``ValueError``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in cfg.items():
      if key.startswith("_"):
        continue
      if key not in fields:
        raise ValueError(f"AutoencoderKL config: unsupported key {key!r}")
      if isinstance(value, list):
        value = tuple(value)
      kw[key] = value
    for key in ("scaling_factor", "shift_factor"):
      if kw.get(key) is not None:
        kw[key] = float(kw[key])
    return cls(**kw)

  def to_diffusers(self) -> dict[str, Any]:
    """A dict ``diffusers.AutoencoderKL.from_config`` accepts (``config.json``)."""
    out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


class _Ctx:
  """Shared constructor arguments (dtypes, rngs) for the blocks of one model."""

  def __init__(self, cfg: AutoencoderKLConfig, dtype, param_dtype, rngs):
    self.cfg, self.rngs = cfg, rngs
    self.kw = dict(dtype=dtype, param_dtype=param_dtype)

  def norm(self, c: int) -> L.GroupNorm:
    return L.GroupNorm(self.cfg.norm_num_groups, c, eps=RESNET_EPS, **self.kw)

  def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding=None) -> L.Conv2d:
    return L.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding,
                    rngs=self.rngs, **self.kw)

  def linear(self, cin: int, cout: int) -> L.Linear:
    return L.Linear(cin, cout, rngs=self.rngs, **self.kw)


class ResnetBlock(nnx.Module):
  """diffusers ``ResnetBlock2D`` without time embedding (``temb_channels=None``)."""

  def __init__(self, ctx: _Ctx, cin: int, cout: int):
    self.norm1 = ctx.norm(cin)
    self.conv1 = ctx.conv(cin, cout, 3)
    self.norm2 = ctx.norm(cout)
    self.conv2 = ctx.conv(cout, cout, 3)
    self.conv_shortcut = ctx.conv(cin, cout, 1) if cin != cout else None

  remat = "none"            # a policy of layers.REMAT_POLICIES (config.remat.decoder)

  def __call__(self, x: Array) -> Array:                   # x [B, H, W, Cin]
    return L.call_maybe_remat(self, type(self)._forward, x)

  def _forward(self, x: Array) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h                                           # [B, H, W, Cout]


class SelfAttention(nnx.Module):
  """diffusers ``Attention`` as the VAE mid block builds it.

  GroupNorm (eps 1e-6) in front, biased q/k/v, ``heads`` heads of ``channels / heads``,
  residual connection, ``rescale_output_factor`` 1.
  """

  def __init__(self, ctx: _Ctx, channels: int, heads: int = 1):
    self.heads = heads
    self.group_norm = ctx.norm(channels)
    self.to_q = ctx.linear(channels, channels)
    self.to_k = ctx.linear(channels, channels)
    self.to_v = ctx.linear(channels, channels)
    self.to_out = nnx.List([ctx.linear(channels, channels)])

  def __call__(self, x: Array) -> Array:                   # x [B, H, W, C]
    b, hh, ww, c = x.shape
    h = self.group_norm(x).reshape(b, hh * ww, c)          # [B, L, C]
    split = lambda t: t.reshape(b, hh * ww, self.heads, c // self.heads)  # noqa: E731
    o = L.attention(split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h)))
    o = self.to_out[0](o.reshape(b, hh * ww, c))           # [B, L, C]
    return x + o.reshape(b, hh, ww, c).astype(x.dtype)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after a (0, 1, 0, 1) zero pad (diffusers ``padding=0`` path)."""

  def __init__(self, ctx: _Ctx, channels: int):
    self.conv = ctx.conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: Array) -> Array:                   # [B, H, W, C]
    return self.conv(x)                                    # [B, H/2, W/2, C]


class Upsample(nnx.Module):
  """Nearest 2x upsampling followed by a 3x3 conv."""

  def __init__(self, ctx: _Ctx, channels: int):
    self.conv = ctx.conv(channels, channels, 3)

  def __call__(self, x: Array) -> Array:                   # [B, H, W, C]
    return self.conv(L.upsample_nearest_2x(x))             # [B, 2H, 2W, C]


class DownEncoderBlock(nnx.Module):
  """diffusers ``DownEncoderBlock2D``: resnets, then an optional downsampler."""

  def __init__(self, ctx: _Ctx, cin: int, cout: int, num_layers: int, downsample: bool):
    self.resnets = nnx.List([ResnetBlock(ctx, cin if i == 0 else cout, cout)
                             for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample(ctx, cout)] if downsample else [])

  def __call__(self, x: Array) -> Array:
    for resnet in self.resnets:
      x = resnet(x)
    for down in self.downsamplers:
      x = down(x)
    return x


class UpDecoderBlock(nnx.Module):
  """diffusers ``UpDecoderBlock2D``: resnets, then an optional upsampler."""

  def __init__(self, ctx: _Ctx, cin: int, cout: int, num_layers: int, upsample: bool):
    self.resnets = nnx.List([ResnetBlock(ctx, cin if i == 0 else cout, cout)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample(ctx, cout)] if upsample else [])

  def __call__(self, x: Array) -> Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


class MidBlock(nnx.Module):
  """diffusers ``UNetMidBlock2D`` (one layer): resnet, [attention], resnet."""

  def __init__(self, ctx: _Ctx, channels: int, add_attention: bool):
    self.resnets = nnx.List([ResnetBlock(ctx, channels, channels) for _ in range(2)])
    # attention_head_dim = channels in the VAE, hence a single head.
    self.attentions = nnx.List([SelfAttention(ctx, channels)] if add_attention else [])

  def __call__(self, x: Array) -> Array:                   # [B, H, W, C]
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """diffusers ``Encoder`` with ``double_z=True``: image -> ``[B, h, w, 2 * latent]``."""

  def __init__(self, ctx: _Ctx):
    cfg = ctx.cfg
    ch = cfg.block_out_channels
    self.conv_in = ctx.conv(cfg.in_channels, ch[0], 3)
    self.down_blocks = nnx.List([
        DownEncoderBlock(ctx, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block,
                         downsample=i < len(ch) - 1)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ctx, ch[-1], cfg.mid_block_add_attention)
    self.conv_norm_out = ctx.norm(ch[-1])
    self.conv_out = ctx.conv(ch[-1], 2 * cfg.latent_channels, 3)

  def __call__(self, x: Array) -> Array:                   # [B, H, W, Cin]
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # [B, h, w, 2 * latent]


class Decoder(nnx.Module):
  """diffusers ``Decoder`` (group norm): ``[B, h, w, latent]`` -> image."""

  def __init__(self, ctx: _Ctx):
    cfg = ctx.cfg
    rev = tuple(reversed(cfg.block_out_channels))
    self.conv_in = ctx.conv(cfg.latent_channels, rev[0], 3)
    self.mid_block = MidBlock(ctx, rev[0], cfg.mid_block_add_attention)
    self.up_blocks = nnx.List([
        UpDecoderBlock(ctx, rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1,
                       upsample=i < len(rev) - 1)
        for i in range(len(rev))])
    self.conv_norm_out = ctx.norm(rev[-1])
    self.conv_out = ctx.conv(rev[-1], cfg.out_channels, 3)

  def __call__(self, z: Array) -> Array:                   # [B, h, w, latent]
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # [B, H, W, Cout]


class AutoencoderKL(nnx.Module):
  """diffusers ``AutoencoderKL`` on channels-last images.

  Args:
    config: the architecture.
    dtype: compute dtype (float32 or bfloat16); norms and softmax run in float32.
    param_dtype: parameter dtype (float32 master weights).
    rngs: initialisation randomness (the weights are normally loaded afterwards).
  """

  def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    ctx = _Ctx(config, dtype, param_dtype, rngs)
    latent = config.latent_channels
    self.encoder = Encoder(ctx)
    self.decoder = Decoder(ctx)
    self.quant_conv = ctx.conv(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
    self.post_quant_conv = (ctx.conv(latent, latent, 1) if config.use_post_quant_conv
                            else None)

  # -- raw latent space ---------------------------------------------------------------

  def encode_moments(self, x: Array) -> tuple[Array, Array]:
    """Posterior of images ``x [B, H, W, Cin]``: ``(mean, logvar)``, each float32
    ``[B, h, w, latent]``, with ``logvar`` clamped to ``[-30, 20]``."""
    h = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def encode_raw(self, x: Array, rng: Array | None = None) -> Array:
    """Unscaled latent ``z`` (float32): the posterior mean, or a sample if ``rng``."""
    mean, logvar = self.encode_moments(x)
    return mean if rng is None else sample_gaussian(rng, mean, logvar)

  def decode_raw(self, z: Array) -> Array:
    """Images (float32 ``[B, H, W, Cout]``) from an unscaled latent ``z``."""
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  # -- scaled latent space (what the diffusion model sees) ----------------------------

  def scale_latents(self, z: Array) -> Array:
    """``z`` -> diffusion latents: ``(z - shift) * scaling_factor`` (float32)."""
    shift, scale = _latent_affine(self.config)
    return (z.astype(jnp.float32) - shift) * scale

  def unscale_latents(self, latents: Array) -> Array:
    """Inverse of :meth:`scale_latents`: ``latents / scaling_factor + shift``."""
    shift, scale = _latent_affine(self.config)
    return latents.astype(jnp.float32) / scale + shift

  def encode(self, x: Array, rng: Array | None = None) -> Array:
    """Images ``[B, H, W, Cin]`` in [-1, 1] -> scaled latents ``[B, h, w, latent]``.

    Uses the posterior mean when ``rng`` is None, a posterior sample otherwise.
    """
    return self.scale_latents(self.encode_raw(x, rng))

  def decode(self, latents: Array) -> Array:
    """Scaled latents ``[B, h, w, latent]`` -> images ``[B, H, W, Cout]`` (float32)."""
    return self.decode_raw(self.unscale_latents(latents))

  def __call__(self, x: Array, rng: Array | None = None) -> Array:
    """Reconstruction ``decode(encode(x, rng))``."""
    return self.decode_raw(self.encode_raw(x, rng))


def sample_gaussian(rng: Array, mean: Array, logvar: Array) -> Array:
  """``mean + exp(logvar / 2) * N(0, 1)`` in float32 (``DiagonalGaussianDistribution``)."""
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise


def _latent_affine(cfg: AutoencoderKLConfig) -> tuple[Array | float, Array | float]:
  """``(shift, scale)`` with ``latents = (z - shift) * scale``, broadcasting over C."""
  if cfg.latents_mean is not None:
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return mean, cfg.scaling_factor / std
  return (cfg.shift_factor or 0.0), cfg.scaling_factor
