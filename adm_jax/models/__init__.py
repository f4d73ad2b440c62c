"""Model families: what a teacher is made of and how each part is read and written.

A family entry names its components (folder name in a diffusers pipeline -> component
kind), its tokenizers and its parameterisation. A component kind knows its config class,
its converter module (``load`` / ``export`` / ``abstract_model`` / ``key_table``) and how
its config is stored. Adding a family (SD3, CogVideoX) is a new entry here plus its
model and converter modules; nothing downstream branches on the family name.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ComponentKind:
  converter: str          # module with load / export / abstract_model / key_table
  config_module: str
  config_class: str
  from_dict: str          # classmethod name: foreign config dict -> config
  to_dict: str            # method name: config -> foreign config dict

  def module(self):
    return importlib.import_module(self.converter)

  def config_from(self, d: dict):
    cls = getattr(importlib.import_module(self.config_module), self.config_class)
    return getattr(cls, self.from_dict)(d)

  def config_to(self, cfg) -> dict:
    return getattr(cfg, self.to_dict)()


KINDS: dict[str, ComponentKind] = {
    "unet": ComponentKind("adm_jax.convert.unet", "adm_jax.models.unet", "UNetConfig",
                          "from_diffusers", "to_diffusers"),
    "vae": ComponentKind("adm_jax.convert.vae", "adm_jax.models.vae", "AutoencoderKLConfig",
                         "from_diffusers", "to_diffusers"),
    "clip_text": ComponentKind("adm_jax.convert.clip", "adm_jax.models.clip_text",
                               "CLIPTextConfig", "from_hf", "to_hf"),
    "toy_mlp": ComponentKind("adm_jax.models.toy", "adm_jax.models.toy", "ToyConfig",
                             "from_dict", "to_dict"),
}


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  components: dict[str, str]            # pipeline sub-folder -> component kind
  denoiser: str                         # the component that is distilled
  tokenizers: tuple[str, ...]
  parameterization: str                 # adm_jax.parameterization registry name
  # () -> {component: architecture config} of the family's reference release, used by
  # the compile check when no weights folder gives the architecture.
  reference: Callable[[], dict] | None = None
  reference_name: str = ""


def _sdxl_base() -> dict:
  """SDXL base 1.0's UNet (2.6 B parameters) and VAE architectures."""
  from adm_jax.models.unet import UNetConfig
  from adm_jax.models.vae import AutoencoderKLConfig
  return {"unet": UNetConfig(),
          "vae": AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4,
                                     block_out_channels=(128, 256, 512, 512),
                                     layers_per_block=2, sample_size=1024,
                                     scaling_factor=0.13025)}


FAMILIES: dict[str, Family] = {
    "sdxl": Family(
        name="sdxl",
        components={"unet": "unet", "vae": "vae", "text_encoder": "clip_text",
                    "text_encoder_2": "clip_text"},
        denoiser="unet",
        tokenizers=("tokenizer", "tokenizer_2"),
        parameterization="epsilon",
        reference=_sdxl_base, reference_name="stable-diffusion-xl-base-1.0"),
    # The exact-score 2-D mixture: its teacher has no weights (adm_jax.models.toy); the
    # component is the MLP used for the generator and the fake score.
    "toy": Family(name="toy", components={"denoiser": "toy_mlp"}, denoiser="denoiser",
                  tokenizers=(), parameterization="epsilon"),
}


def family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def load_component(path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   shard: Callable[[Any], Any] | None = None):
  """Loads a component converted by ``python -m adm_jax.convert``.

  Args:
    path: the component folder (``<weights_dir>/unet`` etc.).
    dtype, param_dtype: compute and storage dtypes.
    shard: optional ``abstract_state -> abstract_state with shardings``; parameters are
      then restored straight into those shardings.

  Returns:
    ``(config, graphdef, params)``.
  """
  from adm_jax import checkpoint
  meta = checkpoint.read_meta(path)
  kind = KINDS[meta["kind"]]
  cfg = kind.config_from(meta["config"])
  graphdef, abstract = kind.module().abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  if shard is not None:
    abstract = shard(abstract)
  _, params = checkpoint.load_params(path, abstract)
  return cfg, graphdef, params
