"""The frozen teacher: its converted components, its text path and its parameterisation.

``load_teacher(config.teacher)`` reads the folders written by ``python -m adm_jax.convert``
(a missing one stops at once with the convert command) and returns a :class:`Teacher`:
a pure ``apply(params, x_t, model_time, cond)`` for the denoiser, its parameters (never
given to an optimiser, never checkpointed), and the family's prompt encoder and VAE.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax import config_lib, conditioning, models, multihost, tree

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Part:
  """One loaded component: ``nnx.merge(graphdef, params)`` is the module."""
  config: Any
  graphdef: Any
  params: Any

  def module(self):
    return nnx.merge(self.graphdef, self.params)


@dataclasses.dataclass
class Teacher:
  family: models.Family
  parts: dict[str, Part]
  tokenizers: dict[str, Any]
  config: config_lib.ConfigDict

  @property
  def denoiser(self) -> Part:
    return self.parts[self.family.denoiser]

  def apply(self, params, x_t, model_time, cond):
    """Raw denoiser output ``[B, ..., C]`` for latents ``x_t`` at ``model_time`` ``[B]``."""
    return nnx.merge(self.denoiser.graphdef, params)(x_t, model_time, cond)

  def encode_prompts(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
    """Conditioning pytree for ``prompts`` at ``config.resolution``."""
    res = self.config.resolution
    ids = [conditioning.tokenize(self.tokenizers[t], prompts) for t in self.family.tokenizers]
    time_ids = conditioning.sdxl_add_time_ids((res, res), (0, 0), (res, res), len(prompts))
    return conditioning.encode_sdxl(self.parts["text_encoder"].module(),
                                    self.parts["text_encoder_2"].module(), *ids,
                                    time_ids=time_ids)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """``(h, w, c)`` of one latent at ``config.resolution``."""
    vae = self.parts["vae"].config
    unet = self.denoiser.config
    side = self.config.resolution // vae.downscale
    return (side, side, unet.in_channels)


def load_teacher(tcfg: config_lib.ConfigDict, *, components: Sequence[str] | None = None,
                 shard: Callable[[Any], Any] | None = None) -> Teacher:
  """Loads ``components`` (default: all of the family's) from ``tcfg.weights_dir``.

  The denoiser computes in ``tcfg.dtype``; every other part in float32. ``shard`` maps an
  abstract parameter state to one with shardings (see :mod:`adm_jax.sharding`).
  """
  fam = models.family(tcfg.family)
  names = list(components or fam.components)
  paths = config_lib.teacher_paths(tcfg, names)
  parts = {}
  for name in names:
    dtype, param_dtype = _dtypes(tcfg, fam, name)
    parts[name] = Part(*models.load_component(paths[name], dtype=dtype,
                                              param_dtype=param_dtype, shard=shard))
  tokenizers = {}
  if components is None:
    tok_paths = config_lib.teacher_paths(tcfg, fam.tokenizers)
    tokenizers = {t: conditioning.load_tokenizer(p) for t, p in tok_paths.items()}
  return Teacher(fam, parts, tokenizers, tcfg)


def _dtypes(tcfg, fam: models.Family, name: str):
  """(compute, storage) dtypes of component ``name``: the denoiser's from the config
  (``teacher.dtype``, ``teacher.param_dtype``; bfloat16 storage halves the frozen
  teacher's memory), float32 for the others."""
  if name != fam.denoiser:
    return jnp.float32, jnp.float32
  return DTYPES[tcfg.dtype], DTYPES[tcfg.get("param_dtype", "float32")]


def architecture(tcfg: config_lib.ConfigDict, name: str) -> tuple[Any, str]:
  """``(config, where it came from)`` of component ``name`` without reading weights:
  the converted folder's metadata, else the diffusers folder's ``config.json``
  (``teacher.diffusers_dir``), else the family's reference release."""
  import json
  from adm_jax import checkpoint
  fam = models.family(tcfg.family)
  kind = models.KINDS[fam.components[name]]
  converted = Path(tcfg.weights_dir or "/nonexistent") / name
  if (converted / checkpoint.META).exists():
    return kind.config_from(checkpoint.read_meta(converted)["config"]), str(converted)
  source = Path(tcfg.get("diffusers_dir") or "/nonexistent") / name / "config.json"
  if source.exists():
    return kind.config_from(json.loads(source.read_text())), str(source)
  if fam.reference is None or name not in fam.reference():
    raise FileNotFoundError(f"no architecture for {tcfg.family} component {name!r}: "
                            f"neither {converted} nor {source} exists")
  return fam.reference()[name], f"{fam.reference_name} (reference architecture)"


def abstract_teacher(tcfg: config_lib.ConfigDict, *, shard: Callable[[Any], Any] | None = None,
                     log=print) -> Teacher:
  """The teacher's denoiser and VAE with ``jax.ShapeDtypeStruct`` parameters (sharded by
  ``shard``): shapes and dtypes of a real load, no weights read (the compile check)."""
  fam = models.family(tcfg.family)
  parts = {}
  for name in (fam.denoiser, "vae"):
    cfg, where = architecture(tcfg, name)
    dtype, param_dtype = _dtypes(tcfg, fam, name)
    graphdef, abstract = models.KINDS[fam.components[name]].module().abstract_model(
        cfg, dtype=dtype, param_dtype=param_dtype)
    parts[name] = Part(cfg, graphdef, shard(abstract) if shard else abstract)
    log(f"{name}: architecture from {where}")
  return Teacher(fam, parts, {}, tcfg)


def prepare(config, workdir) -> None:
  """A teacher that ships in diffusers format (``teacher.diffusers_dir``, e.g. the
  embedded digits teacher) is converted once into ``teacher.weights_dir`` (default
  ``WORKDIR/teacher``), to a temporary folder first and then renamed, so an interrupted
  conversion is redone rather than half-read."""
  tc = config.teacher
  src = tc.get("diffusers_dir")
  if not src:
    return
  if not tc.weights_dir:
    tc.weights_dir = str(Path(workdir) / "teacher")
  dst = Path(tc.weights_dir)
  if dst.is_dir():
    return
  if jax.process_index() == 0:
    from adm_jax.convert.__main__ import convert_pipeline
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Independent jobs may share one work directory (e.g. benchmark rows run side by
    # side): the first converts, the others wait on the lock and then find ``dst``.
    # The kernel drops the lock of a killed process, so a crash never blocks a re-run.
    with open(dst.with_name(dst.name + ".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not dst.is_dir():
        tmp = dst.with_name(dst.name + ".converting")
        if tmp.exists():
          shutil.rmtree(tmp)
        convert_pipeline(tc.family, src, tmp, log=lambda *_: None)
        os.replace(tmp, dst)
        print(f"converted the teacher {src} -> {dst}", flush=True)
  multihost.barrier("teacher-prepare")


def describe(config: config_lib.ConfigDict, log=print) -> dict[str, int]:
  """``--mode=check``: loads the teacher the config names and prints its sizes."""
  teacher = load_teacher(config.teacher)
  counts = {}
  for name, part in teacher.parts.items():
    counts[name] = tree.count(part.params)
    log(f"{name:16s} {counts[name] / 1e6:10.2f} M parameters  "
        f"({Path(config.teacher.weights_dir) / name})")
  log(f"latent shape at {config.teacher.resolution}px: {teacher.latent_shape}")
  return counts


def latents_to_images(teacher: Teacher, latents: jax.Array) -> np.ndarray:
  """Decodes latents with the family's VAE to uint8 ``[B, H, W, 3]``."""
  vae = teacher.parts["vae"].module()
  images = jax.jit(lambda z: vae.decode(z))(latents)
  return np.asarray(jnp.clip((images + 1) * 127.5, 0, 255).round().astype(jnp.uint8))


def make_parameterization(tcfg: config_lib.ConfigDict, *, set_alpha_to_one: bool = True):
  """The teacher's :class:`~adm_jax.parameterization.Parameterization` from its config."""
  from adm_jax import parameterization, schedules
  if tcfg.parameterization == "flow":
    return parameterization.make("flow", shift=tcfg.get("shift", 1.0))
  schedule = schedules.Schedule.vp(tcfg.num_train_timesteps, tcfg.beta_start, tcfg.beta_end,
                                   tcfg.beta_schedule, set_alpha_to_one=set_alpha_to_one)
  return parameterization.make(tcfg.parameterization, schedule)
