r"""Per-layer convolution time on this CPU: XLA's convolution vs the patch matmul of
``adm_jax.models.layers.conv_patches`` vs torch (oneDNN), forward and forward + backward,
on the 3x3 layers of SDXL-shaped UNets (stride 1, same padding, float32).

  python benchmarks/conv_lowering.py [--repeats 9] [--shapes 2x8x512,2x32x128]

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
  fb = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(fn(x, w))), argnums=(0, 1)))
  return (_median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
          _median_ms(lambda: jax.block_until_ready(fb(x, w)), repeats))


def _torch_times(x, w, repeats):
  import torch
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
  wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_()

  def fwd():
    with torch.no_grad():
      torch.nn.functional.conv2d(xt, wt, padding=1)

  def fb():
    xt.grad = wt.grad = None
    torch.nn.functional.conv2d(xt, wt, padding=1).square().sum().backward()
  return _median_ms(fwd, repeats), _median_ms(fb, repeats)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--shapes", default=SHAPES)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  print(f"3x3 convolution, float32, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU "
        f"cores; ms, median of {args.repeats}")
  print("| B x side x C | XLA conv fwd | patches fwd | torch fwd | XLA conv fwd+bwd | "
        "patches fwd+bwd | torch fwd+bwd | auto picks |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for spec in args.shapes.split(","):
    b, s, c = (int(v) for v in spec.split("x"))
    x = rng.standard_normal((b, s, s, c), np.float32)
    w = (rng.standard_normal((3, 3, c, c)) * 0.02).astype(np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    np.testing.assert_allclose(np.asarray(_patches(xj, wj)), np.asarray(_xla(xj, wj)),
                               rtol=1e-4, atol=1e-4)
    xla = _jax_times(_xla, xj, wj, args.repeats)
    pat = _jax_times(_patches, xj, wj, args.repeats)
    tor = (None, None) if args.no_torch else _torch_times(x, w, args.repeats)
    pick = "patches" if layers._use_patches(xj, (3, 3), (1, 1), ((1, 1), (1, 1))) else "xla"
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"| {spec} | {fmt(xla[0])} | {fmt(pat[0])} | {fmt(tor[0])} | {fmt(xla[1])} | "
          f"{fmt(pat[1])} | {fmt(tor[1])} | {pick} |", flush=True)
    rows.append(dict(shape=spec, xla=xla, patches=pat, torch=tor, auto=pick))
  return rows


if __name__ == "__main__":
  main()
