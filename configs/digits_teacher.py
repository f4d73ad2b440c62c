r"""The digits teacher, part 2: the UNet and text path of ``weights/digits-sdxl``.

Trains a small SDXL-family ``UNet2DConditionModel`` (``text_time`` embedding, linear
projections, cross-attention at the 4x4 level only) with ε-prediction on SDXL's
scaled-linear schedule, on latents of the digits VAE (``configs/digits_vae.py``, run
first), prompted with "a handwritten digit {k}" (10 % unconditional). The two frozen
random CLIP text encoders and their tokenizers are written with it, completing the
diffusers pipeline folder ``weights/digits-sdxl``:

  python -m adm_jax.main --config=configs/digits_vae.py --workdir=DIR --mode=pretrain
  python -m adm_jax.main --config=configs/digits_teacher.py --workdir=DIR --mode=pretrain

Wall times and held-out numbers: ``weights/digits-sdxl/README.md``. The ``teacher``
section points at the converted pipeline, so the usual modes work on it:

  python -m adm_jax.convert --family=sdxl --src=weights/digits-sdxl \
      --dst=weights/digits-sdxl-jax
  python -m adm_jax.main --config=configs/digits_teacher.py --workdir=DIR --mode=sample

Arguments: ``variant`` (full | tiny). ``tiny`` trains a few steps of a narrower model into
``DIR/export`` (for tests; run ``configs/digits_vae.py:tiny`` with the same ``DIR``
first; it never touches ``weights/``).
"""
from adm_jax import config_lib, digits

EXPORT_DIR = "weights/digits-sdxl"
CONVERTED_DIR = "weights/digits-sdxl-jax"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="full")
  if arg.variant not in ("full", "tiny"):
    raise config_lib.ConfigError(f"unknown variant {arg.variant!r}; valid: full, tiny")
  c = config_lib.ConfigDict()
  c.family = "sdxl"
  c.seed = 0
  c.teacher = config_lib.digits_teacher()
  c.teacher.weights_dir = CONVERTED_DIR   # --mode=sample / check convert it here once
  c.mesh = config_lib.mesh(data=-1, fsdp=1)
  c.sharding_rules = config_lib.REPLICATE_RULES
  c.sample = config_lib.sample_settings(prompts=tuple(digits.prompts()), num_per_prompt=8,
                                        guidance_scale=2.0)
  c.pretrain = config_lib.ConfigDict(dict(
      target="teacher",
      export_dir=EXPORT_DIR,            # "" -> WORKDIR/export; the VAE is read from here
      text=dict(
          seed=1,
          max_length=16,                # tokenizer model_max_length = text positions
          # CLIP-L-like (quick_gelu, legacy EOS pooling) and a second encoder with a
          # projection head for SDXL's pooled embedding; random and frozen.
          encoder_1=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=64),
          encoder_2=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=64)),
      # diffusers UNet2DConditionModel config; cross_attention_dim, the text_time input
      # size and the sample size follow from the text encoders and the VAE.
      unet=dict(block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(1, 2),
                transformer_layers_per_block=1, use_linear_projection=True,
                addition_time_embed_dim=16, norm_num_groups=8),
      p_uncond=0.1,
      steps=1200,
      batch_size=32,
      optim=config_lib.adamw(2e-3, warmup_steps=50, grad_clip=1.0, weight_decay=0.0),
      ema_decay=0.995,
      log_every=100,
      # Samples after training: 25-step Euler (trailing) with CFG, scored by the shipped
      # digits classifier when present.
      eval=dict(num_per_prompt=10, num_steps=25, guidance_scale=2.0, seed=0,
                classifier=True),
  ))
  if arg.variant == "tiny":
    c.pretrain.export_dir = ""
    c.pretrain.unet.update(block_out_channels=(8, 16), layers_per_block=1,
                           mid_block_type=None, attention_head_dim=(1, 1),
                           norm_num_groups=4)
    for enc in ("encoder_1", "encoder_2"):
      c.pretrain.text[enc].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, projection_dim=16)
    c.pretrain.update(steps=4, batch_size=4, log_every=2)
    c.pretrain.optim.warmup_steps = 1
    c.pretrain.eval.update(num_per_prompt=1, num_steps=2, classifier=False)
    c.sample = config_lib.sample_settings(prompts=tuple(digits.prompts()[:2]),
                                          num_per_prompt=1, num_steps=2)
  return c
