"""transformers SAM checkpoints -> :class:`adm_jax.models.sam.SamVisionEncoder`.

Tensor names, as transformers 5.23 ``save_pretrained`` writes them (``model.safetensors``;
transformers 4 checkpoints such as ``facebook/sam-vit-huge`` use the same names):

* ``SamModel``: the image encoder under ``vision_encoder.``:
  ``vision_encoder.patch_embed.projection.{weight,bias}``, ``vision_encoder.pos_embed``
  ``[1, h, w, D]`` (channels-last already),
  ``vision_encoder.layers.N.{layer_norm1,layer_norm2}.{weight,bias}``,
  ``vision_encoder.layers.N.attn.{qkv,proj}.{weight,bias}``,
  ``vision_encoder.layers.N.attn.rel_pos_{h,w}`` ``[2 * size - 1, head_dim]``,
  ``vision_encoder.layers.N.mlp.{lin1,lin2}.{weight,bias}``,
  ``vision_encoder.neck.{conv1,conv2}.weight`` (no biases),
  ``vision_encoder.neck.{layer_norm1,layer_norm2}.{weight,bias}``; plus the prompt
  encoder (``prompt_encoder.``), the mask decoder (``mask_decoder.``) and
  ``shared_image_embedding.positional_embedding``, which the pixel discriminator does
  not use: those three prefixes (:data:`IGNORED_PREFIXES`) are dropped by name.
* ``SamVisionModel`` (transformers 5): the same ``vision_encoder.*`` tensors and nothing
  else. A bare ``SamVisionEncoder`` saves them without the prefix; :func:`load` accepts
  that too.

Any other tensor (or a ``prompt_encoder.`` tensor in a vision-only checkpoint) fails the
conversion, as does a missing one.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from adm_jax.convert import common
from adm_jax.convert.common import (KeyTable, apply_table, read_json, read_tensors)
from adm_jax.models.sam import FULL_MODEL_TYPE, SamVisionConfig, SamVisionEncoder

PREFIX = "vision_encoder."
# Parts of a full SamModel the image encoder does not use.
IGNORED_PREFIXES = ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def key_table(config: SamVisionConfig, *, prefix: str = PREFIX) -> KeyTable:
  """Every image-encoder tensor of a transformers SAM checkpoint -> our path and layout.

  Args:
    config: The encoder configuration (depth, rel-pos / abs-pos switches, qkv bias).
    prefix: Prefix of the encoder's tensors (``"vision_encoder."`` or ``""``).
  """
  p = prefix
  table: KeyTable = {}
  common.conv(table, f"{p}patch_embed.projection", "patch_embed.projection")
  if config.use_abs_pos:
    table[f"{p}pos_embed"] = ("pos_embed", "copy")
  for i in range(config.num_hidden_layers):
    layer = f"layers.{i}"
    common.norm(table, f"{p}{layer}.layer_norm1", f"{layer}.layer_norm1")
    common.norm(table, f"{p}{layer}.layer_norm2", f"{layer}.layer_norm2")
    common.linear(table, f"{p}{layer}.attn.qkv", f"{layer}.attn.qkv", bias=config.qkv_bias)
    common.linear(table, f"{p}{layer}.attn.proj", f"{layer}.attn.proj")
    if config.use_rel_pos:
      for axis in ("h", "w"):
        table[f"{p}{layer}.attn.rel_pos_{axis}"] = (f"{layer}.attn.rel_pos_{axis}", "copy")
    common.linear(table, f"{p}{layer}.mlp.lin1", f"{layer}.mlp.lin1")
    common.linear(table, f"{p}{layer}.mlp.lin2", f"{layer}.mlp.lin2")
  for conv in ("conv1", "conv2"):
    table[f"{p}neck.{conv}.weight"] = (f"neck.{conv}.kernel", "conv2d")
  common.norm(table, f"{p}neck.layer_norm1", "neck.layer_norm1")
  common.norm(table, f"{p}neck.layer_norm2", "neck.layer_norm2")
  return table


def checkpoint_prefix(tensors) -> str:
  """``vision_encoder.`` (``SamModel`` / ``SamVisionModel``) or ``""`` (a bare encoder)."""
  return PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""


def drop_ignored(tensors: dict) -> dict:
  """``tensors`` without the prompt-encoder / mask-decoder / shared-embedding tensors."""
  return {k: v for k, v in tensors.items() if not k.startswith(IGNORED_PREFIXES)}


def abstract_model(config: SamVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """``(graphdef, abstract state)`` of the encoder, built without allocating parameters."""
  model = nnx.eval_shape(lambda: SamVisionEncoder(config, dtype=dtype,
                                                  param_dtype=param_dtype,
                                                  rngs=nnx.Rngs(0)))
  return nnx.split(model)


def load(path: str | Path, *, allow_pickle: bool = False, dtype=jnp.float32,
         param_dtype=jnp.float32):
  """Reads the image encoder of a transformers SAM folder (``config.json`` plus weights).

  Args:
    path: What ``SamModel`` / ``SamVisionModel.save_pretrained`` wrote (e.g. a
      ``facebook/sam-vit-huge`` snapshot).
    allow_pickle: Accept ``pytorch_model.bin`` (pickle; can run code) weights.
    dtype: Compute dtype of the built model.
    param_dtype: Storage dtype of the returned parameters.

  Returns:
    ``(config, graphdef, params_state)``; ``nnx.merge(graphdef, params_state)`` is the
    :class:`SamVisionEncoder`.

  Raises:
    FileNotFoundError: naming ``path`` when the folder, its config or weights are absent.
    ConversionError: when the tensors do not match the key table (unused, missing or
      mis-shaped keys, named), or for pickle weights without ``allow_pickle``.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"SAM checkpoint folder not found: {path}")
  raw = read_json(path / CONFIG_NAME)
  config = SamVisionConfig.from_hf(raw)
  tensors = read_tensors(path, allow_pickle=allow_pickle)
  if raw.get("model_type") == FULL_MODEL_TYPE:
    tensors = drop_ignored(tensors)
  graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  return config, graphdef, common.fill_params(
      tensors, key_table(config, prefix=checkpoint_prefix(tensors)), abstract,
      param_dtype=param_dtype, what=f"SAM checkpoint {path}")


def export(config: SamVisionConfig, params_state, out_dir: str | Path) -> Path:
  """Writes a transformers ``SamVisionModel`` folder (``config.json``,
  ``model.safetensors``) that ``transformers.SamVisionModel.from_pretrained`` loads.

  Returns:
    ``out_dir`` as a Path.
  """
  return common.write_folder(out_dir, params_state, key_table(config),
                             weights_name=WEIGHTS_NAME, config=config.to_hf(),
                             what="SAM vision encoder")
