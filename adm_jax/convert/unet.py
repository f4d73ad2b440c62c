"""Key table, loader and exporter for diffusers ``UNet2DConditionModel`` checkpoints.

The table is written block by block from the config: every tensor of a diffusers
SDXL-family UNet has exactly one entry, and :func:`adm_jax.convert.common.apply_table`
rejects anything else.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax import tree
from adm_jax.convert import common
from adm_jax.models.unet import UNet2DConditionModel, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _linear(t: dict, torch_name: str, ours: str, bias: bool = True) -> None:
  t[f"{torch_name}.weight"] = (f"{ours}.kernel", "linear")
  if bias:
    t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def _conv(t: dict, torch_name: str, ours: str) -> None:
  t[f"{torch_name}.weight"] = (f"{ours}.kernel", "conv2d")
  t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def _norm(t: dict, torch_name: str, ours: str) -> None:
  t[f"{torch_name}.weight"] = (f"{ours}.scale", "copy")
  t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def _resnet(t: dict, p: str, shortcut: bool) -> None:
  _norm(t, f"{p}.norm1", f"{p}.norm1")
  _conv(t, f"{p}.conv1", f"{p}.conv1")
  _linear(t, f"{p}.time_emb_proj", f"{p}.time_emb_proj")
  _norm(t, f"{p}.norm2", f"{p}.norm2")
  _conv(t, f"{p}.conv2", f"{p}.conv2")
  if shortcut:
    _conv(t, f"{p}.conv_shortcut", f"{p}.conv_shortcut")


def _attention(t: dict, p: str) -> None:
  for name in ("to_q", "to_k", "to_v"):
    _linear(t, f"{p}.{name}", f"{p}.{name}", bias=False)
  _linear(t, f"{p}.to_out.0", f"{p}.to_out.0")


def _transformer(t: dict, p: str, depth: int, linear_proj: bool) -> None:
  _norm(t, f"{p}.norm", f"{p}.norm")
  for name in ("proj_in", "proj_out"):
    if linear_proj:
      _linear(t, f"{p}.{name}", f"{p}.{name}")
    else:
      _conv(t, f"{p}.{name}", f"{p}.{name}")
  for d in range(depth):
    b = f"{p}.transformer_blocks.{d}"
    for n in ("norm1", "norm2", "norm3"):
      _norm(t, f"{b}.{n}", f"{b}.{n}")
    _attention(t, f"{b}.attn1")
    _attention(t, f"{b}.attn2")
    _linear(t, f"{b}.ff.net.0.proj", f"{b}.ff.net.0.proj")
    _linear(t, f"{b}.ff.net.2", f"{b}.ff.net.2")


def _timestep_embedding(t: dict, p: str) -> None:
  _linear(t, f"{p}.linear_1", f"{p}.linear_1")
  _linear(t, f"{p}.linear_2", f"{p}.linear_2")


def key_table(cfg: UNetConfig) -> common.KeyTable:
  """Every tensor of a diffusers UNet with architecture ``cfg``."""
  t: common.KeyTable = {}
  _conv(t, "conv_in", "conv_in")
  _timestep_embedding(t, "time_embedding")
  if cfg.addition_embed_type == "text_time":
    _timestep_embedding(t, "add_embedding")
  chans = cfg.block_out_channels
  cin = chans[0]
  for i, kind in enumerate(cfg.down_block_types):
    cout = chans[i]
    for j in range(cfg.layers_per_block[i]):
      _resnet(t, f"down_blocks.{i}.resnets.{j}", shortcut=(cin if j == 0 else cout) != cout)
      if kind == "CrossAttnDownBlock2D":
        _transformer(t, f"down_blocks.{i}.attentions.{j}", cfg.down_transformer_layers[i][j],
                     cfg.use_linear_projection)
    if i < len(chans) - 1:
      _conv(t, f"down_blocks.{i}.downsamplers.0.conv", f"down_blocks.{i}.downsamplers.0.conv")
    cin = cout
  if cfg.mid_block_type is not None:
    for j in range(2):
      _resnet(t, f"mid_block.resnets.{j}", shortcut=False)
    _transformer(t, "mid_block.attentions.0", cfg.mid_transformer_layers,
                 cfg.use_linear_projection)
  rev = list(reversed(chans))
  for i, kind in enumerate(cfg.up_block_types):
    cout, prev, skip_c = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, len(rev) - 1)]
    n = list(reversed(cfg.layers_per_block))[i] + 1
    for j in range(n):
      res_in = (prev if j == 0 else cout) + (skip_c if j == n - 1 else cout)
      _resnet(t, f"up_blocks.{i}.resnets.{j}", shortcut=res_in != cout)
      if kind == "CrossAttnUpBlock2D":
        _transformer(t, f"up_blocks.{i}.attentions.{j}", cfg.up_transformer_layers[i][j],
                     cfg.use_linear_projection)
    if i < len(rev) - 1:
      _conv(t, f"up_blocks.{i}.upsamplers.0.conv", f"up_blocks.{i}.upsamplers.0.conv")
  _norm(t, "conv_norm_out", "conv_norm_out")
  _conv(t, "conv_out", "conv_out")
  return t


def abstract_model(cfg: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """``(graphdef, abstract params)`` without allocating any weights."""
  model = nnx.eval_shape(lambda: UNet2DConditionModel(
      cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def load(path: str | Path, *, allow_pickle: bool = False, dtype=jnp.float32,
         param_dtype=jnp.float32):
  """Reads a diffusers UNet folder (``config.json`` + safetensors).

  Returns ``(config, graphdef, params)`` with ``params`` an ``nnx.State`` of host
  arrays in ``param_dtype``.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"UNet checkpoint not found: {path}")
  cfg = UNetConfig.from_diffusers(common.read_json(path / "config.json"))
  tensors = common.read_tensors(path, allow_pickle=allow_pickle)
  graphdef, abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  flat = common.apply_table(tensors, key_table(cfg), tree.shapes(abstract),
                            what=f"UNet checkpoint {path}")
  flat = {k: np.asarray(v, dtype=param_dtype) for k, v in flat.items()}
  return cfg, graphdef, tree.unflatten_like(abstract, flat)


def export(cfg: UNetConfig, params, out_dir: str | Path) -> Path:
  """Writes ``params`` as a diffusers folder that ``UNet2DConditionModel.from_pretrained``
  loads (float32 safetensors + ``config.json``)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  tensors = common.export_table(flat, key_table(cfg), what="UNet")
  common.write_safetensors(out_dir / WEIGHTS, tensors, metadata={"format": "pt"})
  with open(out_dir / "config.json", "w") as f:
    json.dump(cfg.to_diffusers(), f, indent=2)
  return out_dir
