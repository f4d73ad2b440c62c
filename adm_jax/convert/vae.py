"""Key table, loader and exporter for diffusers ``AutoencoderKL`` checkpoints.

Every tensor ``AutoencoderKL.save_pretrained`` writes has exactly one entry in
:func:`key_table`; :func:`adm_jax.convert.common.apply_table` rejects anything else.
Checkpoints saved before diffusers renamed the mid-block attention
(``query`` / ``key`` / ``value`` / ``proj_attn``) are read too: :func:`load` renames those
keys the way diffusers' own loader does before applying the table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax.convert import common
from adm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
# The diffusers release whose file format this module writes.
DIFFUSERS_VERSION = "0.42.1"
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                         "proj_attn": "to_out.0"}





def _resnet(t: dict, p: str, shortcut: bool) -> None:
  common.norm(t, f"{p}.norm1")
  common.conv(t, f"{p}.conv1")
  common.norm(t, f"{p}.norm2")
  common.conv(t, f"{p}.conv2")
  if shortcut:
    common.conv(t, f"{p}.conv_shortcut")


def _attention(t: dict, p: str) -> None:
  common.norm(t, f"{p}.group_norm")
  for name in ("to_q", "to_k", "to_v", "to_out.0"):
    common.linear(t, f"{p}.{name}")


def _mid_block(t: dict, p: str, attention: bool) -> None:
  _resnet(t, f"{p}.resnets.0", False)
  if attention:
    _attention(t, f"{p}.attentions.0")
  _resnet(t, f"{p}.resnets.1", False)


def key_table(config: AutoencoderKLConfig) -> common.KeyTable:
  """Every tensor of a diffusers ``AutoencoderKL`` with architecture ``config``.

  Names are identical on both sides except the leaf (``weight`` -> ``kernel`` /
  ``scale``); the layout says how the array is re-laid.
  """
  t: common.KeyTable = {}
  ch = config.block_out_channels
  n = len(ch)
  # Encoder.
  common.conv(t, "encoder.conv_in")
  for i in range(n):
    cin = ch[max(i - 1, 0)]
    for j in range(config.layers_per_block):
      _resnet(t, f"encoder.down_blocks.{i}.resnets.{j}", j == 0 and cin != ch[i])
    if i < n - 1:
      common.conv(t, f"encoder.down_blocks.{i}.downsamplers.0.conv")
  _mid_block(t, "encoder.mid_block", config.mid_block_add_attention)
  common.norm(t, "encoder.conv_norm_out")
  common.conv(t, "encoder.conv_out")
  # Decoder.
  rev = tuple(reversed(ch))
  common.conv(t, "decoder.conv_in")
  _mid_block(t, "decoder.mid_block", config.mid_block_add_attention)
  for i in range(n):
    cin = rev[max(i - 1, 0)]
    for j in range(config.layers_per_block + 1):
      _resnet(t, f"decoder.up_blocks.{i}.resnets.{j}", j == 0 and cin != rev[i])
    if i < n - 1:
      common.conv(t, f"decoder.up_blocks.{i}.upsamplers.0.conv")
  common.norm(t, "decoder.conv_norm_out")
  common.conv(t, "decoder.conv_out")
  # 1x1 convs around the latent.
  if config.use_quant_conv:
    common.conv(t, "quant_conv")
  if config.use_post_quant_conv:
    common.conv(t, "post_quant_conv")
  return t


def rename_deprecated_attention(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old mid-block attention names (``...attentions.0.query.weight``) -> current ones
  (``...attentions.0.to_q.weight``), as diffusers does when loading; others unchanged."""
  out = {}
  for key, value in tensors.items():
    parts = key.split(".")
    if (len(parts) == 6 and parts[1:3] == ["mid_block", "attentions"]
        and parts[4] in _DEPRECATED_ATTENTION):
      new = ".".join(parts[:4] + [_DEPRECATED_ATTENTION[parts[4]], parts[5]])
      if new in tensors:
        raise common.ConversionError(f"checkpoint holds both {key!r} and {new!r}")
      key = new
    out[key] = value
  return out


def abstract_model(config: AutoencoderKLConfig, *, dtype=jnp.float32,
                   param_dtype=jnp.float32):
  """``(graphdef, abstract params)`` without allocating any weights."""
  model = nnx.eval_shape(lambda: AutoencoderKL(
      config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def _model_folder(path: Path) -> Path:
  """``path`` itself, or its ``vae/`` subfolder when given a pipeline folder."""
  if not (path / CONFIG).exists() and (path / "vae" / CONFIG).exists():
    return path / "vae"
  return path


def _weights_file(folder: Path, variant: str | None) -> Path:
  stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
  for name in (f"{stem}.safetensors", f"{stem}.bin"):
    if (folder / name).exists():
      return folder / name
  raise FileNotFoundError(f"no {stem}.safetensors (or .bin) in {folder}")


def load(path: str | Path, *, allow_pickle: bool = False, dtype=jnp.float32,
         param_dtype=jnp.float32, variant: str | None = None):
  """Reads a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors).

  Args:
    path: the VAE folder, or a pipeline folder with a ``vae/`` subfolder.
    allow_pickle: also accept ``diffusion_pytorch_model.bin`` (runs pickle; trusted only).
    dtype: compute dtype baked into the returned ``graphdef``.
    param_dtype: dtype of the returned parameters.
    variant: a weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.*``.

  Returns:
    ``(config, graphdef, params)``; ``nnx.merge(graphdef, params)`` is the model.

  Raises:
    FileNotFoundError: no such folder, config or weights file.
    ConversionError: the tensors do not match the config (names the keys).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"VAE checkpoint not found: {path}")
  folder = _model_folder(path)
  config = AutoencoderKLConfig.from_diffusers(common.read_json(folder / CONFIG))
  weights = _weights_file(folder, variant)
  tensors = rename_deprecated_attention(
      common.read_tensors(weights, allow_pickle=allow_pickle))
  graphdef, abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
  return config, graphdef, common.fill_params(tensors, key_table(config), abstract,
                                              param_dtype=param_dtype,
                                              what=f"VAE checkpoint {weights}")


def export(config: AutoencoderKLConfig, params, out_dir: str | Path) -> Path:
  """Writes a folder ``diffusers.AutoencoderKL.from_pretrained`` loads.

  Args:
    config: the architecture of ``params``.
    params: an ``nnx.State`` of the model's parameters (or the model itself).
    out_dir: created if needed; receives ``config.json`` and float32 safetensors.

  Returns:
    ``out_dir``.
  """
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  cfg = config.to_diffusers()
  cfg["_diffusers_version"] = DIFFUSERS_VERSION
  return common.write_folder(out_dir, params, key_table(config), weights_name=WEIGHTS,
                             config=cfg, what="VAE")
