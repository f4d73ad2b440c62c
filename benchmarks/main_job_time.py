r"""Wall time of the product's main job on a fresh work directory, as a user runs it.

  python benchmarks/main_job_time.py [--config configs/digits_dmdx.py] [--workdir DIR]

Runs ``python -m adm_jax.main --config=CONFIG --workdir=DIR`` in a new process on an
empty ``DIR`` (a temporary one by default): teacher conversion, ODE pairs, every
training stage and every evaluation are inside the time, exactly as on a fresh machine.
Streams the job's output, then prints the wall time, the machine's CPU count and the
job's last results row. Fails if ``DIR`` is not empty (a resumed job is not a fresh one).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adm_jax import evaluation  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/digits_dmdx.py")
  ap.add_argument("--workdir", default="")
  args = ap.parse_args(argv)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="main_job_"))
  if workdir.exists() and any(workdir.iterdir()):
    raise SystemExit(f"{workdir} is not empty: the main job must start fresh")
  cmd = [sys.executable, "-m", "adm_jax.main", f"--config={args.config}",
         f"--workdir={workdir}"]
  print("running:", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True)
  wall = time.perf_counter() - t0
  results = evaluation.read_results(workdir)
  last = results[-1] if results else {}
  cpus = len(os.sched_getaffinity(0))
  print(f"\nmain job {args.config}: wall {wall:.0f} s ({wall / 60:.1f} min) on {cpus} "
        f"CPU core{'s' * (cpus > 1)}; workdir {workdir}")
  if last:
    print("last evaluation:", {k: last[k] for k in ("step", "stage", "fid", "alignment",
                                                    "diversity") if k in last})
  return wall


if __name__ == "__main__":
  main()
