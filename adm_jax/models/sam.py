"""SAM ViT image encoder (transformers ``SamVisionEncoder``), the backbone of ADP's pixel
discriminator.

A port of transformers 5.23's ``SamVisionEncoder``: a patch-embedding conv, a learned
absolute position embedding, pre-norm ViT blocks whose self-attention is windowed
(non-overlapping ``window_size`` windows, the map zero-padded to a multiple of it) except
in the ``global_attn_indexes`` blocks, decomposed relative position embeddings
(``rel_pos_h`` / ``rel_pos_w``, MViTv2) added to the attention logits, a GELU MLP, and the
neck (1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d, no conv biases).

Module names mirror transformers (``patch_embed.projection``, ``pos_embed``,
``layers.N.{layer_norm1,attn.{qkv,proj,rel_pos_h,rel_pos_w},layer_norm2,mlp.{lin1,lin2}}``,
``neck.{conv1,layer_norm1,conv2,layer_norm2}``), so :mod:`adm_jax.convert.sam` is a list
of renames (``vision_encoder.`` prefix dropped) plus a layout rule. Everything is
channels-last: pixels ``[B, H, W, 3]``, tokens ``[B, h, w, D]``.

Feature indexing (``feature_layers``): ``0`` is the patch embedding plus position
embedding (the input of block 1), ``i`` in ``1..num_hidden_layers`` is the output of the
``i``-th block (1-based), i.e. transformers' ``hidden_states[i]`` with
``output_hidden_states=True``. ADM's "ViT-H layers 3, 6, 9, 12" are ``(3, 6, 9, 12)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax.models.layers import Conv2d, LayerNorm, Linear, attention, call_maybe_remat

Array = jax.Array

MODEL_TYPE = "sam_vision_model"
FULL_MODEL_TYPE = "sam"
# SamImageProcessor's normalisation (ImageNet statistics, on [0, 1] pixels).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# SamLayerNorm (the neck's LayerNorm2d) has its own epsilon, not config.layer_norm_eps.
NECK_LAYER_NORM_EPS = 1e-6

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


_FIELD_TYPES = {"int": (int,), "bool": (bool,), "str": (str,), "float": (int, float)}


def _square(key: str, value: Any) -> int:
  """An int, or a square ``[s, s]`` pair, as an int; ValueError otherwise."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"SAM vision config: {key}={value!r}: only square sizes are "
                       "supported")
    value = value[0]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"SAM vision config: unsupported {key}={value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
  """Hyper-parameters of a SAM image encoder (defaults: transformers' ``SamVisionConfig``,
  i.e. ViT-B; see :data:`PRESETS` for ViT-L / ViT-H).

  Attributes:
    hidden_size: Token width ``D``.
    output_channels: Channels of the neck output.
    num_hidden_layers: Number of ViT blocks.
    num_attention_heads: Attention heads; must divide ``hidden_size``.
    num_channels: Input image channels.
    image_size: Input side (square); inputs must have exactly this size.
    patch_size: Patch side; must divide ``image_size``.
    hidden_act: MLP activation.
    layer_norm_eps: Epsilon of the blocks' LayerNorms (the neck uses 1e-6).
    qkv_bias: Whether the fused ``qkv`` projection has a bias.
    mlp_ratio: Kept for the config round trip; ``mlp_dim`` defaults to it.
    mlp_dim: Hidden width of the MLPs (``hidden_size * mlp_ratio`` when ``None``).
    use_abs_pos: Learned absolute position embedding ``pos_embed``.
    use_rel_pos: Decomposed relative position embeddings in every attention.
    window_size: Side of the attention windows (0: every block is global).
    global_attn_indexes: 0-based indices of the blocks with global attention.
  """
  hidden_size: int = 768
  output_channels: int = 256
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 1024
  patch_size: int = 16
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  mlp_ratio: float = 4.0
  mlp_dim: int | None = None
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)

  def __post_init__(self):
    if self.mlp_dim is None:
      object.__setattr__(self, "mlp_dim", int(self.hidden_size * self.mlp_ratio))
    object.__setattr__(self, "global_attn_indexes",
                       tuple(int(i) for i in self.global_attn_indexes))
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"SAM vision config: unsupported hidden_act={self.hidden_act!r} "
                       f"(supported: {sorted(ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"SAM vision config: hidden_size={self.hidden_size} is not "
                       f"divisible by num_attention_heads={self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"SAM vision config: image_size={self.image_size} is not a multiple "
                       f"of patch_size={self.patch_size}")
    if self.window_size < 0:
      raise ValueError(f"SAM vision config: window_size={self.window_size} < 0")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"SAM vision config: global_attn_indexes {bad} outside "
                       f"[0, {self.num_hidden_layers})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid_size(self) -> int:
    """Side ``h = w`` of the token map."""
    return self.image_size // self.patch_size

  def block_window_size(self, i: int) -> int:
    """Window side of block ``i`` (0-based); 0 means global attention."""
    return 0 if i in self.global_attn_indexes else self.window_size

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any]) -> "SamVisionConfig":
    """Reads a transformers config dict: a full ``SamConfig`` (its ``vision_config`` is
    used) or a ``SamVisionConfig``.

    Raises:
      ValueError: naming the key, for a config this port cannot represent.
    """
    model_type = cfg.get("model_type", MODEL_TYPE)
    if model_type == FULL_MODEL_TYPE:
      if "vision_config" not in cfg:
        raise ValueError("SAM config: model_type='sam' without a 'vision_config'")
      cfg = cfg["vision_config"] or {}
      model_type = cfg.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
      raise ValueError(f"SAM vision config: model_type={model_type!r}, want "
                       f"{MODEL_TYPE!r} or {FULL_MODEL_TYPE!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name not in cfg:
        continue
      v = cfg[f.name]
      if f.name in ("image_size", "patch_size"):
        v = _square(f.name, v)
      elif f.name == "global_attn_indexes":
        if not isinstance(v, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in v):
          raise ValueError(f"SAM vision config: unsupported global_attn_indexes={v!r}")
        v = tuple(v)
      elif f.name == "mlp_dim":
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
          raise ValueError(f"SAM vision config: unsupported mlp_dim={v!r}")
      elif f.type in ("int", "bool", "str", "float"):
        types = _FIELD_TYPES[f.type]
        if not isinstance(v, types) or (isinstance(v, bool) and f.type != "bool"):
          raise ValueError(f"SAM vision config: unsupported {f.name}={v!r}")
      kwargs[f.name] = v
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The transformers ``SamVisionConfig`` dict (``SamVisionModel``'s ``config.json``)."""
    out = dataclasses.asdict(self)
    out["global_attn_indexes"] = list(self.global_attn_indexes)
    out.update(architectures=["SamVisionModel"], model_type=MODEL_TYPE,
               attention_dropout=0.0, initializer_range=1e-10, num_pos_feats=128,
               dtype="float32")
    return out


PRESETS: dict[str, SamVisionConfig] = {
    # facebook/sam-vit-{base,large,huge} vision configs.
    "vit_b": SamVisionConfig(),
    "vit_l": SamVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                             global_attn_indexes=(7, 15, 23, 31)),
}


# ------------------------------------------------------------------------------------
# Relative position embeddings.
# ------------------------------------------------------------------------------------

def _linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out, in]`` weights of torch's ``F.interpolate(mode="linear")`` (no corner
  alignment)."""
  scale = np.float32(in_size / out_size)
  m = np.zeros((out_size, in_size), np.float32)
  for j in range(out_size):
    src = max(float(scale * np.float32(j + 0.5) - np.float32(0.5)), 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    l1 = np.float32(src - i0)
    m[j, i0] += np.float32(1.0) - l1
    m[j, i1] += l1
  return m


def rel_pos_indices(q_size: int, k_size: int) -> np.ndarray:
  """``[q, k]`` rows of the resized table that transformers' ``get_rel_pos`` gathers
  (float32 coordinates, truncated as ``.long()`` does)."""
  q_scale = np.float32(max(k_size / q_size, 1.0))
  k_scale = np.float32(max(q_size / k_size, 1.0))
  q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_scale
  k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_scale
  rel = (q_coords - k_coords) + np.float32((k_size - 1) * max(q_size / k_size, 1.0))
  return rel.astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: Array) -> Array:
  """transformers ``SamVisionAttention.get_rel_pos``: ``[L, c]`` -> ``[q, k, c]``.

  The table is linearly resized to ``2 * max(q, k) - 1`` rows when it has another length
  (never for inputs at the configured ``image_size``: then it is an exact gather).
  """
  max_rel_dist = int(2 * max(q_size, k_size) - 1)
  if rel_pos.shape[0] != max_rel_dist:
    m = jnp.asarray(_linear_resize_matrix(rel_pos.shape[0], max_rel_dist))
    rel_pos = jnp.matmul(m, rel_pos.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST).astype(rel_pos.dtype)
  return rel_pos[jnp.asarray(rel_pos_indices(q_size, k_size))]


def decomposed_rel_pos(q: Array, rel_pos_h: Array, rel_pos_w: Array) -> Array:
  """MViTv2 decomposed relative-position logits for self-attention on an ``h x w`` map.

  Args:
    q: Unscaled queries ``[B, h, w, H, c]``.
    rel_pos_h: Height table ``[Lh, c]``.
    rel_pos_w: Width table ``[Lw, c]``.

  Returns:
    Additive attention bias ``[B, H, h*w, h*w]`` float32.
  """
  b, h, w, n, c = q.shape
  r_h = get_rel_pos(h, h, rel_pos_h).astype(jnp.float32)      # [h, kh, c]
  r_w = get_rel_pos(w, w, rel_pos_w).astype(jnp.float32)      # [w, kw, c]
  q32 = q.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  rel_h = jnp.einsum("bhwnc,hkc->bnhwk", q32, r_h, precision=hp)   # [B, H, h, w, kh]
  rel_w = jnp.einsum("bhwnc,wkc->bnhwk", q32, r_w, precision=hp)   # [B, H, h, w, kw]
  bias = rel_h[..., :, None] + rel_w[..., None, :]                 # [B, H, h, w, kh, kw]
  return bias.reshape(b, n, h * w, h * w)


# ------------------------------------------------------------------------------------
# Windows.
# ------------------------------------------------------------------------------------

def window_partition(x: Array, window_size: int) -> tuple[Array, tuple[int, int]]:
  """``[B, h, w, C]`` -> windows ``[B * nh * nw, ws, ws, C]`` and the padded ``(h, w)``.

  The map is zero-padded at the bottom / right to a multiple of ``window_size`` (the
  padded tokens then take part in attention as keys, as in transformers).
  """
  b, h, w, c = x.shape
  pad_h = (window_size - h % window_size) % window_size
  pad_w = (window_size - w % window_size) % window_size
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                 # [B, nh, nw, ws, ws, C]
  return x.reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: Array, window_size: int, padded: tuple[int, int],
                       original: tuple[int, int]) -> Array:
  """Inverse of :func:`window_partition`: windows -> ``[B, h, w, C]`` (padding cropped)."""
  hp, wp = padded
  h, w = original
  nh, nw = hp // window_size, wp // window_size
  b = windows.shape[0] // (nh * nw)
  x = windows.reshape(b, nh, nw, window_size, window_size, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)  # [B, hp, wp, C]
  return x[:, :h, :w]


# ------------------------------------------------------------------------------------
# Modules.
# ------------------------------------------------------------------------------------

class SamPatchEmbeddings(nnx.Module):
  """Non-overlapping ``patch_size`` conv: ``[B, H, W, 3]`` -> ``[B, h, w, D]``."""

  def __init__(self, config: SamVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.projection = Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                             stride=config.patch_size, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, pixels: Array) -> Array:
    return self.projection(pixels)


class SamVisionAttention(nnx.Module):
  """Multi-head self-attention on a token map, with decomposed relative positions.

  Args:
    config: Model hyper-parameters.
    window_size: The window side this block attends within (0: the whole map), which
      sets the length ``2 * size - 1`` of the relative-position tables.
  """

  def __init__(self, config: SamVisionConfig, window_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.use_rel_pos = config.use_rel_pos
    self.qkv = Linear(d, 3 * d, use_bias=config.qkv_bias, **kw)
    self.proj = Linear(d, d, **kw)
    if config.use_rel_pos:
      size = window_size or config.grid_size
      self.rel_pos_h = nnx.Param(jnp.zeros((2 * size - 1, config.head_dim), param_dtype))
      self.rel_pos_w = nnx.Param(jnp.zeros((2 * size - 1, config.head_dim), param_dtype))

  def __call__(self, x: Array) -> Array:
    b, h, w, d = x.shape                              # [B, h, w, D]
    n = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, n, d // n)  # [B, L, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
    bias = None
    if self.use_rel_pos:
      bias = decomposed_rel_pos(q.reshape(b, h, w, n, d // n), self.rel_pos_h[...],
                                self.rel_pos_w[...])  # [B, H, L, L]
    out = attention(q, k, v, bias=bias)               # [B, L, H, Dh]
    return self.proj(out.reshape(b, h, w, d))         # [B, h, w, D]


class SamMLPBlock(nnx.Module):
  """``lin1`` -> activation -> ``lin2``."""

  def __init__(self, config: SamVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_act = config.hidden_act
    self.lin1 = Linear(config.hidden_size, config.mlp_dim, **kw)
    self.lin2 = Linear(config.mlp_dim, config.hidden_size, **kw)

  def __call__(self, x: Array) -> Array:
    return self.lin2(ACTIVATIONS[self.hidden_act](self.lin1(x)))


class SamVisionLayer(nnx.Module):
  """Pre-norm ViT block; attention within windows unless ``window_size == 0``."""

  def __init__(self, config: SamVisionConfig, window_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.window_size = window_size
    self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
    self.attn = SamVisionAttention(config, window_size, **kw)
    self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
    self.mlp = SamMLPBlock(config, **kw)

  remat = "none"            # a policy of layers.REMAT_POLICIES (config.remat.pixel)

  def __call__(self, x: Array) -> Array:             # [B, h, w, D]
    return call_maybe_remat(self, type(self)._forward, x)

  def _forward(self, x: Array) -> Array:
    h = self.layer_norm1(x)
    if self.window_size > 0:
      size = h.shape[1:3]
      h, padded = window_partition(h, self.window_size)   # [B*nw, ws, ws, D]
      h = self.attn(h)
      h = window_unpartition(h, self.window_size, padded, size)  # [B, h, w, D]
    else:
      h = self.attn(h)
    x = x + h
    return x + self.mlp(self.layer_norm2(x))


class SamVisionNeck(nnx.Module):
  """1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d (no conv biases)."""

  def __init__(self, config: SamVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    c = config.output_channels
    self.conv1 = Conv2d(config.hidden_size, c, 1, use_bias=False, rngs=rngs, **kw)
    self.layer_norm1 = LayerNorm(c, eps=NECK_LAYER_NORM_EPS, **kw)
    self.conv2 = Conv2d(c, c, 3, padding=1, use_bias=False, rngs=rngs, **kw)
    self.layer_norm2 = LayerNorm(c, eps=NECK_LAYER_NORM_EPS, **kw)

  def __call__(self, x: Array) -> Array:             # [B, h, w, D]
    x = self.layer_norm1(self.conv1(x))              # [B, h, w, C_out]
    return self.layer_norm2(self.conv2(x))           # [B, h, w, C_out]


class SamVisionEncoder(nnx.Module):
  """SAM's ViT image encoder.

  Args:
    config: Model hyper-parameters.
    dtype: Compute dtype (float32 or bfloat16); LayerNorm statistics, softmax and the
      relative-position logits are float32 regardless.
    param_dtype: Storage dtype of the parameters.
    rngs: Initialisation randomness (a converted checkpoint replaces every parameter).
  """

  def __init__(self, config: SamVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    self.patch_embed = SamPatchEmbeddings(config, **kw)
    if config.use_abs_pos:
      g = config.grid_size
      self.pos_embed = nnx.Param(jnp.zeros((1, g, g, config.hidden_size), param_dtype))
    self.layers = nnx.List([
        SamVisionLayer(config, config.block_window_size(i), **kw)
        for i in range(config.num_hidden_layers)])
    self.neck = SamVisionNeck(config, **kw)

  def _check_layers(self, feature_layers: Iterable[int]) -> tuple[int, ...]:
    n = self.config.num_hidden_layers
    out = tuple(sorted(set(int(i) for i in feature_layers)))
    bad = [i for i in out if not 0 <= i <= n]
    if bad:
      raise ValueError(f"feature_layers {bad} outside [0, {n}] (0: embeddings, i: output "
                       f"of block i, 1-based)")
    return out

  def __call__(self, pixels: Array, *, feature_layers: Sequence[int] = (),
               neck: bool = True) -> dict[str, Any]:
    """Encodes normalised pixels (see :func:`preprocess`).

    Args:
      pixels: ``[B, image_size, image_size, num_channels]``.
      feature_layers: Which token maps to return: ``0`` the embeddings, ``i`` the output
        of block ``i`` (1-based; transformers ``hidden_states[i]``).
      neck: Run the remaining blocks and the neck. With ``False`` the forward stops after
        the deepest requested feature layer (ADM's ViT-H features 3..12 then skip 20 of
        the 32 blocks) and ``last`` is ``None``.

    Returns:
      ``{"last": [B, h, w, output_channels] | None, "layers": {i: [B, h, w, D]}}`` with
      ``h = w = image_size / patch_size``.
    """
    cfg = self.config
    if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size,
                                                cfg.num_channels):
      raise ValueError(f"SAM encoder expects [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}] pixels, got {tuple(pixels.shape)}")
    wanted = self._check_layers(feature_layers)
    depth = cfg.num_hidden_layers if neck else (max(wanted) if wanted else 0)
    x = self.patch_embed(pixels.astype(self.dtype))  # [B, h, w, D]
    if cfg.use_abs_pos:
      x = x + self.pos_embed[...].astype(x.dtype)
    layers = {}
    if 0 in wanted:
      layers[0] = x
    for i in range(depth):
      x = self.layers[i](x)                          # [B, h, w, D]
      if i + 1 in wanted:
        layers[i + 1] = x
    last = self.neck(x) if neck else None            # [B, h, w, C_out]
    return {"last": last, "layers": layers}


def preprocess(images: Array, image_size: int, *, pad: bool = False,
               mean: Sequence[float] = PIXEL_MEAN,
               std: Sequence[float] = PIXEL_STD) -> Array:
  """Maps generator images in ``[-1, 1]`` to SAM encoder inputs (differentiable).

  ``[-1, 1]`` -> ``[0, 1]``, resize, normalise with the ImageNet mean / std as
  ``SamImageProcessor`` does. The resize is bilinear (``jax.image.resize``, antialiased
  when shrinking, like PIL's bilinear) on float pixels, with no uint8 rounding.

  * ``pad=False`` (default): the image is resized to ``image_size x image_size``; a
    non-square image is stretched. Generator outputs are square, so this uses every
    token for image content.
  * ``pad=True``: ``SamImageProcessor``'s geometry: the longest side is resized to
    ``image_size`` (aspect kept, sides rounded as its ``get_preprocess_shape``), the image
    normalised, then zero-padded at the bottom / right to ``image_size`` square.

  Args:
    images: ``[B, H, W, 3]`` in ``[-1, 1]``.
    image_size: The encoder's ``config.image_size``.
    pad: Keep the aspect ratio and pad, as above.
    mean: Per-channel mean of ``[0, 1]`` pixels.
    std: Per-channel standard deviation.

  Returns:
    ``[B, image_size, image_size, 3]`` float32.
  """
  b, h, w, c = images.shape
  x = (images.astype(jnp.float32) + 1.0) * 0.5       # [B, H, W, 3] in [0, 1]
  if pad:
    scale = image_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
  else:
    nh, nw = image_size, image_size
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), method="bilinear", antialias=True)
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  if pad:
    x = jnp.pad(x, ((0, 0), (0, image_size - nh), (0, image_size - nw), (0, 0)))
  return x
