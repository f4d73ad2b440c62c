r"""Mode coverage on the exact-score toy: DMD (no GAN), DMD2, ADM and DMDX one-step
students of an unconditional 8-mode ring, with the same number of iterations each.

  python benchmarks/toy_modes.py [--steps 1500] [--seeds 0,1] [--samples 4000]

Prints per method and seed: modes covered (of 8), fraction of samples inside a mode
(3 std), MMD and sliced Wasserstein-1 to exact data samples, generator updates and wall
time; the teacher's own 25-step DDIM samples are the reference row.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from adm_jax import config_lib, problems, sampling, sharding, train
from adm_jax.models import toy

METHODS = {"DMD (no GAN)": ("dmd2", {"dmd2.gan": False}), "DMD2": ("dmd2", {}),
           "ADM": ("adm", {}), "DMDX": ("dmdx", {})}


def config_for(method, overrides, steps, seed):
  c = config_lib.load_config_file(f"configs/toy.py:method={method}")
  c.toy.conditional = False
  c.total_steps = steps
  c.dmdx.adp_steps = steps // 2
  c.log_every = steps
  c.checkpoint_every = steps
  c.seed = seed
  config_lib.override(c, overrides)
  return config_lib.validate(c)


def scores(samples, mixture, ref):
  return dict(modes=float(toy.mode_coverage(samples, mixture)) * mixture.num_modes,
              in_mode=float(toy.in_mode_fraction(samples, mixture)),
              mmd=float(toy.mmd(samples, ref)),
              sw1=float(toy.sliced_wasserstein(samples, ref)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--samples", type=int, default=4000)
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = ap.parse_args(argv)
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    base = config_for("dmd2", {}, args.steps, seed)
    mixture = toy.ToyMixture.ring(**base.toy.mixture)
    ref = mixture.sample(jax.random.key(1000 + seed), args.samples)
    noise = jax.random.normal(jax.random.key(2000 + seed), (args.samples, mixture.dim))
    cond = {"label": np.full((args.samples,), toy.NULL_LABEL, np.int32)}
    teacher = mixture.teacher_apply(
        problems.teacher_lib.make_parameterization(base.teacher))
    ode = jax.jit(sampling.make_ode_sampler(teacher, problems.teacher_lib.
                                            make_parameterization(base.teacher), 25))
    rows.append(("teacher, 25-step DDIM", seed, 0, 0.0,
                 scores(ode({}, noise, cond, cond), mixture, ref)))
    for name in args.methods.split(","):
      method, overrides = METHODS[name]
      c = config_for(method, overrides, args.steps, seed)
      t0 = time.perf_counter()
      with tempfile.TemporaryDirectory() as work:
        state = train.train_and_evaluate(c, work)
      wall = time.perf_counter() - t0
      mesh = sharding.make_mesh(c.mesh)
      nets = train.build(c, mesh, problems.make(c, mesh), train.stages(c)[-1].method).nets
      samples = train.sample_generator(nets, state.generator.params, noise, cond)
      rows.append((name, seed, int(state.generator.step), wall,
                   scores(samples, mixture, ref)))
  print(f"\nexact-score toy, unconditional 8-mode ring, one-step students, "
        f"{args.steps} iterations each, {args.samples} samples; {jax.devices()[0].platform}"
        f" x{jax.device_count()}, {os.cpu_count()} CPU cores")
  print("| method | seed | modes covered (of 8) | in-mode fraction | MMD | SW1 | "
        "G updates | wall s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, seed, g, wall, s in rows:
    print(f"| {name} | {seed} | {s['modes']:.0f} | {s['in_mode']:.3f} | {s['mmd']:.4f} | "
          f"{s['sw1']:.4f} | {g} | {wall:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dict(method=n, seed=sd, generator_updates=g, wall_s=w, **s)
                 for n, sd, g, w, s in rows], f, indent=1)
  return rows


if __name__ == "__main__":
  sys.exit(main() and 0)
