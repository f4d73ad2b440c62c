r"""Does the full-size SDXL distillation fit a TPU slice? Per-chip HBM and FLOPs.

  python benchmarks/compile_memory.py [--targets v5p-8,v5p-64] [--batches 32,64,128] \
      [--methods dmdx,dmd2_4] [--remat full] [--teacher_param_dtype float32] [--scan 1] \
      [--pixel_microbatches 0] [--results benchmarks/results/compile_memory.json]
  python benchmarks/compile_memory.py --table_only 1      # print what the results hold

For each method (``dmdx``: DMDX one-step, ADP then ADM; ``dmd2_4``: DMD2 four-step with
backward simulation) of ``configs/sdxl_onestep.py`` (SDXL base 1.0 UNet as teacher,
generator and fake score, discriminator heads, SAM ViT-H pixel encoder for ADP, every
Adam state; bf16 teacher compute) every step function is compiled by the TPU compiler
for the target's topology (``pip install -e ".[tpu]"``; no weights are read, nothing
runs), each in its own process by default (``--isolate 0``: all in this one), with all
parameters and optimiser states FSDP-sharded over every chip and the batch over the same
axis.

A full-size step compiles in 7-30 minutes and up to ~22 GB of host RAM, so the grid is
built up over several runs: every compiled step goes into the results file at once, and
a step already there (same method, target, batch and settings) is not compiled again.
Per (method, target) the batches go smallest first and each batch's steps largest first
(by what the results hold for the method): once a step is out of HBM the batch does not
fit, its other steps are not compiled, and larger batches are marked as not compiled
(memory per chip only grows with the batch).

Prints one row per (method, target, batch): the peak per chip (the largest step function:
arguments + outputs + temporaries + code, state donated), its share of HBM, whether it
fits and FLOPs per iteration per chip (every step once; DMD2's backward-simulation loop
body counts once); then one row per step; then, per method and target, the largest batch
that fits under 80 % of HBM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
RESULTS = ROOT / "benchmarks" / "results" / "compile_memory.json"
# What makes two measurements of one step the same measurement.
KEY = ("method", "target", "batch", "remat", "scan", "teacher_param_dtype",
       "pixel_microbatches")
GiB = 2 ** 30


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


# ------------------------------------------------------------------------------ results


def load(path: Path) -> list[dict]:
  """The results file's entries (one per KEY, each with its step rows); [] if none."""
  if not path.exists() or not path.read_text().strip():
    return []
  entries = json.loads(path.read_text())
  if not isinstance(entries, list) or any(
      not isinstance(e, dict) or set(KEY) - set(e) or "steps" not in e for e in entries):
    raise ValueError(f"{path}: not a compile_memory results file (a list of entries with "
                     f"{', '.join(KEY)} and steps)")
  return entries


def save(path: Path, entries: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(entries, indent=1, default=str) + "\n")
  os.replace(tmp, path)                       # a killed run never leaves half a file


def entry_for(entries: list[dict], key: dict) -> dict:
  for e in entries:
    if all(e[k] == key[k] for k in KEY):
      return e
  entries.append({**key, "steps": []})
  return entries[-1]


def status(e: dict) -> str:
  """``fits`` / ``out of HBM`` / ``not compiled: ...`` / ``k of n steps``."""
  if e.get("skipped"):
    return "not compiled: " + e["skipped"]
  if any("error" in r for r in e["steps"]):
    return "out of HBM"
  done = {f"{r['stage']}/{r['step']}" for r in e["steps"]}
  crashed = [c["step"] for c in e.get("crashes", ()) if c["step"] not in done]
  if crashed:
    return f"compile failed on {crashed[-1]}"
  n = len(e.get("step_names") or e["steps"])
  return "complete" if len(e["steps"]) >= n else f"{len(e['steps'])} of {n} steps"


def _largest_first(names: list[str], entries: list[dict], method: str) -> list[str]:
  """``names`` ordered by the largest share of HBM any result of ``method`` gives each
  step (out of HBM counts as largest); steps without a result keep their order, last."""
  share = {}
  for e in entries:
    for r in e["steps"] if e["method"] == method else ():
      s = 2.0 if "error" in r else r["total_bytes"] / e["hbm"]
      k = f"{r['stage']}/{r['step']}"
      share[k] = max(share.get(k, 0.0), s)
  return sorted(names, key=lambda n: -share.get(n, -1.0))


# ------------------------------------------------------------------------------ compiling


def measure(args, entries: list[dict]) -> None:
  for method in args.methods.split(","):
    if method not in METHODS:
      raise SystemExit(f"--methods: no method {method!r}; choose from {', '.join(METHODS)}")
    for target_name in args.targets.split(","):
      target = compile_check.resolve_target(target_name, "tpu")
      too_big = None                          # the smallest batch found out of HBM
      for batch in sorted(map(int, args.batches.split(","))):
        mb = args.pixel_microbatches or max(1, batch // len(target.devices))
        key = {"method": method, "target": target_name, "batch": batch,
               "remat": args.remat, "scan": bool(args.scan),
               "teacher_param_dtype": args.teacher_param_dtype, "pixel_microbatches": mb}
        e = entry_for(entries, key)
        e.update(devices=len(target.devices), hbm=target.hbm_bytes)
        if too_big is not None and not e["steps"]:
          e["skipped"] = f"batch {too_big} is already out of HBM"
          save(args.results, entries)
          continue
        e.pop("skipped", None)
        config = config_for(method, target_name, batch, args.remat, args.teacher_param_dtype,
                            bool(args.scan), mb)
        e["step_names"] = compile_check.step_names(config, target)
        for step in _largest_first(e["step_names"], entries, method):
          if any("error" in r for r in e["steps"]):
            break                             # does not fit; the other steps cannot help
          if any(f"{r['stage']}/{r['step']}" == step for r in e["steps"]):
            continue
          print(f"{method} {target_name} batch {batch}: compiling {step} "
                f"({time.strftime('%H:%M:%S')})", flush=True)
          try:
            rows = (_isolated(key, step, args.stack_mb) if args.isolate else
                    _compile_here(config, target, step))
          except CompilerCrash as crash:
            print(f"    {step}: {crash}", flush=True)
            e.setdefault("crashes", []).append(
                {"step": step, "why": str(crash), "stack_mb": args.stack_mb,
                 "at": time.strftime("%Y-%m-%d %H:%M")})
            save(args.results, entries)
            break                             # next batch; a re-run tries this step again
          for r in rows:
            print("    " + _step_line(r), flush=True)
          e["steps"] += rows
          save(args.results, entries)
        if status(e) == "out of HBM":
          too_big = batch


def _compile_here(config, target, step: str) -> list[dict]:
  """``step``'s rows, each with the seconds its abstract build and compile took."""
  config.compile.steps = step
  t0 = time.perf_counter()
  rows = compile_check.compile_steps(config, target, log=lambda *_: None)
  for r in rows:
    r["compile_s"] = round(time.perf_counter() - t0, 1)
  return rows


class CompilerCrash(RuntimeError):
  """The child compiling one step died (a signal or an error exit), not out of HBM."""


def _stack_limit(mb: int):
  """For the child: thread stacks of ``mb`` MiB. glibc sizes every new thread's stack
  from RLIMIT_STACK at exec (8 MiB by default; 2 MiB if unlimited), and XLA's recursive
  passes overflow 8 MiB on a 32-chip SDXL step ("SIGSEGV STACK OVERFLOW")."""
  def set_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    soft = mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_STACK,
                       (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
  return set_limit


def _isolated(key: dict, step: str, stack_mb: int = 1024) -> list[dict]:
  """One step's rows from a child process (its host RAM is freed when it exits)."""
  with tempfile.TemporaryDirectory() as d:
    out = Path(d) / "rows.json"
    cmd = [sys.executable, __file__, "--child", json.dumps({**key, "step": step}),
           "--results", str(out)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, preexec_fn=_stack_limit(stack_mb))
    _, status, usage = os.wait4(child.pid, 0)
    code = child.returncode = os.waitstatus_to_exitcode(status)
    if code:
      raise CompilerCrash(
          f"compiling {step} failed after {time.perf_counter() - t0:.0f} s (exit {code}; "
          f"-9: the host ran out of memory; -6 or -11: the compiler crashed; "
          f"thread stacks {stack_mb} MiB; peak host RAM "
          f"{usage.ru_maxrss / 2 ** 20:.1f} GiB)")
    rows = json.loads(out.read_text())
    for row in rows:                   # this compile's peak host RAM (ru_maxrss: kB)
      row["host_rss_bytes"] = usage.ru_maxrss * 1024
    return rows


def _child(spec: str, out: Path) -> None:
  k = json.loads(spec)
  config = config_for(k["method"], k["target"], k["batch"], k["remat"],
                      k["teacher_param_dtype"], k["scan"], k["pixel_microbatches"])
  target = compile_check.resolve_target(k["target"], "tpu")
  out.write_text(json.dumps(_compile_here(config, target, k["step"]), default=str))


# ------------------------------------------------------------------------------ table


def _step_line(r: dict) -> str:
  what = f"{r['stage']}/{r['step']}: "
  if "error" in r:
    return what + r["error"]
  return what + (f"total {r['total_bytes'] / GiB:.1f} GiB (state {r['state_bytes'] / GiB:.1f}"
                 f", frozen {r['frozen_bytes'] / GiB:.1f}, temporaries {r['temp'] / GiB:.1f})"
                 f", {r['flops'] / 1e12:.1f} TFLOP")


def table(entries: list[dict]) -> str:
  entries = sorted(entries, key=lambda e: (list(METHODS).index(e["method"]), e["devices"],
                                           e["batch"], e["remat"]))
  lines = ["| method | target | global batch | peak HBM per chip | of HBM | fits | "
           "TFLOP per iteration per chip | remat | status |",
           "|---|---|---|---|---|---|---|---|---|"]
  best = {}
  for e in entries:
    st = status(e)
    done = [r for r in e["steps"] if "error" not in r]
    peak = max((r["total_bytes"] for r in done), default=None)
    if st == "out of HBM" or st.startswith("not compiled"):
      cells = ("–" if st.startswith("not") else "out of HBM", "> 100 %", "no", "–")
    elif peak is None:
      cells = ("–", "–", "?", "–")
    else:
      pre = "" if st == "complete" else "≥ "
      cells = (f"{pre}{peak / GiB:.1f} GiB", f"{pre}{100 * peak / e['hbm']:.0f} %",
               ("yes" if peak <= e["hbm"] else "no") if st == "complete" else
               ("no" if peak > e["hbm"] else "?"),
               f"{pre}{sum(r['flops'] for r in done) / 1e12:.1f}")
    lines.append(f"| {METHODS[e['method']][1]} | {e['target']} ({e['devices']} chips) | "
                 f"{e['batch']} | {' | '.join(cells)} | {e['remat']} | {st} |")
    k = (e["method"], e["target"])
    best.setdefault(k, [])
    if st == "complete" and peak < 0.8 * e["hbm"]:
      best[k].append(e["batch"])
  lines += ["", "| method / step | target | global batch | per chip: total (state, frozen, "
            "temporaries) | of HBM | TFLOP per chip | compile s | host RAM GiB |",
            "|---|---|---|---|---|---|---|---|"]
  for e in entries:
    for r in e["steps"]:
      what = f"{e['method']}, {r['stage']}/{r['step']}"
      if "error" in r:
        cells = "out of HBM | > 100 % | –"
      else:
        cells = (f"{r['total_bytes'] / GiB:.1f} GiB ({r['state_bytes'] / GiB:.1f}, "
                 f"{r['frozen_bytes'] / GiB:.1f}, {r['temp'] / GiB:.1f}) | "
                 f"{100 * r['total_bytes'] / e['hbm']:.0f} % | {r['flops'] / 1e12:.1f}")
      ram = f"{r['host_rss_bytes'] / GiB:.1f}" if r.get("host_rss_bytes") else "–"
      lines.append(f"| {what} | {e['target']} | {e['batch']} | {cells} | "
                   f"{r.get('compile_s') or '–'} | {ram} |")
  lines.append("")
  for (method, target), bs in best.items():
    lines.append(f"{METHODS[method][1]} on {target}: largest batch measured under 80 % of "
                 f"HBM: {max(bs) if bs else 'none'}")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--targets", default="v5p-8,v5p-64")
  ap.add_argument("--batches", default="32,64,128")
  ap.add_argument("--methods", default="dmdx,dmd2_4")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--teacher_param_dtype", default="float32",
                  help="storage of the frozen teacher (bfloat16 halves it)")
  ap.add_argument("--scan", type=int, default=1,
                  help="transformer stacks as lax.scan (config.scan_blocks; faster compiles)")
  ap.add_argument("--pixel_microbatches", type=int, default=0,
                  help="ADP's pixel branch in this many sequential passes "
                       "(config.pixel_microbatches; 0: one image per chip per pass)")
  ap.add_argument("--results", type=Path, default=RESULTS,
                  help="results file: read, extended step by step, rewritten atomically")
  ap.add_argument("--isolate", type=int, default=1,
                  help="compile each step function in its own process (peak host RAM of "
                       "one compile, not of all of them)")
  ap.add_argument("--stack_mb", type=int, default=1024,
                  help="each isolated compile's thread stack size (RLIMIT_STACK) in MiB")
  ap.add_argument("--table_only", type=int, default=0, help="print the results; compile nothing")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)   # one isolated step
  args = ap.parse_args()
  if args.child:
    return _child(args.child, args.results)
  entries = load(args.results)
  if not args.table_only:
    measure(args, entries)
  print(table(entries))


if __name__ == "__main__":
  main()
