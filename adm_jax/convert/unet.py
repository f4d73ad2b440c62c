"""Key table, loader and exporter for diffusers ``UNet2DConditionModel`` checkpoints.

The table is written block by block from the config: every tensor of a diffusers
SDXL-family UNet has exactly one entry, and :func:`adm_jax.convert.common.apply_table`
rejects anything else.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from adm_jax.convert import common
from adm_jax.models.unet import UNet2DConditionModel, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"





def _resnet(t: dict, p: str, shortcut: bool) -> None:
  common.norm(t, f"{p}.norm1")
  common.conv(t, f"{p}.conv1")
  common.linear(t, f"{p}.time_emb_proj")
  common.norm(t, f"{p}.norm2")
  common.conv(t, f"{p}.conv2")
  if shortcut:
    common.conv(t, f"{p}.conv_shortcut")


def _attention(t: dict, p: str) -> None:
  for name in ("to_q", "to_k", "to_v"):
    common.linear(t, f"{p}.{name}", bias=False)
  common.linear(t, f"{p}.to_out.0")


def _transformer(t: dict, p: str, depth: int, linear_proj: bool) -> None:
  common.norm(t, f"{p}.norm")
  for name in ("proj_in", "proj_out"):
    if linear_proj:
      common.linear(t, f"{p}.{name}")
    else:
      common.conv(t, f"{p}.{name}")
  for d in range(depth):
    b = f"{p}.transformer_blocks.{d}"
    for n in ("norm1", "norm2", "norm3"):
      common.norm(t, f"{b}.{n}")
    _attention(t, f"{b}.attn1")
    _attention(t, f"{b}.attn2")
    common.linear(t, f"{b}.ff.net.0.proj")
    common.linear(t, f"{b}.ff.net.2")


def _timestep_embedding(t: dict, p: str) -> None:
  common.linear(t, f"{p}.linear_1")
  common.linear(t, f"{p}.linear_2")


def key_table(cfg: UNetConfig) -> common.KeyTable:
  """Every tensor of a diffusers UNet with architecture ``cfg``."""
  t: common.KeyTable = {}
  common.conv(t, "conv_in")
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
      common.conv(t, f"down_blocks.{i}.downsamplers.0.conv")
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
      common.conv(t, f"up_blocks.{i}.upsamplers.0.conv")
  common.norm(t, "conv_norm_out")
  common.conv(t, "conv_out")
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
  return cfg, graphdef, common.fill_params(tensors, key_table(cfg), abstract,
                                           param_dtype=param_dtype,
                                           what=f"UNet checkpoint {path}")


def export(cfg: UNetConfig, params, out_dir: str | Path) -> Path:
  """Writes ``params`` as a diffusers folder that ``UNet2DConditionModel.from_pretrained``
  loads (float32 safetensors + ``config.json``)."""
  return common.write_folder(out_dir, params, key_table(cfg), weights_name=WEIGHTS,
                             config=cfg.to_diffusers(), what="UNet")
