"""CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

A port of transformers 5's CLIP text transformer for SDXL-type conditioning: token plus
learned position embeddings, pre-norm causal self-attention blocks, a final LayerNorm,
EOS pooling and, with ``with_projection``, a bias-free ``text_projection``.

Module names mirror transformers (``embeddings.token_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``final_layer_norm``, ``text_projection`` ...), so
:mod:`adm_jax.convert.clip` is a list of renames plus a layout rule. There is no
``text_model`` level: the projection head sits next to the transformer, as in
transformers 5's flattened ``CLIPTextModel``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax.models.layers import LayerNorm, Linear, attention

Array = jax.Array

ARCH_PLAIN = "CLIPTextModel"
ARCH_PROJECTION = "CLIPTextModelWithProjection"
MODEL_TYPE = "clip_text_model"
# transformers configs with ``eos_token_id == 2`` predate transformers PR #24773; for
# them the pooled token is the one with the highest id (argmax of the ids).
LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's ``x * sigmoid(1.702 x)`` (transformers ``quick_gelu``)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as ``torch.nn.functional.gelu`` (transformers ``gelu``)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked(key: str, value: Any, types: tuple[type, ...]) -> Any:
  """``value`` if it is one of ``types`` (never a bool for a number), else ValueError."""
  if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
    raise ValueError(f"CLIP text config: unsupported {key}={value!r} "
                     f"(want {' or '.join(t.__name__ for t in types)})")
  return value


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of a CLIP text encoder (defaults: CLIP ViT-L/14, SDXL ``text_encoder``).

  Attributes:
    vocab_size: Number of token embeddings.
    hidden_size: Width ``D`` of the residual stream.
    intermediate_size: Hidden width of the MLPs.
    num_hidden_layers: Number of encoder layers.
    num_attention_heads: Attention heads; must divide ``hidden_size``.
    max_position_embeddings: Number of learned positions (the longest sequence).
    hidden_act: MLP activation, ``"quick_gelu"`` or ``"gelu"``.
    layer_norm_eps: Epsilon of every LayerNorm.
    projection_dim: Output width of ``text_projection`` (used with ``with_projection``).
    bos_token_id: Start-of-text id (kept for the config round trip).
    eos_token_id: End-of-text id used for pooling; ``2`` selects the legacy argmax rule.
    pad_token_id: Padding id (kept for the config round trip).
    with_projection: Whether the model has ``text_projection``
      (transformers ``CLIPTextModelWithProjection``).
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  with_projection: bool = False

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP text config: unsupported hidden_act={self.hidden_act!r} "
                       f"(supported: {sorted(ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP text config: hidden_size={self.hidden_size} is not divisible "
                       f"by num_attention_heads={self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any], *,
              with_projection: bool | None = None) -> "CLIPTextConfig":
    """Reads a transformers ``config.json`` dict.

    Args:
      cfg: The parsed ``config.json`` of a ``CLIPTextModel`` or
        ``CLIPTextModelWithProjection``.
      with_projection: Overrides what ``architectures`` says about the projection head.

    Raises:
      ValueError: naming the key, for a config this port cannot represent.
    """
    model_type = cfg.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
      raise ValueError(f"CLIP text config: model_type={model_type!r}, want {MODEL_TYPE!r} "
                       "(for a full CLIPModel pass its 'text_config')")
    if with_projection is None:
      archs = cfg.get("architectures")
      if not archs or len(archs) != 1 or archs[0] not in (ARCH_PLAIN, ARCH_PROJECTION):
        raise ValueError(f"CLIP text config: architectures={archs!r}, want "
                         f"[{ARCH_PLAIN!r}] or [{ARCH_PROJECTION!r}]")
      with_projection = archs[0] == ARCH_PROJECTION
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name != "with_projection" and f.name in cfg:
        kwargs[f.name] = _checked(f.name, cfg[f.name], _FIELD_TYPES[f.type])
    return cls(with_projection=bool(with_projection), **kwargs)

  def to_hf(self) -> dict:
    """The transformers ``config.json`` dict of this configuration."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "with_projection"}
    out.update(architectures=[ARCH_PROJECTION if self.with_projection else ARCH_PLAIN],
               model_type=MODEL_TYPE, attention_dropout=0.0, initializer_factor=1.0,
               initializer_range=0.02, dtype="float32")
    return out


class CLIPTextEmbeddings(nnx.Module):
  """Token plus learned absolute position embeddings."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                        **kw)

  def __call__(self, input_ids: Array) -> Array:
    length = input_ids.shape[-1]
    if length > self.position_embedding.num_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                       f"{self.position_embedding.num_embeddings}")
    positions = jnp.arange(length, dtype=jnp.int32)
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with ``q/k/v/out_proj`` (all with bias)."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.q_proj = Linear(d, d, **kw)
    self.k_proj = Linear(d, d, **kw)
    self.v_proj = Linear(d, d, **kw)
    self.out_proj = Linear(d, d, **kw)

  def __call__(self, x: Array, bias: Array | None) -> Array:
    b, l, d = x.shape                                 # [B, L, D]
    split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)  # [B, L, H, Dh]
    out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                    bias=bias)                        # [B, L, H, Dh]
    return self.out_proj(out.reshape(b, l, d))


class CLIPMLP(nnx.Module):
  """``fc1`` -> activation -> ``fc2``."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_act = config.hidden_act
    self.fc1 = Linear(config.hidden_size, config.intermediate_size, **kw)
    self.fc2 = Linear(config.intermediate_size, config.hidden_size, **kw)

  def __call__(self, x: Array) -> Array:
    return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, eps = config.hidden_size, config.layer_norm_eps
    self.self_attn = CLIPAttention(config, **kw)
    self.layer_norm1 = LayerNorm(d, eps=eps, **kw)
    self.mlp = CLIPMLP(config, **kw)
    self.layer_norm2 = LayerNorm(d, eps=eps, **kw)

  def __call__(self, x: Array, bias: Array | None) -> Array:
    x = x + self.self_attn(self.layer_norm1(x), bias)  # [B, L, D]
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  """The stack of encoder layers."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.layers = nnx.List([
        CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)])

  def __call__(self, x: Array, bias: Array | None) -> list[Array]:
    """Returns every hidden state: the embeddings, then each layer's output."""
    hidden_states = [x]
    for layer in self.layers:
      x = layer(x, bias)
      hidden_states.append(x)
    return hidden_states


def causal_bias(length: int) -> Array:
  """Additive causal mask ``[1, 1, L, L]``: 0 on and below the diagonal, float32 min above."""
  allowed = jnp.tril(jnp.ones((length, length), dtype=bool))
  return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[None, None]


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
  """Index of the pooled token per sequence, by transformers' rule. ``[B, L]`` -> ``[B]``.

  With the legacy ``eos_token_id == 2`` the highest token id wins (CLIP's EOS is the last
  vocabulary entry); otherwise the first occurrence of ``eos_token_id`` (position 0 when
  there is none, as ``argmax`` of all-zeros gives).
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nnx.Module):
  """CLIP text transformer, optionally with the ``text_projection`` head.

  Args:
    config: Model hyper-parameters.
    dtype: Compute dtype (float32 or bfloat16); LayerNorm statistics and softmax are
      float32 regardless.
    param_dtype: Storage dtype of the parameters.
    rngs: Initialisation randomness.
  """

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, **kw)
    self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
    if config.with_projection:
      self.text_projection = Linear(config.hidden_size, config.projection_dim,
                                    use_bias=False, **kw)

  def __call__(self, input_ids: Array, *,
               output_hidden_states: bool = False) -> dict[str, Array | tuple[Array, ...]]:
    """Encodes token ids.

    Args:
      input_ids: ``[B, L]`` integer token ids, ``L <= max_position_embeddings``.
      output_hidden_states: Also return ``hidden_states``, the embeddings output and every
        layer's output (``num_hidden_layers + 1`` arrays ``[B, L, D]``, none final-normed),
        as transformers' ``output_hidden_states=True``.

    Returns:
      A dict with ``last_hidden_state`` ``[B, L, D]`` (after ``final_layer_norm``),
      ``penultimate`` ``[B, L, D]`` (transformers ``hidden_states[-2]``, not final-normed:
      what SDXL conditions on), ``pooled`` ``[B, D]`` (the final-normed state at the EOS
      position, transformers ``pooler_output``) and, with a projection, ``text_embeds``
      ``[B, projection_dim]``.
    """
    x = self.embeddings(input_ids)                    # [B, L, D]
    hidden_states = self.encoder(x, causal_bias(input_ids.shape[-1]))
    last = self.final_layer_norm(hidden_states[-1])   # [B, L, D]
    idx = eos_positions(input_ids, self.config.eos_token_id)  # [B]
    pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]  # [B, D]
    out = dict(last_hidden_state=last, penultimate=hidden_states[-2], pooled=pooled)
    if self.config.with_projection:
      out["text_embeds"] = self.text_projection(pooled)  # [B, P]
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden_states)
    return out
