"""Jitted samplers: the teacher's PF-ODE with classifier-free guidance.

``make_ode_sampler`` returns a pure ``(params, noise, cond, uncond) -> x0`` that runs the
whole solver inside one ``lax.fori_loop`` (the network is traced once, whatever the step
count). The same function serves ``--mode=sample`` and, later, the ODE-pair job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax import conditioning, config_lib, sharding
from adm_jax import parameterization as P
from adm_jax import teacher as teacher_lib


def initial_noise_scale(param: P.Parameterization, t_start, sampler: str,
                        spacing: str) -> float:
  """Scale of the starting sample ``x_T = scale * noise``, as diffusers' schedulers.

  DDIM and leading-spacing Euler start at ``x_T = noise``; Euler with ``trailing`` or
  ``linspace`` spacing starts at ``sigma_T * noise`` (its ``init_noise_sigma`` is the VE
  sigma, i.e. ``sigma_T`` in VP scaling; 0.9977 at t = 999 for SDXL). Flow: sigma = 1.
  """
  if sampler == "euler" and spacing in ("trailing", "linspace"):
    return float(param.alpha_sigma(jnp.float32(t_start))[1])
  return 1.0


def make_ode_sampler(apply_fn: P.ApplyFn, param: P.Parameterization, num_steps: int, *,
                     spacing: str = "trailing", cfg_scale: float = 1.0,
                     sampler: str = "ddim") -> Callable:
  """Deterministic sampler from pure noise: ``num_steps`` DDIM / Euler steps with CFG.

  The DDIM and Euler updates are the same map (see :mod:`adm_jax.schedules`); the two
  samplers differ only in the starting scale (:func:`initial_noise_scale`) and, through
  ``param.schedule.set_alpha_to_one``, in where the last step lands.

  Returns ``sample(params, noise [B, ...], cond, uncond) -> x0 [B, ...]`` (float32).
  """
  grid = param.schedule.sampling_times(num_steps, spacing)
  times = jnp.asarray(grid)                                               # [N + 1]
  scale = initial_noise_scale(param, grid[0], sampler, spacing)

  def sample(params, noise, cond, uncond):
    b = noise.shape[0]

    def body(i, x):
      t = jnp.full((b,), times[i])
      x0 = P.predict_x0(apply_fn, params, x, t, cond, uncond, cfg_scale, param=param)
      return param.ode_step(x, x0, t, jnp.full((b,), times[i + 1]))

    return jax.lax.fori_loop(0, num_steps, body, scale * noise.astype(jnp.float32))
  return sample


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """``[N, H, W, 3]`` uint8 -> one ``[rows * H, cols * W, 3]`` grid."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  pad = np.zeros((rows * cols - n, h, w, c), images.dtype)
  grid = np.concatenate([images, pad]).reshape(rows, cols, h, w, c)
  return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def run(config: config_lib.ConfigDict, workdir: str) -> Path:
  """``--mode=sample``: prompts -> teacher PF-ODE with CFG -> VAE -> ``samples.png``."""
  from PIL import Image
  sc = config.sample
  mesh = sharding.make_mesh(config.mesh)
  teacher = teacher_lib.load_teacher(config.teacher, shard=lambda abstract: (
      sharding.infer_abstract_params(abstract, config_lib.rules_for(config, "teacher"),
                                     mesh)))
  param = teacher_lib.make_parameterization(config.teacher,
                                            set_alpha_to_one=sc.sampler == "euler")
  prompts = [p for p in sc.prompts for _ in range(sc.num_per_prompt)]
  cond = teacher.encode_prompts(prompts)
  uncond = conditioning.uncond_like(cond)
  noise = jax.random.normal(jax.random.key(sc.seed), (len(prompts), *teacher.latent_shape))
  # The batch is split over data x fsdp when it divides; otherwise it is replicated.
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  place = (lambda a: sharding.batch_sharding(mesh, a.ndim)) if len(prompts) % n_batch == 0 \
      else (lambda a: sharding.replicated(mesh))
  noise, cond, uncond = jax.device_put((noise, cond, uncond), jax.tree.map(
      place, (noise, cond, uncond)))
  sample = jax.jit(make_ode_sampler(teacher.apply, param, sc.num_steps, spacing=sc.spacing,
                                    cfg_scale=sc.guidance_scale, sampler=sc.sampler))
  latents = sample(teacher.denoiser.params, noise, cond, uncond)
  images = teacher_lib.latents_to_images(teacher, latents)
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "samples.npz", latents=np.asarray(latents), images=images,
           prompts=np.array(prompts))
  Image.fromarray(image_grid(images, rows=len(sc.prompts))).save(out / "samples.png")
  print(f"wrote {out / 'samples.png'} ({len(prompts)} samples, {sc.num_steps} steps, "
        f"{sc.sampler}, CFG {sc.guidance_scale})")
  return out / "samples.png"
