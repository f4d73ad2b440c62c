r"""The digits teacher, part 1: the VAE of the embedded ``weights/digits-sdxl`` pipeline.

A diffusers ``AutoencoderKL`` trained from scratch on the ``"train"`` split of the
embedded digits (``adm_jax.digits``: 32x32x3 images -> 8x8x4 latents), exported with its
``scaling_factor`` set to 1 / std of the training latents to ``weights/digits-sdxl/vae``:

  python -m adm_jax.main --config=configs/digits_vae.py --workdir=DIR --mode=pretrain

Then train the UNet on its latents with ``configs/digits_teacher.py``. See
``weights/digits-sdxl/README.md`` for the measured wall time and held-out MSE.

Arguments: ``variant`` (full | tiny). ``tiny`` runs a few steps into ``DIR/export`` (for
tests, with a narrower VAE; it never touches ``weights/``).
"""
from adm_jax import config_lib

EXPORT_DIR = "weights/digits-sdxl"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full")
  if arg.variant not in ("full", "tiny"):
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  c = config_lib.ConfigDict()
  c.family = "sdxl"                     # the VAE of an SDXL-family pipeline
  c.seed = 0
  c.pretrain = config_lib.ConfigDict(dict(
      target="vae",
      export_dir=EXPORT_DIR,            # "" -> WORKDIR/export
      image_size=32,
      # diffusers AutoencoderKL config: three blocks, so latents are 32 / 4 = 8 wide.
      vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3,
               latent_channels=4, norm_num_groups=8),
      # LDM's loss without perceptual / adversarial terms: per-sample sums.
      l1_weight=1.0,
      l2_weight=1.0,
      kl_weight=1e-6,
      steps=300,
      batch_size=32,
      optim=config_lib.adamw(2e-3, warmup_steps=50, grad_clip=0.0, weight_decay=0.0),
      ema_decay=0.99,
      log_every=50,
  ))
  if arg.variant == "tiny":
    c.pretrain.export_dir = ""
    c.pretrain.vae.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
    c.pretrain.steps = 4
    c.pretrain.batch_size = 4
    c.pretrain.log_every = 2
    c.pretrain.optim.warmup_steps = 1
  return c
