r"""Per-layer convolution time on this CPU: XLA's convolution vs the patch matmul of
``adm_jax.models.layers.conv_patches`` vs torch (oneDNN), forward and forward + backward,
on the 3x3 layers of SDXL-shaped UNets (stride 1, same padding; float32, or bfloat16:
our arrays in bf16, torch under CPU autocast).

  python benchmarks/conv_lowering.py [--repeats 9] [--shapes 2x8x512,2x32x128]
      [--dtype bfloat16]

Each shape is ``batch x side x channels`` (in = out channels). Prints one row per shape
and which lowering ``layers.conv_lowering("auto")`` picks there. Medians after warm-up.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # torch's idle OpenMP threads spin

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from adm_jax.models import layers  # noqa: E402

# digits teacher (batch 64 = CFG pairs of 32), the mid-size benchmark UNet, SDXL's levels.
SHAPES = ("64x8x32,64x4x64,2x32x128,2x16x256,2x8x512,2x32x320,2x16x640,2x8x1280")


def _median_ms(fn, repeats):
  fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * float(np.median(ts))


def _xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _patches(x, w):
  return layers.conv_patches(x, w, (1, 1), ((1, 1), (1, 1)))


def _jax_times(fn, x, w, repeats):
  fwd = jax.jit(fn)
  fb = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(fn(x, w).astype(jnp.float32))),
                       argnums=(0, 1)))
  return (_median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
          _median_ms(lambda: jax.block_until_ready(fb(x, w)), repeats))


def _torch_times(x, w, repeats, bf16=False):
  import torch
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
  wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_()

  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

  def fwd():
    with torch.no_grad(), autocast():
      torch.nn.functional.conv2d(xt, wt, padding=1)

  def fb():
    xt.grad = wt.grad = None
    with autocast():
      y = torch.nn.functional.conv2d(xt, wt, padding=1)
    y.float().square().sum().backward()
  return _median_ms(fwd, repeats), _median_ms(fb, repeats)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--shapes", default=SHAPES)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  print(f"3x3 convolution, {args.dtype}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU "
        f"cores; ms, median of {args.repeats}")
  print("| B x side x C | XLA conv fwd | patches fwd | torch fwd | XLA conv fwd+bwd | "
        "patches fwd+bwd | torch fwd+bwd | auto picks |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for spec in args.shapes.split(","):
    b, s, c = (int(v) for v in spec.split("x"))
    x = rng.standard_normal((b, s, s, c), np.float32)
    w = (rng.standard_normal((3, 3, c, c)) * 0.02).astype(np.float32)
    xj, wj = jnp.asarray(x, args.dtype), jnp.asarray(w, args.dtype)
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(_patches(xj, wj), np.float32),
                               np.asarray(_xla(xj, wj), np.float32), rtol=tol, atol=tol)
    xla = _jax_times(_xla, xj, wj, args.repeats)
    pat = _jax_times(_patches, xj, wj, args.repeats)
    tor = (None, None) if args.no_torch else _torch_times(x, w, args.repeats,
                                                          bf16=args.dtype == "bfloat16")
    pick = "patches" if layers._use_patches(xj, (3, 3), (1, 1), ((1, 1), (1, 1))) else "xla"
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"| {spec} | {fmt(xla[0])} | {fmt(pat[0])} | {fmt(tor[0])} | {fmt(xla[1])} | "
          f"{fmt(pat[1])} | {fmt(tor[1])} | {pick} |", flush=True)
    rows.append(dict(shape=spec, xla=xla, patches=pat, torch=tor, auto=pick))
  return rows


if __name__ == "__main__":
  main()
