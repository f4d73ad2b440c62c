"""Layers shared by every model family (channels-last, NNX).

Parameter names follow the diffusers / transformers module names wherever a layer is
a port of one (``kernel`` / ``bias`` / ``scale`` on the leaves), so that the converter
tables in :mod:`adm_jax.convert` read as a list of renames plus a layout rule.

Precision: parameters are stored in ``param_dtype`` (float32 master weights); the
compute dtype is ``dtype`` (bf16 on accelerators, float32 for parity tests). Norm
statistics and softmax always run in float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _dtypes(dtype, param_dtype):
  return dict(dtype=dtype, param_dtype=param_dtype)


class Linear(nnx.Linear):
  """``torch.nn.Linear`` with kernel ``[in, out]``."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_features, out_features, use_bias=use_bias,
                     rngs=rngs, **_dtypes(dtype, param_dtype))


CONV_LOWERINGS = ("auto", "xla", "patches")
_CONV_LOWERING = contextvars.ContextVar("conv_lowering", default="auto")
# "auto" takes the patch matmul on CPU for layers at most this many output positions
# per image and at least this many input channels, where XLA:CPU's convolution kernels
# are slowest: measured on SDXL-shaped layers (benchmarks/conv_lowering.py), forward +
# backward at 8x8x512 is 2x faster as one matmul, at 8x8x1280 3x; at 32x32 the XLA
# convolution is faster.
PATCH_MAX_POSITIONS = 256
PATCH_MIN_CHANNELS = 128


@contextlib.contextmanager
def conv_lowering(name: str):
  """Traces :class:`Conv2d` inside the block with lowering ``name``: ``"xla"`` (one
  ``conv_general_dilated``, what TPUs and GPUs want), ``"patches"`` (the k*k shifted
  views concatenated on channels, then one matmul with the ``[k*k*in, out]`` kernel)
  or ``"auto"`` (the default: patches for small, wide layers when tracing for CPU).
  Compiles for another platform than the host's (``--mode=compile`` for a TPU) trace
  under ``"xla"``."""
  if name not in CONV_LOWERINGS:
    raise ValueError(f"unknown conv lowering {name!r}; valid: {', '.join(CONV_LOWERINGS)}")
  token = _CONV_LOWERING.set(name)
  try:
    yield
  finally:
    _CONV_LOWERING.reset(token)


def conv_patches(x: Array, kernel: Array, strides: Sequence[int],
                 padding: Sequence[tuple[int, int]]) -> Array:
  """2-D convolution as one matmul over extracted patches (im2col).

  ``x`` ``[B, H, W, C]``, ``kernel`` ``[kh, kw, C, O]`` -> ``[B, Ho, Wo, O]``; the same
  result as ``lax.conv_general_dilated`` (no dilation, one feature group). Its gradient
  is two matmuls and the transpose of the slicing, which XLA:CPU runs much faster than
  its backward convolutions at small spatial sizes.
  """
  kh, kw, c, o = kernel.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  views = [jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1,
                                             j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
           for i in range(kh) for j in range(kw)]                  # k*k x [B, Ho, Wo, C]
  cols = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
  return jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * c, o))


def _use_patches(x: Array, kernel_size, strides, padding) -> bool:
  mode = _CONV_LOWERING.get()
  if mode == "xla" or tuple(kernel_size) == (1, 1):
    return False                     # a 1x1 convolution is a matmul in XLA already
  if mode == "patches":
    return True
  if jax.default_backend() != "cpu":
    return False
  h = (x.shape[1] + sum(padding[0]) - kernel_size[0]) // strides[0] + 1
  w = (x.shape[2] + sum(padding[1]) - kernel_size[1]) // strides[1] + 1
  return h * w <= PATCH_MAX_POSITIONS and x.shape[-1] >= PATCH_MIN_CHANNELS


class Conv2d(nnx.Conv):
  """``torch.nn.Conv2d`` on ``[B, H, W, C]`` with kernel ``[kh, kw, in, out]``.

  ``padding`` is the symmetric torch padding; pass a sequence of (lo, hi) pairs for the
  asymmetric padding of the VAE encoder's downsampler. How it lowers is a trace-time
  choice (:func:`conv_lowering`); the parameters are the same either way.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
               stride: int = 1, padding: int | Sequence[tuple[int, int]] = 0,
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    super().__init__(in_features, out_features, (kernel_size, kernel_size),
                     strides=(stride, stride), padding=tuple(padding), use_bias=use_bias,
                     rngs=rngs, **_dtypes(dtype, param_dtype))

  def __call__(self, x: Array) -> Array:                 # [B, H, W, in] -> [B, Ho, Wo, out]
    if not _use_patches(x, self.kernel_size, self.strides, self.padding):
      return super().__call__(x)
    x = x.astype(self.dtype)
    y = conv_patches(x, self.kernel[...].astype(self.dtype), self.strides, self.padding)
    if self.use_bias:
      y = y + self.bias[...].astype(self.dtype)
    return y


class GroupNorm(nnx.Module):
  """``torch.nn.GroupNorm`` for channels-last inputs ``[B, ..., C]``.

  Statistics are taken over every non-batch axis within a group of ``C / G`` channels,
  in float32, with the biased variance as torch does.
  """

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into "
                       f"{num_groups} groups")
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

  def __call__(self, x: Array) -> Array:
    shape = x.shape                                   # [B, ..., C]
    b, c, g = shape[0], shape[-1], self.num_groups
    xf = x.astype(jnp.float32).reshape(b, -1, c)       # [B, N, C]
    # Reduce over the spatial axis first, then within groups: XLA's CPU backend is much
    # faster at this than at one reduction over a [B, N, G, C/G] view (5x at SDXL sizes).
    mean = xf.mean(1).reshape(b, g, c // g).mean(-1)   # [B, G]
    d = xf - jnp.repeat(mean, c // g, axis=-1)[:, None, :]
    var = jnp.square(d).mean(1).reshape(b, g, c // g).mean(-1)
    y = d * jnp.repeat(jax.lax.rsqrt(var + self.eps), c // g, axis=-1)[:, None, :]
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.reshape(shape).astype(self.dtype)


class LayerNorm(nnx.Module):
  """``torch.nn.LayerNorm`` over the last axis, statistics in float32."""

  def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def attention(q: Array, k: Array, v: Array, *, bias: Array | None = None) -> Array:
  """Scaled dot-product attention on ``[B, L, H, D]`` tensors.

  ``bias`` broadcasts to ``[B, H, Lq, Lk]`` (use ``-inf``-like values to mask). Logits and
  softmax run in float32; the result has the dtype of ``q``.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  # Batched matmuls on [B, H, L, D] (4-5x faster on XLA:CPU than the equivalent einsum on
  # [B, L, H, D], and the layout TPU kernels want).
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))                # [B, H, L, D]
  logits = jnp.matmul(qt, jnp.swapaxes(kt, -1, -2),
                      preferred_element_type=jnp.float32) * scale        # [B, H, Lq, Lk]
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.matmul(weights, vt), 1, 2)                     # [B, Lq, H, D]


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers'
  ``get_timestep_embedding``.  ``t``: ``[N]`` -> ``[N, dim]`` float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = scale * t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_features: int, dim: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = _dtypes(dtype, param_dtype)
    self.linear_1 = Linear(in_features, dim, rngs=rngs, **kw)
    self.linear_2 = Linear(dim, dim, rngs=rngs, **kw)

  def __call__(self, x: Array) -> Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def upsample_nearest_2x(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling of ``[B, H, W, C]`` (torch ``interpolate``)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


# Activation rematerialisation (a memory lever, ``config.remat``): a block whose ``remat``
# attribute names a policy recomputes its activations in the backward pass instead of
# keeping them, except what the policy saves.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_policy(name: str):
  """``jax.checkpoint`` policy for ``name`` (``"full"``: save nothing, recompute all;
  ``"none"``: ``None``, no rematerialisation)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; valid: {', '.join(REMAT_POLICIES)}")
  if name == "none":
    return None
  return jax.checkpoint_policies.nothing_saveable if name == "full" else getattr(
      jax.checkpoint_policies, name)


def call_maybe_remat(module: nnx.Module, forward, *args):
  """``forward(module, *args)``, under ``jax.checkpoint`` when ``module.remat`` names a
  policy."""
  name = getattr(module, "remat", "none")
  if name == "none":
    return forward(module, *args)
  # A pure function of the module's state (no NNX state update across trace levels, so
  # it also works inside lax loops such as DMD2's backward simulation).
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    return forward(nnx.merge(graphdef, state), *args)
  return jax.checkpoint(pure, policy=remat_policy(name))(state, *args)


def map_microbatches(fn, x: Array, n: int):
  """``fn(x)`` for a batch ``x`` ``[B, ...]`` as ``n`` sequential passes (``lax.map``),
  each rematerialised: peak activations of ``B / n`` rows, in the forward and in the
  backward pass, for ``fn`` that treats rows independently.

  Pass ``j`` takes rows ``j, j + n, j + 2n, ...``: on a batch sharded in contiguous
  blocks, every device keeps working on its own rows in every pass (as long as its
  block splits into ``n``). The output rows come back in the input's order.
  """
  if n <= 1:
    return fn(x)
  b = x.shape[0]
  if b % n:
    raise ValueError(f"a batch of {b} does not split into {n} microbatches")
  xs = jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)         # [n, B/n, ...]
  ys = jax.lax.map(jax.checkpoint(fn), xs)
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(b, *y.shape[2:]), ys)


def set_remat(model: nnx.Module, name: str) -> None:
  """Sets policy ``name`` on every block of ``model`` that supports remat (declares a
  ``remat`` attribute: UNet resnets and transformer blocks, VAE resnets, SAM ViT
  blocks)."""
  remat_policy(name)                                     # validates the name
  for _, m in model.iter_modules():
    if hasattr(type(m), "remat"):
      m.remat = name
