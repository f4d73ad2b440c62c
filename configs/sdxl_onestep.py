r"""SDXL base 1.0 -> one-step student (DMDX: ADP pre-training, then ADM).

Convert the teacher once (a local diffusers folder of safetensors; nothing is downloaded):

  python -m adm_jax.convert --family=sdxl \
      --src=/path/to/stable-diffusion-xl-base-1.0 --dst=weights/stable-diffusion-xl-base-1.0

Sample from the converted teacher (25-step Euler, CFG 5) into DIR/samples.png:

  python -m adm_jax.main --config=configs/sdxl_onestep.py --workdir=DIR --mode=sample

The ``tiny`` variant is the same job on a small SDXL-architecture model that runs on a
laptop CPU (point ``--config.teacher.weights_dir`` at a converted tiny pipeline):

  python -m adm_jax.main --config=configs/sdxl_onestep.py:tiny --workdir=DIR --mode=sample \
      --config.teacher.weights_dir=weights/tiny-sdxl
"""
from adm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full")
  c = config_lib.ConfigDict()
  c.family = "sdxl"
  c.method = "dmdx"
  c.seed = 0
  c.teacher = config_lib.sdxl_teacher()
  # One-step student conditioned on t = 399 with pure-noise input (DMD2 App. F.4).
  c.student = config_lib.ConfigDict(dict(num_steps=1, conditioning_timestep=399))
  c.batch_size = 128                               # global, DMD2 SDXL
  c.mesh = config_lib.mesh(data=-1, fsdp=1)
  c.sharding_rules = config_lib.FSDP_RULES
  c.optim = config_lib.ConfigDict(dict(
      generator=config_lib.adamw(5e-7),
      fake_score=config_lib.adamw(5e-7),
      discriminator=config_lib.adamw(5e-7)))
  c.sample = config_lib.sample_settings()

  if arg.variant == "tiny":
    c.teacher.weights_dir = "weights/tiny-sdxl"
    c.teacher.source_name = "tiny-sdxl"
    c.teacher.dtype = "float32"
    c.teacher.resolution = 32
    c.batch_size = 4
    c.sample = config_lib.sample_settings(num_steps=4, num_per_prompt=1)
  elif arg.variant != "full":
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  return c
