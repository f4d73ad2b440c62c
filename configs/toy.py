r"""Exact-score toy: a 2-D mixture of 8 Gaussians (class-conditional, CFG) distilled into
a one-step (or few-step) MLP generator with DMD2, ADM, ADP, DMDX or ODE-pair regression.

  python -m adm_jax.main --config=configs/toy.py:method=dmdx --workdir=DIR
  python -m adm_jax.main --config=configs/toy.py:method=dmd2,steps=4,variant=tiny \
      --workdir=DIR

The teacher's x0 prediction is computed in closed form (adm_jax/models/toy.py), so every
loss can be checked against the exact answer; runs in seconds on a laptop CPU. There
are no pixels: ADP uses its latent discriminator alone.

Choices measured with ``benchmarks/toy_modes.py`` (unconditional ring, one step):
* v-prediction: an ε-predicting one-step student told t = 999 turns ε errors into x0
  errors 1/alpha_999 ~ 15x larger and no method reached the modes; with v the x0 map is
  well conditioned.
* ADP adds the pair regression term (``adp_regression_weight=1``): ADP's GAN alone
  collapsed to one mode here; anchored to the pairs it covers all 8.
* ADM's generator at a 30x lower learning rate (3e-5, alone or as DMDX's second stage):
  at 1e-3 (and at 1e-4 alone) ADM drives the generator into one mode, or out of every
  mode, within a few hundred steps.
"""
from adm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full", method="dmd2", steps=1)
  times = (999,) if arg.steps == 1 else tuple(range(999, 0, -1000 // arg.steps))
  c = config_lib.distillation(arg.method, times=times, total_steps=2000, batch_size=256)
  c.family = "toy"
  c.seed = 0
  c.teacher = config_lib.toy_teacher()
  c.teacher.parameterization = "v_prediction"
  c.toy = config_lib.ConfigDict(dict(
      mixture=dict(num_modes=8, radius=2.0, std=0.1),
      student=dict(hidden=128, depth=3),
      fit_steps=300,
      # False: every label is the null label, so one noise -> sample map must cover all
      # 8 modes (the mode-collapse test); True: class-conditional with CFG.
      conditional=True))
  c.disc = config_lib.ConfigDict(dict(head="admhead2d", features=("mid",),
                                      head_kw=dict(hidden=32, groups=8)))
  c.hparams = config_lib.ConfigDict(dict(gan_weight_g=5e-3, gan_weight_d=1e-2,
                                         adp_weights={"latent": 1.0},
                                         adp_regression_weight=1.0))
  c.mesh = config_lib.mesh(data=-1)
  c.sharding_rules = config_lib.REPLICATE_RULES
  c.optim = config_lib.ConfigDict(dict(
      generator=config_lib.adamw(1e-3, warmup_steps=100, weight_decay=0.0),
      fake_score=config_lib.adamw(1e-3, warmup_steps=100, weight_decay=0.0),
      discriminator=config_lib.adamw(1e-3, warmup_steps=100, weight_decay=0.0)))
  c.dmdx.adm_optim = {"generator": {"lr": 3e-5}}
  if arg.method == "adm":
    c.optim.generator.lr = 3e-5
  if arg.variant == "tiny":
    c.batch_size = 32
    c.total_steps = 12
    c.dmdx.adp_steps = 6
    c.log_every = 4
    c.checkpoint_every = 6
    c.num_samples = 64
    c.toy.fit_steps = 50
    c.toy.student = dict(hidden=32, depth=1)
    c.pairs.num_steps = 4
  elif arg.variant != "full":
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  return c
