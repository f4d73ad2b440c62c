r"""Entry point: ``python -m adm_jax.main --config=configs/<file>.py[:arg] --workdir=DIR``.

Modes:
  train   distil: the method in ``config.method`` through the one trainer
          (``adm_jax/train.py``), resuming from ``DIR/checkpoints`` if present.
  pairs   the ODE-pair job (``config.pairs``): teacher PF-ODE with CFG -> ArrayRecord
          shards in ``DIR/pairs`` (or ``config.pairs.dir``); resumable, idempotent.
  sample  load the converted teacher, run its PF-ODE sampler with CFG on
          ``config.sample.prompts`` and write ``DIR/samples.png`` (+ ``samples.npz``).
  eval    score the latest checkpoint's generator with ``config.eval`` (e.g. with more
          samples: ``--config.eval.num_per_prompt=500``); appends to DIR/eval/results.jsonl.
  check   validate the config and the teacher weights it names, print the model sizes.
  compile  build the whole state abstractly (no weights read), compile every step of
          the method for ``config.compile.target`` (a TPU topology such as v5p-8, or
          the CPU) and print memory per device and FLOPs per step (adm_jax/compile_check.py).
  pretrain  train ``config.pretrain.target`` (the digits VAE or teacher) and export it.

Multi-process: on a multi-host TPU slice every worker runs the same command and JAX
finds its peers itself; elsewhere pass ``--coordinator_address=host:port
--num_processes=N --process_id=i`` (or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``
/ ``JAX_PROCESS_ID``). SIGTERM makes every process save at one agreed step and exit 0.

Overrides: ``--config.a.b=value`` (the config is locked: unknown keys are an error that
lists the valid ones; enumerated values are checked against their choices).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adm_jax import config_lib

MODES = ("train", "eval", "pairs", "sample", "check", "compile", "pretrain")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (and :arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _main(argv):
  del argv
  # Orbax logs every save step at INFO; our own progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  config = config_lib.validate(_CONFIG.value)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  from adm_jax import multihost
  if _MODE.value == "compile" and "compile" not in config:
    raise config_lib.ConfigError("--mode=compile needs a training config (config.compile)")
  if _MODE.value == "compile" and config.compile.target != "local":
    from adm_jax import compile_check        # another machine's topology: this host alone
    compile_check.run(config)
    return
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if config.get("compilation_cache_dir"):
    import jax
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  if _MODE.value == "compile":                # this run's own devices (every host)
    from adm_jax import compile_check
    compile_check.run(config, log=print if jax_process_zero() else (lambda *_: None))
    return
  if _MODE.value != "pretrain":              # a teacher shipped in diffusers format
    from adm_jax import teacher as teacher_lib
    teacher_lib.prepare(config, _WORKDIR.value)
  if _MODE.value == "train":
    from adm_jax import train
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    from adm_jax import train
    train.evaluate_checkpoint(config, _WORKDIR.value)
  elif _MODE.value == "pairs":
    from adm_jax import pairs
    pairs.generate(config, _WORKDIR.value)
  elif _MODE.value == "check":
    from adm_jax import teacher
    teacher.describe(config)
  elif _MODE.value == "sample":
    from adm_jax import sampling
    sampling.run(config, _WORKDIR.value)
  elif _MODE.value == "pretrain":
    from adm_jax import pretrain
    pretrain.run(config, _WORKDIR.value)


def jax_process_zero() -> bool:
  import jax
  return jax.process_index() == 0


def run(argv=None):
  argv = list(sys.argv if argv is None else argv)
  try:
    config_lib.check_overrides(argv)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  flags.mark_flags_as_required(["config"])

  def main(a):
    try:
      _main(a)
    except (config_lib.ConfigError, FileNotFoundError) as e:
      logging.flush()
      sys.exit(f"error: {e}")
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
