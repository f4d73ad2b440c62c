r"""DMD2 on the embedded digits teacher: one-step (default) or four-step with backward
simulation, same teacher, pairs, evaluation and table as ``configs/digits_dmdx.py``:

  python -m adm_jax.main --config=configs/digits_dmd2.py --workdir=DIR
  python -m adm_jax.main --config=configs/digits_dmd2.py:steps=4 --workdir=DIR

The GAN's "real" latents are the teacher's ODE samples from the pair job (DMD2 uses real
images; on the digits the teacher's samples stand in, as in the rest of the trainer).
Arguments: ``steps`` (1 | 4), ``variant=tiny`` (a seconds-long smoke run).
"""
from adm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full", steps=1)
  if arg.steps not in (1, 4):
    raise config_lib.ConfigError(f"steps={arg.steps}: valid: 1, 4")
  # One step: pure noise told t = 999 (DMD2's SD1.5 recipe; its SDXL t = 399 needs a
  # regression pre-training first). Four steps: 999 / 749 / 499 / 249.
  times = (999,) if arg.steps == 1 else (999, 749, 499, 249)
  c = config_lib.digits_distillation("dmd2", times=times, total_steps=1000, batch_size=32)
  c.disc = config_lib.ConfigDict(dict(head="dmd2", features=("mid",),
                                      head_kw=dict(groups=8)))
  c.optim = config_lib.ConfigDict(dict(
      generator=config_lib.adamw(1e-4, warmup_steps=50, weight_decay=0.0),
      fake_score=config_lib.adamw(1e-4, warmup_steps=50, weight_decay=0.0),
      discriminator=config_lib.adamw(1e-4, warmup_steps=50, weight_decay=0.0)))
  if arg.variant == "tiny":
    c.total_steps, c.batch_size, c.ttur = 4, 8, 2
    c.log_every = c.checkpoint_every = 2
    c.pairs.update(num_pairs=16, shard_size=8, batch_size=8, num_steps=4)
    c.eval.update(num_per_prompt=2, batch_size=20)
    c.num_samples = 4
  elif arg.variant != "full":
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  return c
