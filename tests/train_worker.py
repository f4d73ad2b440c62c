"""A training process for the multi-process tests: ``python tests/train_worker.py
--workdir=W [--stop_at=S] [--coordinator_address=127.0.0.1:P --num_processes=2
--process_id=i]`` trains the tiny toy config (``configs/toy.py:method=dmd2,variant=tiny``
on every device of the run, data split over processes) and writes what this process
saw to ``W/worker_<i>_<stop_at or end>.json``: every logged loss (on every process, not
only process 0) and the l2 norm of each network's parameters."""
import json
import os
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
_WORKDIR = flags.DEFINE_string("workdir", None, "")
_STOP = flags.DEFINE_integer("stop_at", None, "")
_COORD = flags.DEFINE_string("coordinator_address", None, "")
_NPROC = flags.DEFINE_integer("num_processes", None, "")
_PID = flags.DEFINE_integer("process_id", None, "")


def main(argv):
  del argv
  from adm_jax import multihost
  multihost.initialize(_COORD.value, _NPROC.value, _PID.value, timeout_s=60)
  import jax
  from adm_jax import config_lib, metrics, train, tree
  os.chdir(ROOT)
  config = config_lib.load_config_file("configs/toy.py:method=dmd2,variant=tiny")
  config_lib.override(config, {"total_steps": 6, "log_every": 1, "checkpoint_every": 2,
                               "ttur": 2, "batch_size": 16})
  seen = []
  write = metrics.MetricWriter.write

  def record(self, step, scalars):           # every process keeps its own copy
    seen.append({"step": int(step), **{k: float(v) for k, v in scalars.items()
                                       if k.endswith("loss")}})
    write(self, step, scalars)
  metrics.MetricWriter.write = record
  state = train.train_and_evaluate(config, _WORKDIR.value, stop_at=_STOP.value)
  norms = jax.jit(lambda s: {n: tree.l2_norm(getattr(s, n).params)
                             for n in ("generator", "fake_score", "discriminator")})(state)
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "devices": jax.device_count(), "losses": seen,
         "norms": {k: float(v) for k, v in jax.device_get(norms).items()}}
  tag = _STOP.value if _STOP.value is not None else "end"
  Path(_WORKDIR.value, f"worker_{jax.process_index()}_{tag}.json").write_text(json.dumps(out))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  app.run(main)
