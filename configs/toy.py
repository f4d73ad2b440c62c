r"""Exact-score toy: a 2-D mixture of 8 Gaussians (class-conditional, CFG) distilled into
a one-step (or few-step) MLP generator with DMD2, ADM or ODE-pair regression.

  python -m adm_jax.main --config=configs/toy.py:method=dmd2 --workdir=DIR --mode=train
  python -m adm_jax.main --config=configs/toy.py:method=adm,variant=tiny --workdir=DIR \
      --mode=train

The teacher's x0 prediction is computed in closed form (adm_jax/models/toy.py), so every
loss can be checked against the exact answer; runs in seconds on a laptop CPU.
"""
from adm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full", method="dmd2", steps=1)
  c = config_lib.ConfigDict()
  c.family = "toy"
  c.method = arg.method
  c.seed = 0
  c.teacher = config_lib.toy_teacher()
  c.toy = config_lib.ConfigDict(dict(
      mixture=dict(num_modes=8, radius=2.0, std=0.1),
      student=dict(hidden=128, depth=3),
      fit_steps=300))
  # One-step: pure noise in, told t = 999; few-step: DMD2's list (999, 749, 499, 249).
  c.student = config_lib.ConfigDict(dict(
      times=(999,) if arg.steps == 1 else tuple(range(999, 0, -1000 // arg.steps))))
  c.pairs = config_lib.ConfigDict(dict(num_steps=25))
  c.disc = config_lib.ConfigDict(dict(head="admhead2d", features=("mid",),
                                      head_kw=dict(hidden=32, groups=8)))
  c.dmd2 = config_lib.ConfigDict(dict(gan=True))
  c.hparams = config_lib.ConfigDict(dict(gan_weight_g=5e-3, gan_weight_d=1e-2))
  c.ttur = 5 if arg.method == "dmd2" else 1
  c.ema_decay = 0.0
  c.batch_size = 256
  c.total_steps = 2000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.resume = ""
  c.mesh = config_lib.mesh(data=-1)
  c.sharding_rules = config_lib.REPLICATE_RULES
  c.optim = config_lib.ConfigDict(dict(
      generator=config_lib.adamw(1e-4, warmup_steps=100, weight_decay=0.0),
      fake_score=config_lib.adamw(1e-4, warmup_steps=100, weight_decay=0.0),
      discriminator=config_lib.adamw(1e-4, warmup_steps=100, weight_decay=0.0)))
  if arg.variant == "tiny":
    c.batch_size = 32
    c.total_steps = 12
    c.log_every = 4
    c.checkpoint_every = 6
    c.toy.fit_steps = 50
    c.toy.student = dict(hidden=32, depth=1)
    c.pairs.num_steps = 4
  elif arg.variant != "full":
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  return c
