r"""Entry point: ``python -m adm_jax.main --config=configs/<file>.py[:arg] --workdir=DIR``.

Modes:
  train   distil: the method in ``config.method`` through the one trainer
          (``adm_jax/train.py``), resuming from ``DIR/checkpoints`` if present.
  pairs   the ODE-pair job (``config.pairs``): teacher PF-ODE with CFG -> ArrayRecord
          shards in ``DIR/pairs`` (or ``config.pairs.dir``); resumable, idempotent.
  sample  load the converted teacher, run its PF-ODE sampler with CFG on
          ``config.sample.prompts`` and write ``DIR/samples.png`` (+ ``samples.npz``).
  check   validate the config and the teacher weights it names, print the model sizes.
  pretrain  train ``config.pretrain.target`` (the digits VAE or teacher) and export it.

Overrides: ``--config.a.b=value`` (the config is locked: unknown keys are an error that
lists the valid ones; enumerated values are checked against their choices).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adm_jax import config_lib

MODES = ("train", "pairs", "sample", "check", "pretrain")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (and :arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")


def _main(argv):
  del argv
  # Orbax logs every save step at INFO; our own progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  config = config_lib.validate(_CONFIG.value)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _MODE.value != "pretrain":              # a teacher shipped in diffusers format
    from adm_jax import teacher as teacher_lib
    teacher_lib.prepare(config, _WORKDIR.value)
  if _MODE.value == "train":
    from adm_jax import train
    train.train_and_evaluate(config, _WORKDIR.value)
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
