"""``UNet2DConditionModel`` (SDXL family) in Flax NNX, channels-last.

A port of diffusers' ``UNet2DConditionModel`` restricted to what the SDXL family uses:
``DownBlock2D`` / ``CrossAttnDownBlock2D`` / ``UNetMidBlock2DCrossAttn`` / ``UpBlock2D`` /
``CrossAttnUpBlock2D`` blocks, transformer depth per block (or per layer), linear or 1x1
conv projections, per-block head counts, configurable GroupNorm groups, and the
``text_time`` additional embedding (pooled text + ``add_time_ids``). Any other diffusers
option is refused by :meth:`UNetConfig.from_diffusers` with the key named.

The forward can also return the intermediate features (every down block, the mid block,
every up block) that discriminator heads read, from the same pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax.models import layers as L

Array = jax.Array

_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a ``UNet2DConditionModel`` (diffusers ``config.json`` fields)."""

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 128
  down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D")
  up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "UpBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  block_out_channels: tuple[int, ...] = (320, 640, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2)
  # Transformer depth for every resnet layer of every block (normalised from diffusers'
  # int / per-block / per-layer forms).
  down_transformer_layers: tuple[tuple[int, ...], ...] = ((1, 1), (2, 2), (10, 10))
  up_transformer_layers: tuple[tuple[int, ...], ...] = ((10, 10, 10), (2, 2, 2), (1, 1, 1))
  mid_transformer_layers: int = 10
  num_attention_heads: tuple[int, ...] = (5, 10, 20)
  cross_attention_dim: int = 2048
  use_linear_projection: bool = True
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  addition_embed_type: str | None = "text_time"
  addition_time_embed_dim: int | None = 256
  projection_class_embeddings_input_dim: int | None = 2816
  # Unknown-to-us diffusers fields are carried through export untouched.
  extra: tuple[tuple[str, Any], ...] = ()

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
    """Validates a diffusers ``UNet2DConditionModel`` config dict."""
    required_defaults = {
        "center_input_sample": False, "class_embed_type": None, "dual_cross_attention": False,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "upcast_attention": False,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
        "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
        "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "attention_type": "default", "class_embeddings_concat": False,
        "cross_attention_norm": None, "act_fn": "silu", "only_cross_attention": False,
        "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "num_class_embeds": None,
        "mid_block_only_cross_attention": None,
    }
    for key, want in required_defaults.items():
      if cfg.get(key, want) != want:
        raise ValueError(f"UNet config: unsupported {key}={cfg[key]!r} (supported: {want!r})")
    downs = tuple(cfg.get("down_block_types", cls.down_block_types))
    ups = tuple(cfg.get("up_block_types", cls.up_block_types))
    for name, types, ok in (("down_block_types", downs, _DOWN), ("up_block_types", ups, _UP)):
      for t in types:
        if t not in ok:
          raise ValueError(f"UNet config: unsupported {name} entry {t!r} (supported: {ok})")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None and mid not in _MID:
      raise ValueError(f"UNet config: unsupported mid_block_type {mid!r} (supported: {_MID})")
    aet = cfg.get("addition_embed_type")
    if aet not in (None, "text_time"):
      raise ValueError(f"UNet config: unsupported addition_embed_type {aet!r} "
                       f"(supported: None, 'text_time')")
    n = len(downs)
    if len(ups) != n:
      raise ValueError("UNet config: down_block_types and up_block_types differ in length")
    channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
    if len(channels) != n:
      raise ValueError("UNet config: block_out_channels must have one entry per block")
    layers = tuple(int(x) for x in _per_block(cfg.get("layers_per_block", 2), n,
                                              "layers_per_block"))
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = tuple(int(h) for h in _per_block(heads, n, "num_attention_heads"))
    cad = cfg.get("cross_attention_dim", 1280)
    if isinstance(cad, (list, tuple)):
      if len(set(cad)) != 1:
        raise ValueError("UNet config: per-block cross_attention_dim is not supported")
      cad = cad[0]
    tl = _per_block(cfg.get("transformer_layers_per_block", 1), n,
                    "transformer_layers_per_block")
    down_tl = tuple(tuple(t) if isinstance(t, (list, tuple)) else (int(t),) * layers[i]
                    for i, t in enumerate(tl))
    rev = cfg.get("reverse_transformer_layers_per_block")
    if rev is None:
      if any(isinstance(t, (list, tuple)) for t in tl):
        raise ValueError("UNet config: nested transformer_layers_per_block needs "
                         "reverse_transformer_layers_per_block")
      up_tl = tuple((int(t),) * (layers[n - 1 - i] + 1) for i, t in enumerate(reversed(tl)))
    else:
      up_tl = tuple(tuple(t) if isinstance(t, (list, tuple)) else (int(t),)
                    * (layers[n - 1 - i] + 1) for i, t in enumerate(rev))
    mid_tl = tl[-1] if isinstance(tl[-1], int) else tl[-1][0]
    known = {f.name for f in dataclasses.fields(cls)} | set(required_defaults) | {
        "attention_head_dim", "transformer_layers_per_block",
        "reverse_transformer_layers_per_block", "dropout", "_class_name", "_diffusers_version",
        "_name_or_path", "addition_embed_type_num_heads"}
    extra = tuple(sorted((k, v) for k, v in cfg.items() if k not in known
                         and not isinstance(v, (dict, list))))
    return cls(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        sample_size=int(cfg.get("sample_size") or 128), down_block_types=downs,
        up_block_types=ups, mid_block_type=mid, block_out_channels=channels,
        layers_per_block=layers, down_transformer_layers=down_tl,
        up_transformer_layers=up_tl, mid_transformer_layers=int(mid_tl),
        num_attention_heads=heads, cross_attention_dim=int(cad),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        downsample_padding=int(cfg.get("downsample_padding", 1)),
        addition_embed_type=aet,
        addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
        extra=extra)

  def to_diffusers(self) -> dict[str, Any]:
    """A ``config.json`` dict that ``diffusers.UNet2DConditionModel`` accepts."""
    cfg = dict(self.extra)
    cfg.update(
        _class_name="UNet2DConditionModel", in_channels=self.in_channels,
        out_channels=self.out_channels, sample_size=self.sample_size,
        down_block_types=list(self.down_block_types), up_block_types=list(self.up_block_types),
        mid_block_type=self.mid_block_type, block_out_channels=list(self.block_out_channels),
        layers_per_block=list(self.layers_per_block),
        transformer_layers_per_block=[list(t) for t in self.down_transformer_layers],
        reverse_transformer_layers_per_block=[list(t) for t in self.up_transformer_layers],
        attention_head_dim=list(self.num_attention_heads),
        cross_attention_dim=self.cross_attention_dim,
        use_linear_projection=self.use_linear_projection,
        norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
        flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
        downsample_padding=self.downsample_padding,
        addition_embed_type=self.addition_embed_type,
        addition_time_embed_dim=self.addition_time_embed_dim,
        projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim)
    return cfg


class _Ctx:
  """Shared constructor arguments (dtypes, rngs) for the blocks of one model."""

  def __init__(self, cfg: UNetConfig, dtype, param_dtype, rngs):
    self.cfg, self.rngs = cfg, rngs
    self.kw = dict(dtype=dtype, param_dtype=param_dtype)

  def norm(self, c, eps=None):
    return L.GroupNorm(self.cfg.norm_num_groups, c, eps=eps or self.cfg.norm_eps, **self.kw)

  def conv(self, cin, cout, k, stride=1, padding=None):
    return L.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding,
                    rngs=self.rngs, **self.kw)

  def linear(self, cin, cout, bias=True):
    return L.Linear(cin, cout, use_bias=bias, rngs=self.rngs, **self.kw)


class ResnetBlock2D(nnx.Module):
  """diffusers ``ResnetBlock2D`` (time_scale_shift "default")."""

  def __init__(self, ctx: _Ctx, cin: int, cout: int):
    self.norm1 = ctx.norm(cin)
    self.conv1 = ctx.conv(cin, cout, 3)
    self.time_emb_proj = ctx.linear(ctx.cfg.time_embed_dim, cout)
    self.norm2 = ctx.norm(cout)
    self.conv2 = ctx.conv(cout, cout, 3)
    self.conv_shortcut = ctx.conv(cin, cout, 1) if cin != cout else None

  remat = "none"            # a policy of layers.REMAT_POLICIES (set per network)

  def __call__(self, x: Array, temb: Array) -> Array:    # x [B, H, W, Cin], temb [B, E]
    return L.call_maybe_remat(self, type(self)._forward, x, temb)

  def _forward(self, x: Array, temb: Array) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h                                           # [B, H, W, Cout]


class Attention(nnx.Module):
  """diffusers ``Attention`` without biases on q/k/v (``attention_bias=False``)."""

  def __init__(self, ctx: _Ctx, dim: int, heads: int, context_dim: int | None = None):
    self.heads = heads
    kv_dim = context_dim or dim
    self.to_q = ctx.linear(dim, dim, bias=False)
    self.to_k = ctx.linear(kv_dim, dim, bias=False)
    self.to_v = ctx.linear(kv_dim, dim, bias=False)
    self.to_out = nnx.List([ctx.linear(dim, dim)])

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    context = x if context is None else context            # x [B, L, D]; context [B, S, Dc]
    b, n, d = x.shape
    q = self.to_q(x).reshape(b, n, self.heads, d // self.heads)
    k = self.to_k(context).reshape(b, context.shape[1], self.heads, d // self.heads)
    v = self.to_v(context).reshape(b, context.shape[1], self.heads, d // self.heads)
    return self.to_out[0](L.attention(q, k, v).reshape(b, n, d))


class GEGLU(nnx.Module):

  def __init__(self, ctx: _Ctx, dim: int, inner: int):
    self.proj = ctx.linear(dim, inner * 2)

  def __call__(self, x: Array) -> Array:
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """diffusers ``FeedForward`` with GEGLU; ``net.0`` is the GEGLU, ``net.2`` the output."""

  def __init__(self, ctx: _Ctx, dim: int):
    inner = 4 * dim
    self.net = nnx.List([GEGLU(ctx, dim, inner), None, ctx.linear(inner, dim)])

  def __call__(self, x: Array) -> Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):

  def __init__(self, ctx: _Ctx, dim: int, heads: int):
    kw = ctx.kw
    self.norm1 = L.LayerNorm(dim, **kw)
    self.attn1 = Attention(ctx, dim, heads)
    self.norm2 = L.LayerNorm(dim, **kw)
    self.attn2 = Attention(ctx, dim, heads, ctx.cfg.cross_attention_dim)
    self.norm3 = L.LayerNorm(dim, **kw)
    self.ff = FeedForward(ctx, dim)

  remat = "none"

  def __call__(self, x: Array, context: Array) -> Array:  # x [B, L, D]
    return L.call_maybe_remat(self, type(self)._forward, x, context)

  def _forward(self, x: Array, context: Array) -> Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


def _scan_blocks(blocks: list, y: Array, context: Array) -> Array:
  """``y`` through identical ``blocks`` as one ``lax.scan`` over their stacked
  parameters (one compiled body instead of ``len(blocks)``; the stack is a transient
  copy of those parameters, the stored layout is unchanged)."""
  graphdef, first = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first,
                         *[nnx.split(blk)[1] for blk in blocks[1:]])

  def body(y, state):
    return nnx.merge(graphdef, state)(y, context), None
  return jax.lax.scan(body, y, stacked)[0]


class Transformer2DModel(nnx.Module):
  """diffusers ``Transformer2DModel`` on continuous inputs. With ``scan`` set (a
  compile-time lever), a stack of transformer blocks runs as one ``lax.scan``."""

  scan = False

  def __init__(self, ctx: _Ctx, channels: int, heads: int, depth: int):
    self.linear = ctx.cfg.use_linear_projection
    self.norm = ctx.norm(channels, eps=1e-6)
    self.proj_in = (ctx.linear(channels, channels) if self.linear
                    else ctx.conv(channels, channels, 1))
    self.transformer_blocks = nnx.List(
        [BasicTransformerBlock(ctx, channels, heads) for _ in range(depth)])
    self.proj_out = (ctx.linear(channels, channels) if self.linear
                     else ctx.conv(channels, channels, 1))

  def __call__(self, x: Array, context: Array) -> Array:  # x [B, H, W, C]
    b, h, w, c = x.shape
    y = self.norm(x)
    y = self.proj_in(y.reshape(b, h * w, c) if self.linear else y).reshape(b, h * w, c)
    if self.scan and len(self.transformer_blocks) > 1:
      y = _scan_blocks(list(self.transformer_blocks), y, context)
    else:
      for block in self.transformer_blocks:
        y = block(y, context)                              # [B, HW, C]
    y = self.proj_out(y if self.linear else y.reshape(b, h, w, c))
    return x + y.reshape(b, h, w, c)


class Sampler(nnx.Module):
  """``Downsample2D`` (stride-2 conv) or ``Upsample2D`` (nearest 2x, conv)."""

  def __init__(self, ctx: _Ctx, channels: int, up: bool):
    self.up = up
    self.conv = (ctx.conv(channels, channels, 3) if up else
                 ctx.conv(channels, channels, 3, stride=2, padding=ctx.cfg.downsample_padding))

  def __call__(self, x: Array) -> Array:
    return self.conv(L.upsample_nearest_2x(x) if self.up else x)


class DownBlock(nnx.Module):

  def __init__(self, ctx: _Ctx, i: int, cin: int):
    cfg = ctx.cfg
    cout = cfg.block_out_channels[i]
    n = cfg.layers_per_block[i]
    self.resnets = nnx.List([ResnetBlock2D(ctx, cin if j == 0 else cout, cout)
                             for j in range(n)])
    self.attentions = (nnx.List([
        Transformer2DModel(ctx, cout, cfg.num_attention_heads[i],
                           cfg.down_transformer_layers[i][j]) for j in range(n)])
                       if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else None)
    last = i == len(cfg.block_out_channels) - 1
    self.downsamplers = None if last else nnx.List([Sampler(ctx, cout, up=False)])

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):

  def __init__(self, ctx: _Ctx, i: int):
    cfg = ctx.cfg
    rev = list(reversed(cfg.block_out_channels))
    heads = list(reversed(cfg.num_attention_heads))[i]
    cout, prev = rev[i], rev[max(i - 1, 0)]
    cin = rev[min(i + 1, len(rev) - 1)]
    n = list(reversed(cfg.layers_per_block))[i] + 1
    self.resnets = nnx.List([
        ResnetBlock2D(ctx, (prev if j == 0 else cout) + (cin if j == n - 1 else cout), cout)
        for j in range(n)])
    self.attentions = (nnx.List([
        Transformer2DModel(ctx, cout, heads, cfg.up_transformer_layers[i][j])
        for j in range(n)]) if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else None)
    self.upsamplers = None if i == len(rev) - 1 else nnx.List([Sampler(ctx, cout, up=True)])

  def __call__(self, x, skips, temb, context):
    for j, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class MidBlock(nnx.Module):
  """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

  def __init__(self, ctx: _Ctx):
    cfg = ctx.cfg
    c = cfg.block_out_channels[-1]
    self.resnets = nnx.List([ResnetBlock2D(ctx, c, c), ResnetBlock2D(ctx, c, c)])
    self.attentions = nnx.List([Transformer2DModel(ctx, c, cfg.num_attention_heads[-1],
                                                   cfg.mid_transformer_layers)])

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nnx.Module):
  """SDXL-family UNet.  Inputs and outputs are channels-last ``[B, H, W, C]``."""

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    ctx = _Ctx(config, dtype, param_dtype, rngs)
    c0, ted = config.block_out_channels[0], config.time_embed_dim
    self.conv_in = ctx.conv(config.in_channels, c0, 3)
    self.time_embedding = L.TimestepEmbedding(c0, ted, rngs=rngs, **ctx.kw)
    self.add_embedding = (
        L.TimestepEmbedding(config.projection_class_embeddings_input_dim, ted, rngs=rngs,
                            **ctx.kw) if config.addition_embed_type == "text_time" else None)
    blocks, cin = [], c0
    for i in range(len(config.block_out_channels)):
      blocks.append(DownBlock(ctx, i, cin))
      cin = config.block_out_channels[i]
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(ctx) if config.mid_block_type else None
    self.up_blocks = nnx.List([UpBlock(ctx, i) for i in range(len(config.block_out_channels))])
    self.conv_norm_out = ctx.norm(c0)
    self.conv_out = ctx.conv(c0, config.out_channels, 3)

  def set_scan(self, scan: bool = True) -> None:
    """Run each stack of transformer blocks as a ``lax.scan`` (faster compiles, the
    same numbers; SDXL's 10-deep stacks compile once instead of ten times)."""
    for _, m in self.iter_modules():
      if isinstance(m, Transformer2DModel):
        m.scan = bool(scan)

  def set_remat(self, policy: str) -> None:
    """Rematerialise every resnet and transformer block with ``policy`` (a name of
    :data:`adm_jax.models.layers.REMAT_POLICIES`; ``"none"`` keeps all activations)."""
    L.set_remat(self, policy)

  def embed_time(self, t: Array, cond: Mapping[str, Array]) -> Array:
    """Timestep (+ text_time) embedding ``[B, time_embed_dim]``.

    ``t`` may be fractional (ADM's Δt = T/64 steps); ``cond["pooled"]`` ``[B, P]`` and
    ``cond["time_ids"]`` ``[B, 6]`` feed the ``text_time`` embedding.
    """
    cfg = self.config
    temb = L.timestep_embedding(t, cfg.block_out_channels[0],
                                flip_sin_to_cos=cfg.flip_sin_to_cos,
                                downscale_freq_shift=cfg.freq_shift)
    emb = self.time_embedding(temb.astype(self.dtype))
    if self.add_embedding is not None:
      ids = cond["time_ids"]                                # [B, 6]
      tids = L.timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                                  flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift)
      add = jnp.concatenate([cond["pooled"].astype(jnp.float32),
                             tids.reshape(ids.shape[0], -1)], axis=-1)
      emb = emb + self.add_embedding(add.astype(self.dtype))
    return emb

  def __call__(self, x: Array, t: Array, cond: Mapping[str, Array], *,
               return_features: bool = False):
    """``x`` [B, H, W, Cin], ``t`` [B] (or scalar), ``cond["context"]`` [B, S, D].

    Returns the model output ``[B, H, W, Cout]`` (in float32), and with
    ``return_features`` also ``{"down_i", "mid", "up_i": [B, h, w, c]}``.
    """
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    temb = self.embed_time(t, cond)
    context = cond["context"].astype(self.dtype)
    h = self.conv_in(x.astype(self.dtype))
    skips, feats = [h], {}
    for i, block in enumerate(self.down_blocks):
      h, s = block(h, temb, context)
      skips += s
      feats[f"down_{i}"] = h
    if self.mid_block is not None:
      h = self.mid_block(h, temb, context)
    feats["mid"] = h
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      h = block(h, skips[-n:], temb, context)
      skips = skips[:-n]
      feats[f"up_{i}"] = h
    out = self.conv_out(jax.nn.silu(self.conv_norm_out(h))).astype(jnp.float32)
    return (out, feats) if return_features else out
