r"""SDXL base 1.0 -> one-step student (DMDX: ADP pre-training, then ADM), or DMD2.

Convert the teacher once (a local diffusers folder of safetensors; nothing is downloaded),
and, for ADP's pixel discriminator, have a transformers SAM folder (``SamModel``):

  python -m adm_jax.convert --family=sdxl \
      --src=/path/to/stable-diffusion-xl-base-1.0 --dst=weights/stable-diffusion-xl-base-1.0

Distil (DMDX one-step; ``:method=dmd2,steps=4`` for DMD2's four-step student):

  python -m adm_jax.main --config=configs/sdxl_onestep.py --workdir=DIR \
      --config.disc.pixel.weights_dir=/path/to/sam-vit-huge

ODE pairs (noise, teacher latent) for ADP / DMD2's real latents come from the pair job,
which ``train`` runs first when ``DIR/pairs`` is missing (or run it alone; it resumes):

  python -m adm_jax.main --config=configs/sdxl_onestep.py --workdir=DIR --mode=pairs \
      --config.pairs.prompts_file=prompts.txt

Sample from the converted teacher (25-step Euler, CFG 5) into DIR/samples.png:

  python -m adm_jax.main --config=configs/sdxl_onestep.py --workdir=DIR --mode=sample

Arguments: ``variant`` (full | tiny), ``method`` (dmdx | adp | adm | dmd2 | regression),
``steps`` (1 | 4). The ``tiny`` variant is the same job on a small SDXL-architecture
model that runs on a laptop CPU (point ``--config.teacher.weights_dir`` at a converted
tiny pipeline and ``--config.disc.pixel.weights_dir`` at a tiny SAM):

  python -m adm_jax.main --config=configs/sdxl_onestep.py:tiny --workdir=DIR \
      --config.teacher.weights_dir=weights/tiny-sdxl --config.disc.pixel.weights_dir=SAM
"""
from adm_jax import config_lib

# The UNet features ADM's / ADP's latent discriminator heads read: the encoder and the
# bottleneck, as SDXL-Lightning's discriminator (ADM App. B.1 reuses its heads).
ADM_FEATURES = {"full": ("down_1", "down_2", "mid"), "tiny": ("down_0", "down_1", "mid")}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full", method="dmdx", steps=1)
  if arg.variant not in ADM_FEATURES:
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  if arg.steps == 1:
    # DMD2 one-step: pure noise told t = 399 (App. F.4); DMDX's ADP trains the student
    # along the cubic schedule up to t_max, so it is used at t = 999.
    times = (399,) if arg.method in ("dmd2", "regression") else (999,)
  elif arg.steps == 4:
    times = (999, 749, 499, 249)
  else:
    raise config_lib.ConfigError(f"steps={arg.steps}: valid: 1, 4")
  c = config_lib.distillation(arg.method, times=times, total_steps=25_000, batch_size=128)
  c.family = "sdxl"
  c.seed = 0
  c.teacher = config_lib.sdxl_teacher()
  c.data = config_lib.ConfigDict(dict(prompts=(
      "a photo of a cat", "a watercolor painting of a lighthouse",
      "an astronaut riding a horse", "a red sports car on a mountain road")))
  # DMD2's pairs: Euler, trailing spacing, the teacher's CFG, 10K pairs
  # (algorithms.md §1, generate_noise_image_pairs_laion_sdxl.py).
  c.pairs = config_lib.pair_settings(num_steps=50, sampler="euler", spacing="trailing",
                                     source="files", num_pairs=10_240, shard_size=1024,
                                     batch_size=64)
  dmd2 = arg.method == "dmd2"
  c.disc = config_lib.ConfigDict(dict(
      # DMD2: its head on the fake score's mid block; ADM / ADP: heads on the teacher.
      head="dmd2" if dmd2 else "admhead2d",
      features=("mid",) if dmd2 else ADM_FEATURES[arg.variant],
      head_kw=dict() if dmd2 else dict(hidden=256),
      # ADP's pixel discriminator: frozen SAM ViT, heads on blocks 3, 6, 9, 12.
      pixel=dict(encoder="sam", weights_dir="weights/sam-vit-huge", layers=(3, 6, 9, 12),
                 head="admhead2d", head_kw=dict(hidden=256))))
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
    c.data.prompts = ("a photo of a cat", "a red dog sitting on the mat")
    c.batch_size = 2
    c.total_steps = 4
    c.dmdx.adp_steps = 2
    c.ttur = 2 if dmd2 else 1
    c.log_every = 2
    c.checkpoint_every = 2
    c.num_samples = 4
    c.pairs.update(num_steps=2, num_pairs=8, shard_size=4, batch_size=2)
    c.disc.head_kw = dict(groups=8) if dmd2 else dict(hidden=16, groups=8)
    c.disc.pixel.weights_dir = "weights/tiny-sam"
    c.disc.pixel.layers = (1, 2)
    c.disc.pixel.head_kw = dict(hidden=16, groups=8)
    for net in ("generator", "fake_score", "discriminator"):
      c.optim[net] = config_lib.adamw(1e-4, warmup_steps=0)
    c.sample = config_lib.sample_settings(num_steps=4, num_per_prompt=1)
  return c
