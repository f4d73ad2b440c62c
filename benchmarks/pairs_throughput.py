r"""ODE pairs per second: our pair job's jitted sampler against diffusers' own
``StableDiffusionXLPipeline`` on the same teacher, batch, Euler scheduler (trailing
spacing), guidance scale and step count, on this machine's CPU.

  python benchmarks/pairs_throughput.py [--teacher weights/digits-sdxl] [--batch 32]
      [--steps 25] [--guidance 5] [--repeats 5]

``--teacher`` is a diffusers SDXL pipeline folder (default: the embedded digits teacher).
Ours is one batch of the pair job's inner loop: conditioning from the prompt cache, the
PF-ODE in one ``lax.fori_loop`` with CFG, the latents back on the host and serialised as
records. Diffusers gets the same pre-encoded prompt embeddings (zero negative
embeddings, as ``force_zeros_for_empty_prompt``) and the same initial noise, with
``output_type="latent"``; the two results are compared and the max difference printed.
Medians of interleaved repeats after one warm-up call (which includes our compilation).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # torch's idle OpenMP threads spin

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_forward import _interleaved_medians  # noqa: E402

from adm_jax import config_lib, conditioning, pairs, sharding  # noqa: E402
from adm_jax import teacher as teacher_lib  # noqa: E402


def _config(jax_dir: Path, args) -> config_lib.ConfigDict:
  c = config_lib.ConfigDict(dict(
      family="sdxl", seed=0, mesh=config_lib.mesh(data=-1),
      sharding_rules=config_lib.REPLICATE_RULES,
      teacher=config_lib.sdxl_teacher(str(jax_dir)),
      pairs=config_lib.pair_settings(num_steps=args.steps, sampler="euler",
                                     spacing="trailing", batch_size=args.batch)))
  c.teacher.guidance_scale = args.guidance
  c.teacher.resolution = args.resolution
  c.teacher.dtype = "float32"
  return c


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--teacher", default="weights/digits-sdxl")
  ap.add_argument("--resolution", type=int, default=32, help="image side in pixels")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--guidance", type=float, default=5.0)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  import diffusers
  import torch
  from adm_jax.convert.__main__ import convert_pipeline
  src = Path(args.teacher)
  if not (src / "model_index.json").is_file():
    sys.exit(f"error: {src} is not a diffusers pipeline folder (model_index.json missing)")

  with tempfile.TemporaryDirectory() as tmp:
    convert_pipeline("sdxl", src, Path(tmp) / "teacher", log=lambda *_: None)
    config = _config(Path(tmp) / "teacher", args)
    mesh = sharding.make_mesh(config.mesh)
    teacher = teacher_lib.load_teacher(config.teacher)
  prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch)]
  cond = jax.device_get(teacher.encode_prompts(prompts))                # the cache's rows
  sample = pairs.make_pair_sampler(teacher.apply, pairs.ode_parameterization(config),
                                   config, teacher.latent_shape, mesh)
  index = np.arange(args.batch)

  def ours():
    g_idx, g_cond = sharding.make_global_batch((index, cond), mesh)
    noise, latent = sample(teacher.denoiser.params, g_idx, g_cond)
    noise, latent = np.asarray(noise), np.asarray(latent)
    return [pairs.encode_record(i, i % 10, n, l) for i, n, l in zip(index, noise, latent)], \
        noise, latent

  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src).to("cpu")
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    pe, _, ppe, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
  _, noise, latent_ours = ours()                                     # compile + warm-up
  noise_t = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())     # [B, c, h, w]

  def theirs():
    with torch.no_grad():
      return pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe,
                  negative_prompt_embeds=torch.zeros_like(pe),
                  negative_pooled_prompt_embeds=torch.zeros_like(ppe),
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  latents=noise_t.clone(), height=args.resolution, width=args.resolution,
                  output_type="latent").images

  latent_theirs = theirs().numpy().transpose(0, 2, 3, 1)
  diff = float(np.abs(latent_ours - latent_theirs).max())
  scale = float(np.abs(latent_theirs).max())
  t_ours, t_theirs = _interleaved_medians([ours, theirs], args.repeats)
  n_params = sum(p.numel() for p in pipe.unet.parameters())
  print(f"\nteacher {src} (UNet {n_params / 1e6:.2f} M params), latents "
        f"{'x'.join(map(str, teacher.latent_shape))}, batch {args.batch}, {args.steps} Euler "
        f"steps (trailing), CFG {args.guidance}, float32; {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); median of {args.repeats}")
  print("| | pairs/s | s per batch |")
  print("|---|---|---|")
  print(f"| adm_jax pair job | {args.batch / t_ours:.1f} | {t_ours:.3f} |")
  print(f"| diffusers StableDiffusionXLPipeline | {args.batch / t_theirs:.1f} | "
        f"{t_theirs:.3f} |")
  print(f"ours / diffusers: {t_theirs / t_ours:.2f}x; max |latent difference| {diff:.2e} "
        f"(latents up to {scale:.2f})")
  return t_ours, t_theirs, diff


if __name__ == "__main__":
  main()
