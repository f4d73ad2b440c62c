r"""ADM's second stage of DMDX on the digits, swept from one ADP generator.

  python benchmarks/digits_adm_sweep.py --from DIR/dmdx_seed0 --pairs DIR/pairs \
      --seed 0 --out /tmp/adm_sweep \
      --runs 'dt64:hparams.adm_dt_fraction=0.015625' \
             'dt075_lr1e5:hparams.adm_dt_fraction=0.75,dmdx.adm_optim.generator.lr=1e-5'

``--from`` is a finished (or ADP-finished) ``configs/digits_dmdx.py`` run, e.g. one of
``benchmarks/digits_table.py``'s ``dmdx_seed{N}`` folders: its checkpoint at the end of
ADP (step ``dmdx.adp_steps``) is copied into ``OUT/NAME`` and ADM runs from it with the
run's overrides on top of ``configs/digits_dmdx.py`` (same seed, so every run starts
from the same generator, fake score and heads, and sees the same data). ADP is not run
again. Prints per run: FID / alignment / diversity after ADM (``config.eval``; 1000
samples by default), the ADP generator's own row, and the ADM discriminator's hinge loss
(2 is chance) at each logged step.
"""
from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adm_jax import config_lib, evaluation, train  # noqa: E402
from adm_jax import teacher as teacher_lib  # noqa: E402


def parse_run(spec: str) -> tuple[str, dict]:
  """``NAME:key=value,key=value`` (values as Python literals) -> (NAME, overrides)."""
  name, _, rest = spec.partition(":")
  over = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise SystemExit(f"--runs {spec!r}: {item!r} is not key=value")
    over[key] = ast.literal_eval(value)
  return name, over


def run_one(name: str, over: dict, args) -> dict:
  config = config_lib.load_config_file(
      f"{ROOT / 'configs' / 'digits_dmdx.py'}:variant={args.variant}")
  config.seed = args.seed
  config.pairs.dir = str(args.pairs)
  config_lib.override(config, over)
  config = config_lib.validate(config)
  adp_end = config.dmdx.adp_steps
  src = args.src / "checkpoints" / str(adp_end)
  if not src.is_dir():
    raise SystemExit(f"--from {args.src}: no checkpoint at the end of ADP ({src})")
  run = args.out / name
  if not run.exists():                  # a re-run resumes (or just reports) a run
    shutil.copytree(src, run / "checkpoints" / str(adp_end))
    adp_row = [r for r in evaluation.read_results(args.src) if r["step"] == adp_end]
    (run / evaluation.RESULTS).parent.mkdir()
    (run / evaluation.RESULTS).write_text(
        "".join(json.dumps(r) + "\n" for r in adp_row))
  teacher_lib.prepare(config, args.out)
  train.train_and_evaluate(config, str(run))
  rows = evaluation.read_results(run)
  hinge = [m["discriminator/loss"] for m in map(json.loads, (run / "metrics.jsonl")
                                                           .read_text().splitlines())
           if m["step"] > adp_end and "discriminator/loss" in m]
  return {"run": name, "overrides": over, "adp": rows[0], "adm": rows[-1], "hinge": hinge}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--from", dest="src", type=Path, required=True)
  ap.add_argument("--pairs", type=Path, required=True, help="the run's ODE-pair folder")
  ap.add_argument("--seed", type=int, default=0, help="the --from run's seed")
  ap.add_argument("--out", type=Path, required=True)
  ap.add_argument("--variant", default="full", help="the --from run's config variant")
  ap.add_argument("--runs", nargs="+", required=True, help="NAME:key=value,...")
  args = ap.parse_args(argv)
  results = [run_one(*parse_run(spec), args) for spec in args.runs]
  print(evaluation.format_table([{
      "run": r["run"],
      "overrides": ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(config)",
      "samples": r["adm"]["samples"], "FID after ADP": r["adp"]["fid"],
      **{k: r["adm"][k] for k in ("fid", "alignment", "diversity")},
      "ADM hinge (2: chance)": " ".join(f"{h:.2f}" for h in r["hinge"])} for r in results],
      ["run", "overrides", "samples", "FID after ADP", "fid", "alignment", "diversity",
       "ADM hinge (2: chance)"]))
  (args.out / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
  return results


if __name__ == "__main__":
  main()
