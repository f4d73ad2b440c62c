"""What each model family gives the trainer: a :class:`Problem`.

A problem is the frozen teacher (apply function, parameterisation, frozen parameters),
the students' architecture and initial weights (a copy of the teacher's), the optional
pixel path of ADP's second discriminator (VAE decoder + frozen vision encoder) and a
deterministic batch function. The trainer (:mod:`adm_jax.train`) never branches on the
family; adding SD3 or CogVideoX is one more entry in :data:`PROBLEMS`.

Batches are functions of the step (``batch(step, needs)``), so a resumed run sees the
same data as an uninterrupted one. ``needs`` says what the method reads besides
``cond`` / ``uncond``: ``"pairs"`` (ODE pairs ``pair_noise`` / ``pair_latent``) and
``"real"`` (``real`` latents with ``real_cond`` for DMD2's GAN). Both come from the
teacher's PF-ODE (its samples stand in for real latents): solved inside each batch with
``pairs.source="online"``, or read from the pair job's shards (:mod:`adm_jax.pairs`)
with ``"files"``; then the batch's prompts are the pairs' own.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax import config_lib, conditioning, sampling, sharding
from adm_jax import teacher as teacher_lib

Array = jax.Array


@dataclasses.dataclass
class Problem:
  """A family's side of a distillation run.

  Attributes:
    param: the teacher's parameterisation (the students share it).
    teacher: ``apply(params, x_t, model_time, cond, *, return_features=False)``.
    frozen: ``{"teacher": params}`` plus ``"decoder"`` / ``"pixel"`` for ADP's pixel
      discriminator; never checkpointed, never trained.
    student: apply function of the generator (and of the fake score without ``fake``).
    student_params: their initial parameters.
    latent_shape: one sample's latent shape, e.g. ``(128, 128, 4)``.
    batch: ``(step, needs) -> host batch dict``, deterministic in ``step``.
    decode: ``decode(frozen["decoder"], latents) -> images [B, H, W, 3]`` in [-1, 1].
    pixel: ``pixel(frozen["pixel"], images) -> {name: [B, h, w, c]}``.
    render: ``latents [N, ...] -> uint8 image`` of a sample grid (host side).
    evaluator: scores images against labels (``adm_jax.evaluation``), or None.
    eval_set: ``(cond {k: [N, ...]}, labels [N], prompt text by label)``: what the
      evaluator samples.
    batch_per_process: ``batch`` returns this process's rows only (``batch_size /
      process_count`` of them, e.g. from the pair files); otherwise it returns the
      whole batch, the same on every process, and each process keeps its slice.
  """
  param: Any
  teacher: Callable
  frozen: dict
  student: Callable
  student_params: Any
  latent_shape: tuple[int, ...]
  batch: Callable[[int, frozenset], dict]
  decode: Callable | None = None
  pixel: Callable | None = None
  render: Callable[[np.ndarray], np.ndarray] | None = None
  evaluator: Any = None
  eval_set: tuple | None = None
  batch_per_process: bool = False
  fake: Callable | None = None


def _step_key(config, step: int, salt: int = 7):
  return jax.random.fold_in(jax.random.key(config.seed + salt), step)


# ------------------------------------------------------------------------------- toy


def toy(config, mesh, workdir=None) -> Problem:
  """The exact-score 2-D mixture (``family="toy"``): no weights, no pixels; pairs are
  always made online (the exact teacher is cheap)."""
  from adm_jax.models import toy as toy_lib
  del mesh, workdir
  mixture = toy_lib.ToyMixture.ring(**config.toy.mixture)
  param = teacher_lib.make_parameterization(config.teacher)
  student = toy_lib.init_denoiser(toy_lib.ToyConfig(**config.toy.student), config.seed)
  graphdef, _ = nnx.split(student)
  # "Initialised from the teacher": the exact teacher has no weights, so the students
  # start as an MLP regressed onto it.
  params = toy_lib.fit_to_teacher(student, mixture, param, steps=config.toy.fit_steps,
                                  rng=jax.random.key(config.seed))
  teacher = mixture.teacher_apply(param)
  pairs = jax.jit(sampling.make_ode_sampler(
      teacher, param, config.pairs.num_steps, cfg_scale=config.teacher.guidance_scale,
      sampler=config.pairs.sampler, spacing=config.pairs.spacing))

  @functools.partial(jax.jit, static_argnums=1)
  def make_batch(key, needs):
    r = jax.random.split(key, 4)
    b = config.batch_size
    labels = jax.random.randint(r[0], (b,), 0, mixture.num_modes)
    if not config.toy.conditional:                 # the whole mixture from noise alone
      labels = jnp.full((b,), toy_lib.NULL_LABEL, jnp.int32)
    cond = {"label": labels}
    out = dict(cond=cond, uncond=toy_lib.uncond_like(cond))
    if "real" in needs:
      out.update(real=mixture.sample(r[1], b, label=labels), real_cond=cond)
    if "pairs" in needs:
      noise = jax.random.normal(r[2], (b, mixture.dim))
      out.update(pair_noise=noise, pair_latent=pairs({}, noise, cond, out["uncond"]))
    return out

  def batch(step: int, needs=frozenset()) -> dict:      # one dispatch per step
    return make_batch(_step_key(config, step), frozenset(needs))

  return Problem(param=param, teacher=teacher, frozen={"teacher": {}},
                 student=toy_lib.denoiser_apply(graphdef), student_params=params,
                 latent_shape=(mixture.dim,), batch=batch,
                 render=functools.partial(_scatter_png, mixture))


def _scatter_png(mixture, samples: np.ndarray, size: int = 256) -> np.ndarray:
  """2-D samples as white dots on black (mode centres in red), uint8 ``[S, S, 3]``."""
  img = np.zeros((size, size, 3), np.uint8)
  lim = float(np.abs(np.asarray(mixture.means_array())).max()) * 1.5
  to_px = lambda p: np.clip(((p + lim) / (2 * lim) * (size - 1)).round().astype(int), 0,
                            size - 1)
  xy = to_px(np.asarray(samples, np.float32))
  img[size - 1 - xy[:, 1], xy[:, 0]] = 255
  m = to_px(np.asarray(mixture.means_array()))
  img[size - 1 - m[:, 1], m[:, 0]] = (255, 0, 0)
  return img


# ------------------------------------------------------------------------------ SDXL


def unet_apply(graphdef, remat: str = "none", scan: bool = False):
  """``apply(params, x_t, model_time, cond)`` of a UNet, its blocks rematerialised with
  policy ``remat``, its transformer stacks scanned with ``scan``."""
  def apply(params, x_t, model_time, cond, *, return_features: bool = False):
    model = nnx.merge(graphdef, params)
    if remat != "none":
      model.set_remat(remat)
    if scan:
      model.set_scan(True)
    return model(x_t, model_time, cond, return_features=return_features)
  return apply


def _remat(config, net: str) -> str:
  return config.get("remat", {}).get(net, "none")


def _memory_apply(config, graphdef, net: str):
  return unet_apply(graphdef, _remat(config, net), bool(config.get("scan_blocks", False)))


def _pixel_encoder(pcfg, mesh, abstract: bool = False, remat: str = "none"):
  """ADP's frozen pixel encoder: ``(apply(params, images), params)``; SAM's ViT image
  encoder read from a transformers ``SamModel`` / ``SamVisionModel`` folder, or, with
  ``weights_dir=""``, a seeded random ViT of ``random_config`` (frozen random features,
  for teachers that ship without a SAM, such as the embedded digits teacher).
  ``abstract``: parameter shapes only (the folder's ``config.json``, else
  ``random_config``, else ViT-H)."""
  from adm_jax.convert import sam as sam_convert
  from adm_jax.models import sam
  if pcfg.encoder != "sam":
    raise config_lib.ConfigError(f"config.disc.pixel.encoder={pcfg.encoder!r}; valid: "
                                 "'sam' (or drop 'pixel' from hparams.adp_weights)")
  if abstract:
    folder = Path(pcfg.weights_dir or "/nonexistent")
    if (folder / "config.json").exists():
      cfg = sam.SamVisionConfig.from_hf(json.loads((folder / "config.json").read_text()))
    elif pcfg.get("random_config"):
      cfg = sam.SamVisionConfig(**pcfg.random_config)
    else:
      cfg = sam.PRESETS["vit_h"]
    graphdef, params = sam_convert.abstract_model(cfg)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=sharding.replicated(mesh)), params)
  elif pcfg.weights_dir:
    cfg, graphdef, params = sam_convert.load(pcfg.weights_dir)
  else:
    if not pcfg.get("random_config"):
      raise config_lib.ConfigError("config.disc.pixel: set weights_dir (a SAM folder) or "
                                   "random_config")
    cfg = sam.SamVisionConfig(**pcfg.random_config)
    graphdef, params = nnx.split(sam.SamVisionEncoder(cfg, rngs=nnx.Rngs(pcfg.get("seed", 0))))
  if not abstract:
    params = jax.device_put(params, sharding.replicated(mesh))
  layers = tuple(int(i) for i in pcfg.layers)

  def apply(p, images):                                    # images [B, H, W, 3] in [-1, 1]
    x = sam.preprocess(images, cfg.image_size)
    model = nnx.merge(graphdef, p)
    if remat != "none":
      from adm_jax.models import layers as layers_lib
      layers_lib.set_remat(model, remat)
    out = model(x, feature_layers=layers, neck=False)
    return {f"layer_{i}": f for i, f in out["layers"].items()}      # [B, h, w, D]
  return apply, params


def sdxl(config, mesh, workdir=None, *, abstract: bool = False) -> Problem:
  """SDXL-family teacher (ε-prediction UNet, two CLIP encoders, VAE): prompts from
  ``config.data.prompts``, encoded once (online pairs), or the pair job's prompts and
  conditioning (``pairs.source="files"``); the students are copies of the teacher's
  UNet in float32. ``abstract``: every parameter and batch a ``jax.ShapeDtypeStruct``
  (sharded as in a real run), no weights read (the compile check)."""
  shard = lambda abstract: sharding.infer_abstract_params(
      abstract, config_lib.rules_for(config, "teacher"), mesh)
  if abstract:
    teacher = teacher_lib.abstract_teacher(config.teacher, shard=shard)
  else:
    teacher = teacher_lib.load_teacher(config.teacher, shard=shard)
  param = teacher_lib.make_parameterization(config.teacher)
  apply = unet_apply(teacher.denoiser.graphdef)
  if abstract:
    batch = _abstract_batches(config, teacher)
  elif config.pairs.source == "files":
    batch = _file_batches(config, workdir, teacher)
  else:
    batch = _online_batches(config, teacher, apply)
  vae = teacher.parts["vae"]
  frozen = {"teacher": teacher.denoiser.params, "decoder": vae.params}

  decoder_remat = _remat(config, "decoder")

  def decode(p, latents):                                             # -> [B, H, W, 3]
    model = nnx.merge(vae.graphdef, p)
    if decoder_remat != "none":
      from adm_jax.models import layers
      layers.set_remat(model, decoder_remat)
    return jnp.clip(model.decode(latents), -1.0, 1.0)

  pixel = None
  if "pixel" in config.hparams.get("adp_weights", {"pixel": 1}) and config.method in (
      "adp", "dmdx"):
    pixel, frozen["pixel"] = _pixel_encoder(config.disc.pixel, mesh, abstract,
                                            remat=_remat(config, "pixel"))
  # A float32 copy of the teacher for the students (f32 master weights).
  student_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding) if abstract
      else a.astype(jnp.float32), teacher.denoiser.params)

  def render(latents):
    images = jax.jit(decode)(frozen["decoder"], jnp.asarray(latents))
    images = np.asarray(jnp.clip((images + 1) * 127.5, 0, 255).round().astype(jnp.uint8))
    return sampling.image_grid(images, rows=max(1, int(np.sqrt(len(images)))))

  evaluator, eval_set = (None, None) if abstract else _evaluation(config, teacher)
  graphdef = teacher.denoiser.graphdef
  return Problem(param=param, teacher=_memory_apply(config, graphdef, "teacher"),
                 frozen=frozen, student=_memory_apply(config, graphdef, "generator"),
                 fake=_memory_apply(config, graphdef, "fake_score"),
                 student_params=student_params, latent_shape=teacher.latent_shape,
                 batch=batch, decode=decode, pixel=pixel, render=render,
                 evaluator=evaluator, eval_set=eval_set,
                 batch_per_process=config.pairs.source == "files")


def _evaluation(config, teacher):
  """``config.eval``'s evaluator and its prompts (each ``num_per_prompt`` times)."""
  ec = config.get("eval")
  if ec is None or not ec.evaluator:
    return None, None
  from adm_jax import evaluation
  if len(ec.prompts) != len(ec.labels) or not ec.prompts:
    raise config_lib.ConfigError(f"config.eval.prompts ({len(ec.prompts)}) and "
                                 f"config.eval.labels ({len(ec.labels)}) must pair up")
  n = len(ec.prompts) * ec.num_per_prompt
  if n % ec.batch_size:
    raise config_lib.ConfigError(f"config.eval: {n} samples do not split into batches of "
                                 f"{ec.batch_size}")
  cond = jax.device_get(teacher.encode_prompts(list(ec.prompts)))
  rows = np.repeat(np.arange(len(ec.prompts)), ec.num_per_prompt)
  cond = {k: v[rows] for k, v in cond.items()}
  names = [""] * (max(ec.labels) + 1)                    # prompt text indexed by label
  for label, prompt in zip(ec.labels, ec.prompts):
    names[label] = prompt
  return evaluation.make(ec.evaluator), (cond, np.asarray(ec.labels)[rows], names)


def _online_batches(config, teacher, apply) -> Callable:
  """Random prompts of ``config.data.prompts``; pairs / real latents solved per batch."""
  prompts = list(config.data.prompts)
  if not prompts:
    raise config_lib.ConfigError("config.data.prompts is empty")
  all_cond = jax.device_get(teacher.encode_prompts(prompts))          # {k: [P, ...]}
  from adm_jax import pairs as pairs_lib
  pairs = jax.jit(sampling.make_ode_sampler(
      apply, pairs_lib.ode_parameterization(config), config.pairs.num_steps, cfg_scale=config.teacher.guidance_scale,
      sampler=config.pairs.sampler, spacing=config.pairs.spacing))

  def batch(step: int, needs=frozenset()) -> dict:
    r = jax.random.split(_step_key(config, step), 4)
    b = config.batch_size
    idx = np.asarray(jax.random.randint(r[0], (b,), 0, len(prompts)))
    cond = {k: v[idx] for k, v in all_cond.items()}
    out = dict(cond=cond, uncond=conditioning.uncond_like(cond))
    if needs & {"pairs", "real"}:
      noise = jax.random.normal(r[1], (b, *teacher.latent_shape))
      latent = pairs(teacher.denoiser.params, noise, cond, out["uncond"])
      if "pairs" in needs:
        out.update(pair_noise=noise, pair_latent=latent)
      if "real" in needs:
        out.update(real=latent, real_cond=cond)
    return out
  return batch


def _abstract_batches(config, teacher) -> Callable:
  """Batches of ``jax.ShapeDtypeStruct`` (global batch ``config.compile.batch_size`` or
  ``config.batch_size``): SDXL conditioning shapes from the UNet's architecture."""
  unet = teacher.denoiser.config
  b = config.get("compile", {}).get("batch_size", 0) or config.batch_size
  f32 = lambda *shape: jax.ShapeDtypeStruct((b, *shape), jnp.float32)
  cond = {"context": f32(conditioning.MAX_LENGTH, unet.cross_attention_dim)}
  if unet.addition_embed_type == "text_time":
    cond["pooled"] = f32(unet.projection_class_embeddings_input_dim
                         - 6 * unet.addition_time_embed_dim)
    cond["time_ids"] = f32(6)

  def batch(step: int, needs=frozenset()) -> dict:
    del step
    out = dict(cond=cond, uncond=dict(cond))
    if "pairs" in needs:
      out.update(pair_noise=f32(*teacher.latent_shape), pair_latent=f32(*teacher.latent_shape))
    if "real" in needs:
      out.update(real=f32(*teacher.latent_shape), real_cond=cond)
    return out
  return batch


def _file_batches(config, workdir, teacher) -> Callable:
  """Batches from the pair job's shards: step ``s`` reads the reader's batch ``s``, and
  its prompts (``cond``) are the pairs' own, so pair and conditioning always match."""
  from adm_jax import pairs as pairs_lib
  directory = pairs_lib.pairs_dir(config, workdir or ".")
  reader = pairs_lib.PairReader(directory, config.batch_size // jax.process_count(),
                                seed=config.seed)
  if tuple(reader.spec["latent_shape"]) != tuple(teacher.latent_shape):
    raise config_lib.ConfigError(
        f"pairs at {directory} have latents {reader.spec['latent_shape']}, the teacher "
        f"makes {list(teacher.latent_shape)}")
  cond_of = pairs_lib.Conditioner(reader.prompts, teacher.encode_prompts,
                                  directory / "conditioning")

  def batch(step: int, needs=frozenset()) -> dict:
    rec = reader[step]
    cond = cond_of(rec["prompt_id"])
    out = dict(cond=cond, uncond=conditioning.uncond_like(cond))
    if "pairs" in needs:
      out.update(pair_noise=rec["noise"], pair_latent=rec["latent"])
    if "real" in needs:
      out.update(real=rec["latent"], real_cond=cond)
    return out
  return batch


PROBLEMS: dict[str, Callable[..., Problem]] = {"toy": toy, "sdxl": sdxl}
ABSTRACT = ("sdxl",)          # families whose builder takes ``abstract=True``


def check_family(config) -> None:
  if config.family not in PROBLEMS:
    raise config_lib.ConfigError(f"training is not available for family "
                                 f"{config.family!r} yet; valid: {', '.join(PROBLEMS)}")


def make(config, mesh, workdir: str | None = None, *, abstract: bool = False) -> Problem:
  check_family(config)
  if abstract:
    if config.family not in ABSTRACT:
      raise config_lib.ConfigError(f"family {config.family!r} has no abstract build (the "
                                   f"compile check); valid: {', '.join(ABSTRACT)}")
    return PROBLEMS[config.family](config, mesh, workdir, abstract=True)
  return PROBLEMS[config.family](config, mesh, workdir)
