r"""Time of one full training iteration per method (generator + fake score +
discriminator, TTUR 1) on an SDXL-architecture UNet, ours (the trainer's jitted steps)
against the PyTorch / diffusers DMD2 reference harness (``dmd2_torch_reference.py``,
the official code's structure) on the same weights, batch and conditioning.

  python benchmarks/step_throughput.py [--config mid] [--batch 2] [--repeats 5]

``mid`` is ``unet_forward.py``'s 248 M-parameter SDXL-shaped UNet at 32x32 latents
(SDXL's 2048-wide context); ``small`` a 32 M one at 16x16 for a quick look. DMD2 is
timed against torch (calls interleaved, medians); ADM and ADP (DMDX's first stage, with
the latent and the SAM pixel discriminators on VAE-decoded samples) are ours only.
Everything is float32 on the host CPU; the device kind and core count are printed.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dmd2_torch_reference as ref_lib  # noqa: E402
from unet_forward import _interleaved_medians  # noqa: E402

from adm_jax import config_lib, problems, sharding, train  # noqa: E402
from adm_jax.models import layers  # noqa: E402
from adm_jax import teacher as teacher_lib  # noqa: E402

# ADP's pixel path: a small SDXL-style VAE decoder (x8) and a small SAM ViT.
VAE = dict(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
           layers_per_block=1, scaling_factor=0.13025)
SAM = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, image_size=256,
           patch_size=16, window_size=8, global_attn_indexes=[3], output_channels=64,
           mlp_dim=768)


def _jax_models(ref, tmp: Path):
  """The reference's teacher UNet, a VAE and a SAM encoder, through our converters."""
  import torch
  import transformers
  from diffusers import AutoencoderKL
  from adm_jax.convert import sam as sam_convert
  from adm_jax.convert import unet as unet_convert
  from adm_jax.convert import vae as vae_convert
  ref.real_unet.save_pretrained(tmp / "unet")
  torch.manual_seed(1)
  AutoencoderKL(**VAE).save_pretrained(tmp / "vae")
  transformers.SamModel(transformers.SamConfig(vision_config=SAM)).save_pretrained(tmp / "sam")
  return (unet_convert.load(tmp / "unet"), vae_convert.load(tmp / "vae"),
          sam_convert.load(tmp / "sam"))


def _problem(ref, unet, vae, sam, latent_hw) -> problems.Problem:
  (_, ugraph, uparams), (_, vgraph, vparams), (scfg, sgraph, sparams) = unet, vae, sam
  apply = problems.unet_apply(ugraph)
  to_np = lambda t: np.ascontiguousarray(t.detach().cpu().numpy())
  def sdxl(c):
    return {"context": to_np(c["text_embedding"]),
            "pooled": to_np(c["unet_added_conditions"]["text_embeds"]),
            "time_ids": to_np(c["unet_added_conditions"]["time_ids"])}
  cond, real_cond = sdxl(ref.cond), sdxl(ref.real)
  real = to_np(ref.real["latents"]).transpose(0, 2, 3, 1)               # [B, h, w, 4]
  b = real.shape[0]
  rng = np.random.default_rng(0)
  pair_noise = rng.standard_normal(real.shape).astype(np.float32)
  from adm_jax.models import sam as sam_lib

  def decode(p, z):
    return jnp.clip(nnx.merge(vgraph, p).decode(z), -1.0, 1.0)

  def pixel(p, images):
    out = nnx.merge(sgraph, p)(sam_lib.preprocess(images, scfg.image_size),
                               feature_layers=(2, 4), neck=False)
    return {f"layer_{i}": f for i, f in out["layers"].items()}

  def batch(step, needs=frozenset()):
    del step
    out = dict(cond=cond, uncond={**{k: np.zeros_like(v) for k, v in cond.items()
                                     if k != "time_ids"}, "time_ids": cond["time_ids"]})
    if "real" in needs:
      out.update(real=real, real_cond=real_cond)
    if "pairs" in needs:
      out.update(pair_noise=pair_noise, pair_latent=real)
    return out

  del b
  param = teacher_lib.make_parameterization(config_lib.sdxl_teacher())
  return problems.Problem(
      param=param, teacher=apply, frozen={"teacher": uparams, "decoder": vparams,
                                          "pixel": sparams},
      student=apply, student_params=uparams, latent_shape=(latent_hw, latent_hw, 4),
      batch=batch, decode=decode, pixel=pixel)


def _config(method: str, levels: int):
  c = config_lib.load_config_file(f"configs/sdxl_onestep.py:method={method}")
  c.ttur = 1
  c.mesh = config_lib.mesh(data=-1)
  c.sharding_rules = config_lib.REPLICATE_RULES
  names = [f"down_{i}" for i in range(levels)] + ["mid"]
  if method != "dmd2":
    c.disc.features = tuple(names[-3:])
  c.disc.pixel.head_kw = dict(hidden=64)
  return config_lib.validate(c)


def _jax_iteration(method, problem, levels, mesh):
  c = _config(method, levels)
  b = train.build(c, mesh, problem, method)
  jitted, batch_sh, frozen_sh = train.jit_plan(b, problem, mesh)
  frozen = jax.device_put(problem.frozen, frozen_sh)
  batch = jax.device_put(problem.batch(0, b.needs), batch_sh)
  holder = {"state": jax.jit(b.init, out_shardings=b.shardings)(*b.init_args), "i": 0}

  def iteration():
    holder["i"] += 1
    state = holder["state"]
    for j, (_, fn, _) in enumerate(jitted):
      state, metrics = fn(state, frozen, batch, jax.random.key(holder["i"] * 10 + j))
    jax.block_until_ready((state, metrics))
    holder["state"] = state
  return iteration


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", choices=("small", "mid"), default="mid")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--methods", default="dmd2,adm,adp")
  ap.add_argument("--conv-lowering", default="auto", choices=layers.CONV_LOWERINGS,
                  help="how our convolutions lower (adm_jax.models.layers.conv_lowering)")
  args = ap.parse_args(argv)
  import torch
  unet_cfg = ref_lib.SMALL if args.config == "small" else ref_lib._mid_size_config()
  latent = 16 if args.config == "small" else 32
  levels = len(unet_cfg["block_out_channels"])
  ref = ref_lib.build_reference(unet_cfg, batch=args.batch, latent_hw=latent)
  n_params = sum(p.numel() for p in ref.real_unet.parameters())
  with tempfile.TemporaryDirectory() as tmp:
    models = _jax_models(ref, Path(tmp))
  problem = _problem(ref, *models, latent)
  mesh = sharding.make_mesh(config_lib.mesh(data=-1))
  rows = []
  for method in args.methods.split(","):
    t0 = time.perf_counter()
    ours = _jax_iteration(method, problem, levels, mesh)
    with layers.conv_lowering(args.conv_lowering):
      ours()                                                # trace, compile, first run
    compile_s = time.perf_counter() - t0
    if method == "dmd2":
      ref.iteration()                                       # warm-up
      jax_ms, torch_ms = (1e3 * m for m in _interleaved_medians([ours, ref.iteration],
                                                                 args.repeats))
    else:
      jax_ms, torch_ms = 1e3 * _interleaved_medians([ours], args.repeats)[0], None
    rows.append((method, jax_ms, torch_ms, compile_s))
  print(f"\nSDXL-architecture UNet '{args.config}' ({n_params / 1e6:.0f} M params), "
        f"latents {latent}x{latent}x4, batch {args.batch}, float32, TTUR 1, median of "
        f"{args.repeats}; {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores, conv lowering {args.conv_lowering}, torch "
        f"{torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print("| method (one iteration) | adm_jax ms | PyTorch/diffusers ms | torch / ours | "
        "adm_jax compile s |")
  print("|---|---|---|---|---|")
  names = {"dmd2": "DMD2 (fake score + GAN head, generator)",
           "adm": "ADM (fake score, discriminator, generator)",
           "adp": "ADP (latent + SAM pixel discriminators, generator)"}
  for method, j, t, comp in rows:
    tt = f"{t:.0f}" if t else "-"
    ratio = f"{t / j:.2f}x" if t else "-"
    print(f"| {names[method]} | {j:.0f} | {tt} | {ratio} | {comp:.0f} |")
  return rows


if __name__ == "__main__":
  main()
