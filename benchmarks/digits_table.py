r"""The embedded digits benchmark: one table, same evaluation for every row.

  python benchmarks/digits_table.py [--seeds 0,1] [--workdir /tmp/digits_table]
      [--rows teacher,regression,dmd2_1,dmd2_4,adp,adm,dmdx] [--json out.json]
      [--merge a.json,b.json] [--rescore N]

``--merge`` adds the rows of earlier ``--json`` outputs to the table (run the rows as
several invocations, then ``--rows= --merge ...`` prints the one table of them all).
``--rescore N`` trains nothing: it scores every row again on N samples per digit, the
students from the last checkpoint of their runs in ``--workdir`` (``--mode=eval``), the
teacher by sampling again (FID's bias and noise shrink with N; compare rows at one N).

Rows: the teacher (Euler 25 and 50 steps with CFG; DDIM 1 / 2 / 4 steps as reference
points), plain ODE-pair regression (MSE, one step: ADM's ablation A1), DMD2 one-step and
four-step, ADP only, ADM without ADP, and DMDX. Every student row is the main job of
``configs/digits_dmdx.py`` / ``configs/digits_dmd2.py`` (same teacher, pairs, batch and
iteration budget) run once per seed; every row is scored on the same number of samples
(``config.eval``: 100 per digit) by the shipped digit classifier: FID against the
held-out digits, alignment (fraction classified as the prompted digit) and diversity
(mean pairwise feature distance within a prompt). Means ± spread over the seeds, and
the wall time of each run (pairs included the first time they are written).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from adm_jax import config_lib, evaluation, pairs, train
from adm_jax import teacher as teacher_lib

STUDENTS = {   # row -> (config file argument, label)
    "regression": ("configs/digits_dmdx.py:method=regression",
                   "ODE-pair regression (MSE, 1 step; ADM A1)"),
    "dmd2_1": ("configs/digits_dmd2.py", "DMD2, 1 step"),
    "dmd2_4": ("configs/digits_dmd2.py:steps=4", "DMD2, 4 steps"),
    "adp": ("configs/digits_dmdx.py:method=adp", "ADP only (1 step)"),
    "adm": ("configs/digits_dmdx.py:method=adm", "ADM without ADP (1 step)"),
    "dmdx": ("configs/digits_dmdx.py", "DMDX: ADP then ADM (1 step)"),
}
TEACHER = (("euler", 25), ("euler", 50), ("ddim", 1), ("ddim", 2), ("ddim", 4))


def teacher_rows(config, workdir: Path, seed: int) -> list[dict]:
  """The teacher's own samples of the evaluation prompts, scored like the students."""
  teacher_lib.prepare(config, workdir)
  teacher = teacher_lib.load_teacher(config.teacher)
  ev = evaluation.make(config.eval.evaluator)
  out = []
  for sampler, steps in TEACHER:
    t0 = time.perf_counter()
    images, labels = pairs.teacher_eval_samples(config, teacher, sampler, steps,
                                                jax.random.key(1000 + seed))
    scores = ev.evaluate(images, labels)
    out.append({"row": f"teacher, {sampler} {steps} step{'s' * (steps > 1)}, CFG "
                       f"{config.teacher.guidance_scale:g}", "seed": seed,
                "samples": len(labels), "wall_s": time.perf_counter() - t0, **scores})
  return out


def student_row(name: str, workdir: Path, seed: int, pairs_dir: Path,
                rescore: int = 0) -> dict:
  """Trains row ``name`` at ``seed`` (resuming a run already in ``workdir``) and returns
  its final evaluation; ``rescore``: trains nothing and scores the run's last checkpoint
  on that many samples per digit."""
  arg, label = STUDENTS[name]
  c = config_lib.load_config_file(arg)
  c.seed = seed
  c.pairs.dir = str(pairs_dir)          # one pair set for every row (written once)
  if rescore:
    c.eval.num_per_prompt = rescore
  c = config_lib.validate(c)
  run_dir = workdir / f"{name}_seed{seed}"
  t0 = time.perf_counter()
  teacher_lib.prepare(c, workdir)
  if rescore:
    train.evaluate_checkpoint(c, str(run_dir))
  else:
    train.train_and_evaluate(c, str(run_dir))
  wall = time.perf_counter() - t0
  last = evaluation.read_results(run_dir)[-1]
  return {"row": label, "seed": seed, "samples": last["samples"],
          ("eval_s" if rescore else "wall_s"): wall,
          **{k: last[k] for k in ("fid", "alignment", "diversity", "reference_diversity")},
          "grid": last["grid"]}


def summarise(rows: list[dict]) -> list[dict]:
  """Mean and spread (max - min) / 2 over seeds, per row label and sample count, in
  first-seen order (``wall_s`` only where every seed has it: not for rescored rows)."""
  out = {}
  for r in rows:
    out.setdefault((r["row"], r.get("samples", 1000)), []).append(r)
  table = []
  for (label, samples), rs in out.items():
    row = {"row": label, "samples": samples, "seeds": len(rs)}
    for k in ("fid", "alignment", "diversity", "wall_s"):
      if not all(k in r for r in rs):
        row[k] = "–"
        continue
      v = np.array([r[k] for r in rs], float)
      fmt = ".0f" if k == "wall_s" else ".3g"
      row[k] = f"{v.mean():{fmt}} ± {(v.max() - v.min()) / 2:.2g}" if len(v) > 1 \
          else f"{v.mean():{fmt}}"
    table.append(row)
  return table


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--workdir", default="/tmp/digits_table")
  ap.add_argument("--rows", default="teacher," + ",".join(STUDENTS))
  ap.add_argument("--json", default="")
  ap.add_argument("--merge", default="", help="earlier --json outputs to include")
  ap.add_argument("--rescore", type=int, default=0,
                  help="train nothing: score the runs in --workdir on N samples per digit")
  args = ap.parse_args(argv)
  workdir = Path(args.workdir)
  seeds = [int(s) for s in args.seeds.split(",")]
  names = [n for n in args.rows.split(",") if n]
  unknown = set(names) - set(STUDENTS) - {"teacher"}
  if unknown:
    raise SystemExit(f"unknown rows {sorted(unknown)}; valid: teacher, {', '.join(STUDENTS)}")
  base = config_lib.validate(config_lib.load_config_file("configs/digits_dmdx.py"))
  if args.rescore:
    base.eval.num_per_prompt = args.rescore
  rows = []
  for path in filter(None, args.merge.split(",")):
    rows += json.loads(Path(path).read_text())
  for seed in seeds:
    for name in names:
      new = teacher_rows(base, workdir, seed) if name == "teacher" else [
          student_row(name, workdir, seed, workdir / "pairs", args.rescore)]
      rows += new
      for r in new:
        print(json.dumps(r), flush=True)
      if args.json:                  # after every row: a killed run keeps what it did
        Path(args.json).write_text(json.dumps(rows, indent=1))
  if not rows:
    raise SystemExit("no rows: name some with --rows or --merge earlier --json outputs")
  order = {label: i for i, label in enumerate(
      [f"teacher, {s} {n} step{'s' * (n > 1)}" for s, n in TEACHER]
      + [label for _, label in STUDENTS.values()])}
  rows.sort(key=lambda r: (next((i for k, i in order.items() if r["row"].startswith(k)),
                                len(order)), r["seed"]))
  ref = rows[-1]["reference_diversity"]
  seeds_seen = sorted({r["seed"] for r in rows})
  print(f"\nDigits benchmark: samples per row as listed ({len(base.eval.prompts)} digits, "
        f"equal counts), FID on the shipped classifier's features vs the held-out digits; "
        f"held-out diversity {ref:.3f}; seeds {seeds_seen}; "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  print(evaluation.format_table(summarise(rows), ["row", "samples", "seeds", "fid",
                                                  "alignment", "diversity", "wall_s"]))
  return rows


if __name__ == "__main__":
  main()
