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
  c = config_lib.digits_distillation("dmd2", times=times, total_steps=1000, batch_size=32,
                                     variant=arg.variant)
  c.disc = config_lib.ConfigDict(dict(head="dmd2", features=("mid",),
                                      head_kw=dict(groups=8)))
  if arg.variant == "tiny":
    c.ttur = 2
  return c
