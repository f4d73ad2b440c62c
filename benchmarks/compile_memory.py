r"""Does the full-size SDXL distillation fit a TPU slice? Per-device HBM and FLOPs.

  python benchmarks/compile_memory.py [--targets v5p-8,v5p-64] [--batches 32,64,128] \
      [--methods dmdx,dmd2_4] [--remat none] [--teacher_param_dtype float32] [--scan 1]
      [--json out.json]

For each method (``dmdx``: DMDX one-step, ADP then ADM; ``dmd2_4``: DMD2 four-step with
backward simulation) of ``configs/sdxl_onestep.py`` (SDXL base 1.0 UNet as teacher,
generator and fake score, discriminator heads, SAM ViT-H pixel encoder for ADP, every
Adam state; bf16 teacher compute) every step function is compiled by the TPU compiler
for the target's topology (``pip install -e ".[tpu]"``; no weights are read, nothing
runs), each in its own process by default (``--isolate 0``: all in this one), with all
parameters and optimiser states FSDP-sharded over every chip and the batch over the same
axis. One row per (method, target, batch): the peak per device (the largest step
function: arguments + outputs + temporaries + code, state donated), its share of HBM,
whether it fits, and FLOPs per iteration per device (every step once; DMD2's
backward-simulation loop body counts once). Then, per method and target, the largest
batch of those tried that fits under 80 % of HBM.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")        # libtpu compiles; nothing runs here

from adm_jax import compile_check, config_lib  # noqa: E402

METHODS = {"dmdx": ("configs/sdxl_onestep.py", "DMDX one-step (ADP + ADM)"),
           "dmd2_4": ("configs/sdxl_onestep.py:method=dmd2,steps=4",
                      "DMD2 four-step (backward simulation)")}


def config_for(method: str, target: str, batch: int, remat: str, teacher_dtype: str,
               scan: bool, pixel_microbatches: int = 1):
  c = config_lib.load_config_file(str(ROOT / METHODS[method][0]))
  config_lib.override(c, {"compile.target": target, "compile.batch_size": batch,
                          "compile.target_kind": "tpu",
                          "mesh": (("data", 1), ("fsdp", -1), ("tensor", 1)),
                          "sharding_rules": config_lib.FSDP_RULES,
                          "teacher.weights_dir": "/nonexistent",    # reference architecture
                          "disc.pixel.weights_dir": "",
                          "teacher.param_dtype": teacher_dtype,
                          "scan_blocks": scan, "pixel_microbatches": pixel_microbatches})
  c.disc.pixel.random_config = None
  for net in ("generator", "fake_score", "teacher", "decoder", "pixel"):
    c.remat[net] = remat
  return config_lib.validate(c)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--targets", default="v5p-8,v5p-64")
  ap.add_argument("--batches", default="32,64,128")
  ap.add_argument("--methods", default="dmdx,dmd2_4")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--teacher_param_dtype", default="float32",
                  help="storage of the frozen teacher (bfloat16 halves it)")
  ap.add_argument("--scan", type=int, default=1,
                  help="transformer stacks as lax.scan (config.scan_blocks; faster compiles)")
  ap.add_argument("--pixel_microbatches", type=int, default=1,
                  help="ADP's pixel branch in this many sequential passes "
                       "(config.pixel_microbatches)")
  ap.add_argument("--json", default="")
  ap.add_argument("--isolate", type=int, default=1,
                  help="compile each step function in its own process (peak host RAM of "
                       "one compile, not of all of them)")
  ap.add_argument("--steps", default="", help=argparse.SUPPRESS)   # one isolated step
  args = ap.parse_args()
  out, quiet = [], lambda *_: None
  for method in args.methods.split(","):
    for target_name in args.targets.split(","):
      for batch in map(int, args.batches.split(",")):
        config = config_for(method, target_name, batch, args.remat,
                            args.teacher_param_dtype, bool(args.scan),
                            args.pixel_microbatches)
        config.compile.steps = args.steps
        target = compile_check.resolve_target(target_name, "tpu")
        t0 = time.perf_counter()
        if args.isolate and not args.steps:
          rows = [r for step in compile_check.step_names(config, target)
                  for r in _isolated(args, method, target_name, batch, step)]
        else:
          rows = compile_check.compile_steps(config, target, log=quiet)
        s = compile_check.summary(rows, target)
        out.append({"method": method, "target": target_name, "batch": batch,
                    "devices": len(target.devices), "remat": args.remat,
                    "scan": bool(args.scan), "teacher_param_dtype": args.teacher_param_dtype,
                    "pixel_microbatches": args.pixel_microbatches,
                    "compile_s": time.perf_counter() - t0, "hbm": target.hbm_bytes, **s,
                    "steps": rows})
        print(_row(out[-1]), flush=True)
        for r in rows:
          print(f"    {r['stage']}/{r['step']}: " + (r.get("error") or (
              f"total {r['total_bytes'] / 2**30:.1f} GiB (state {r['state_bytes'] / 2**30:.1f}"
              f", frozen {r['frozen_bytes'] / 2**30:.1f}, temporaries {r['temp'] / 2**30:.1f})"
              f", {r['flops'] / 1e12:.1f} TFLOP")), flush=True)
        if args.json:
          Path(args.json).write_text(json.dumps(out, indent=1, default=str))
  print()
  print(table(out))


def _isolated(args, method, target, batch, step) -> list[dict]:
  """One step's rows from a child process running this script on that step alone."""
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, __file__, "--methods", method, "--targets", target,
           "--batches", str(batch), "--remat", args.remat, "--teacher_param_dtype",
           args.teacher_param_dtype, "--scan", str(args.scan), "--steps", step,
           "--pixel_microbatches", str(args.pixel_microbatches),
           "--isolate", "0", "--json", f.name]
    print(f"  {method} {target} batch {batch}: compiling {step} in a child process",
          flush=True)
    r = subprocess.run(cmd)                  # its output streams through (step by step)
    if r.returncode:
      raise RuntimeError(f"compiling {step} failed (exit {r.returncode}; -9 is the host "
                         "running out of memory)")
    return json.loads(Path(f.name).read_text())[0]["steps"]


def _row(r) -> str:
  needs = [m.group(1) for s in r["steps"] for m in [re.search(
      r"HLO temporaries \(([\d.]+G)\)", s.get("error", ""))] if m]
  peak = (f"out of HBM (temporaries {max(needs, key=lambda v: float(v[:-1]))})" if needs
          else "out of HBM") if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
  flops = "–" if r["peak_bytes"] is None else f"{r['iteration_flops'] / 1e12:.1f}"
  share = ("> 100 %" if r["peak_bytes"] is None else
           f"{100 * r['peak_bytes'] / r['hbm']:.0f} %")
  return (f"| {METHODS[r['method']][1]} | {r['target']} ({r['devices']} chips) | "
          f"{r['batch']} | {peak} | {share} | {'yes' if r['fits'] else 'no'} | "
          f"{flops} | {r['remat']} | {r['compile_s']:.0f} |")


def table(rows) -> str:
  lines = ["| method | target | global batch | peak HBM per chip | of HBM | fits | "
           "TFLOP per iteration per chip | remat | compile s |",
           "|---|---|---|---|---|---|---|---|---|"]
  lines += [_row(r) for r in rows]
  best = {}
  for r in rows:
    ok = r["peak_bytes"] is not None and r["peak_bytes"] < 0.8 * r["hbm"]
    key = (r["method"], r["target"])
    best.setdefault(key, None)
    if ok and (best[key] is None or r["batch"] > best[key]):
      best[key] = r["batch"]
  lines.append("")
  for (method, target), b in best.items():
    lines.append(f"{METHODS[method][1]} on {target}: largest batch tried under 80 % of "
                 f"HBM: {b if b is not None else 'none'}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
