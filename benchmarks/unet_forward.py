"""JAX (jitted) vs diffusers/torch UNet forward time on this machine's CPU.

Builds the same mid-size SDXL-architecture UNet (``text_time`` conditioning, linear
projections, transformer depth per block) in diffusers, converts it with our converter,
and times one forward pass of each on the same inputs.

  python benchmarks/unet_forward.py [--batch 2] [--size 32] [--repeats 10] [--threads N]

Prints the median time of each (after warm-up / compilation), the ratio, and the max abs
difference of the two outputs.
"""
import argparse
import os
import tempfile
import time

import numpy as np

MID_SIZE = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512),
    layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                          "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256, cross_attention_dim=2048,
    norm_num_groups=32)


def _interleaved_medians(fns, repeats):
  """Median wall time of each function, calls interleaved so that load on the machine
  hits both alike."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return [float(np.median(ts)) for ts in times]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--size", type=int, default=32, help="latent height = width")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--conv-lowering", default="auto", choices=("auto", "xla", "patches"),
                  help="how our convolutions lower (adm_jax.models.layers.conv_lowering)")
  ap.add_argument("--grad", action="store_true",
                  help="time forward + backward (gradient of sum(out^2) for every "
                       "parameter) on both sides instead of the forward")
  ap.add_argument("--profile", default="",
                  help="also trace two JAX calls into this folder and print the share of "
                       "op time per kind of XLA:CPU op")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from diffusers import UNet2DConditionModel
  from flax import nnx

  from adm_jax.convert import unet as convert_unet
  from adm_jax.models import layers

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**MID_SIZE).eval()
  n_params = sum(p.numel() for p in ref.parameters())
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    _, graphdef, params = convert_unet.load(d)

  rng = np.random.default_rng(0)
  b, s = args.batch, args.size
  x = rng.standard_normal((b, 4, s, s), np.float32)
  t = np.linspace(1, 999, b).astype(np.float32)
  ctx = rng.standard_normal((b, 77, 2048), np.float32)
  pooled = rng.standard_normal((b, 1280), np.float32)
  tids = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (b, 1))

  tin = [torch.from_numpy(a) for a in (x, t, ctx, pooled, tids)]

  def torch_fwd():
    if args.grad:
      ref.zero_grad(set_to_none=True)
      out = ref(tin[0], tin[1], tin[2],
                added_cond_kwargs=dict(text_embeds=tin[3], time_ids=tin[4])).sample
      out.square().sum().backward()
      return out.detach()
    with torch.inference_mode():
      return ref(tin[0], tin[1], tin[2],
                 added_cond_kwargs=dict(text_embeds=tin[3], time_ids=tin[4])).sample

  def forward(params, x, t, cond):
    out = nnx.merge(graphdef, params)(x, t, cond)
    return jnp.sum(jnp.square(out)), out
  grad = jax.value_and_grad(forward, has_aux=True)
  if args.grad:                   # (output, gradients): the gradients are not pruned
    jax_fwd = jax.jit(lambda *a: (lambda r: (r[0][1], r[1]))(grad(*a)))
  else:
    jax_fwd = jax.jit(lambda *a: forward(*a)[1])

  params = jax.device_put(params)
  jin = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
         dict(context=jnp.asarray(ctx), pooled=jnp.asarray(pooled), time_ids=jnp.asarray(tids)))
  first = lambda r: r[0] if args.grad else r
  t0 = time.perf_counter()
  with layers.conv_lowering(args.conv_lowering):
    out = first(jax.block_until_ready(jax_fwd(params, *jin)))
  compile_s = time.perf_counter() - t0
  out_t = torch_fwd()
  diff = float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - out_t.numpy()).max())

  tj, tt = _interleaved_medians(
      [lambda: jax.block_until_ready(jax_fwd(params, *jin)), torch_fwd], args.repeats)
  if args.profile:
    _print_profile(args.profile, lambda: jax.block_until_ready(jax_fwd(params, *jin)))
  print(f"UNet {'forward + backward' if args.grad else 'forward'}, "
        f"{n_params / 1e6:.1f}M params, batch {b}, latent {s}x{s}, "
        f"context 77x2048, float32, {args.threads} CPU threads, conv lowering "
        f"{args.conv_lowering}")
  print(f"  jax   (jit, median of {args.repeats}, interleaved): {tj * 1e3:8.1f} ms  "
        f"(first call incl. compile {compile_s:.1f} s)")
  print(f"  torch (eager, median of {args.repeats}): {tt * 1e3:8.1f} ms")
  print(f"  ratio torch/jax: {tt / tj:.2f}x  (>1 means JAX is faster)")
  print(f"  max |jax - torch|: {diff:.2e}")


def _print_profile(folder, call):
  """Share of XLA:CPU op time per op kind (HLO name without its number) over two calls."""
  import collections
  import glob
  import re

  import jax
  from jax.profiler import ProfileData
  jax.profiler.start_trace(folder)
  call()
  call()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{folder}/plugins/profile/*/*.xplane.pb"))[-1]
  per_kind = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:             # the threads that run the ops
        continue
      for ev in line.events:
        if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
          per_kind[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns
  total = sum(per_kind.values())
  print(f"  XLA:CPU op time by kind ({path}):")
  for kind, ns in per_kind.most_common(8):
    print(f"    {100 * ns / total:5.1f} %  {kind}")


if __name__ == "__main__":
  main()
