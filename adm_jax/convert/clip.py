"""transformers CLIP text encoder checkpoints <-> :class:`adm_jax.models.clip_text.CLIPTextModel`.

Tensor names, as transformers 5.23 ``save_pretrained`` writes them (``model.safetensors``):

* ``CLIPTextModel`` (flattened in transformers 5): ``embeddings.token_embedding.weight``,
  ``embeddings.position_embedding.weight``,
  ``encoder.layers.N.{self_attn.{q,k,v,out}_proj,mlp.fc1,mlp.fc2}.{weight,bias}``,
  ``encoder.layers.N.{layer_norm1,layer_norm2}.{weight,bias}``,
  ``final_layer_norm.{weight,bias}``.
* ``CLIPTextModelWithProjection``: the same under ``text_model.``, plus
  ``text_projection.weight`` (no bias).

Checkpoints written by transformers 4 (every SD / SDXL ``text_encoder`` folder) name the
plain model's tensors with the ``text_model.`` prefix too; :func:`load` recognises either
naming. Some also carry the non-persistent ``embeddings.position_ids`` buffer
(``arange(max_position_embeddings)``); it is no parameter and is dropped by name. No
other key is skipped: anything the table does not name fails the conversion.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax.convert import common
from adm_jax.convert.common import (ConversionError, KeyTable, apply_table, read_json,
                                    read_tensors)
from adm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

PREFIX = "text_model."
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_NORMS = ("layer_norm1", "layer_norm2")


def default_prefix(config: CLIPTextConfig) -> str:
  """The prefix transformers 5 writes: none for ``CLIPTextModel``, ``text_model.`` with
  the projection head."""
  return PREFIX if config.with_projection else ""




def key_table(config: CLIPTextConfig, *, prefix: str | None = None) -> KeyTable:
  """Every tensor of a transformers CLIP text checkpoint -> our parameter path and layout.

  Args:
    config: The model configuration (layer count, projection head).
    prefix: Prefix of the text transformer's tensors (``""`` or ``"text_model."``);
      defaults to what transformers 5 writes for this architecture.
  """
  p = default_prefix(config) if prefix is None else prefix
  table: KeyTable = {
      f"{p}embeddings.token_embedding.weight": ("embeddings.token_embedding.embedding",
                                                "copy"),
      f"{p}embeddings.position_embedding.weight": (
          "embeddings.position_embedding.embedding", "copy"),
  }
  for i in range(config.num_hidden_layers):
    layer = f"encoder.layers.{i}"
    for name in _LINEARS:
      common.linear(table, f"{p}{layer}.{name}", f"{layer}.{name}")
    for name in _NORMS:
      common.norm(table, f"{p}{layer}.{name}", f"{layer}.{name}")
  common.norm(table, f"{p}final_layer_norm", "final_layer_norm")
  if config.with_projection:
    table["text_projection.weight"] = ("text_projection.kernel", "linear")
  return table


def checkpoint_prefix(tensors, config: CLIPTextConfig) -> str:
  """Which naming a checkpoint uses: ``text_model.`` (transformers 4, or with projection)
  or none (transformers 5 ``CLIPTextModel``)."""
  if config.with_projection:
    return PREFIX
  return PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""


def _drop_position_ids(tensors: dict, prefix: str, config: CLIPTextConfig) -> dict:
  """Removes the ``embeddings.position_ids`` buffer older checkpoints saved."""
  name = f"{prefix}embeddings.position_ids"
  if name not in tensors:
    return tensors
  ids = np.asarray(tensors[name])
  if ids.size != config.max_position_embeddings:
    raise ConversionError(f"{name}: shape {ids.shape} does not match "
                          f"max_position_embeddings={config.max_position_embeddings}")
  return {k: v for k, v in tensors.items() if k != name}


def abstract_model(config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """``(graphdef, abstract state)`` of the model, built without allocating parameters."""
  model = nnx.eval_shape(lambda: CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype,
                                               rngs=nnx.Rngs(0)))
  return nnx.split(model)


def load(path: str | Path, *, allow_pickle: bool = False, dtype=jnp.float32,
         param_dtype=jnp.float32):
  """Reads a transformers CLIP text encoder folder (``config.json`` plus weights).

  Args:
    path: The folder ``save_pretrained`` wrote (e.g. an SDXL ``text_encoder_2``).
    allow_pickle: Accept ``pytorch_model.bin`` (pickle; can run code) weights.
    dtype: Compute dtype of the built model.
    param_dtype: Storage dtype of the returned parameters.

  Returns:
    ``(config, graphdef, params_state)``; ``nnx.merge(graphdef, params_state)`` is the
    model.

  Raises:
    FileNotFoundError: naming ``path`` when the folder, its config or weights are absent.
    ConversionError: when the tensors do not match the key table (unused, missing or
      mis-shaped keys, named), or for pickle weights without ``allow_pickle``.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"CLIP text encoder folder not found: {path}")
  config = CLIPTextConfig.from_hf(read_json(path / CONFIG_NAME))
  tensors = read_tensors(path, allow_pickle=allow_pickle)
  prefix = checkpoint_prefix(tensors, config)
  tensors = _drop_position_ids(tensors, prefix, config)
  graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  return config, graphdef, common.fill_params(
      tensors, key_table(config, prefix=prefix), abstract, param_dtype=param_dtype,
      what=f"CLIP text checkpoint {path}")


def export(config: CLIPTextConfig, params_state, out_dir: str | Path) -> Path:
  """Writes ``config.json`` and ``model.safetensors`` in transformers 5's naming.

  ``transformers.CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when
  ``config.with_projection``) ``.from_pretrained(out_dir)`` loads the result.

  Returns:
    ``out_dir`` as a Path.
  """
  return common.write_folder(out_dir, params_state, key_table(config),
                             weights_name=WEIGHTS_NAME, config=config.to_hf(),
                             what="CLIP text model")
