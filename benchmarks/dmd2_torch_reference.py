"""PyTorch + diffusers reference of one DMD2 training iteration for SDXL-architecture UNets.

The yardstick our JAX DMD2 steps (``adm_jax/steps.py``) are timed against. It follows the
official code (tianweiy/DMD2 commit ``8d8fa55``: ``main/sd_guidance.py`` ``SDGuidance``,
``main/sd_unified_model.py`` ``SDUniModel``, ``main/train_sd.py``
``Trainer.train_one_step``; algorithms.md §1 and its Addendum) in float32 with random
weights: nothing is downloaded, every network is built from a ``UNet2DConditionModel``
config.

* ``real_unet``: the frozen teacher; ``fake_unet`` and ``generator``: trainable deep
  copies of it (the official code loads all three from the same checkpoint).
* ``cls_pred_branch``: the official GAN classifier on the fake UNet's mid-block output
  (:func:`cls_pred_branch`), reached through :func:`classify_forward` (the official
  ``classify_mode`` forward that stops after the mid block).
* Two AdamW optimisers (generator; guidance = fake UNet + classifier head), betas
  (0.9, 0.999), weight decay 0.01, gradient clipping at 10, as ``train_sd.py``. The
  ``constant_with_warmup`` LR schedule is left out (it only scales the learning rate).
* Conditioning: random SDXL embeddings (``encoder_hidden_states [B, 77, ctx]``,
  ``text_embeds [B, pooled]``, ``time_ids [B, 6]``); the unconditional branch is all
  zeros (both embeddings), as the official SDXL code. Random "real" latents carry their
  own random captions.

``iteration()`` is ``guidance_turn()`` then ``generator_turn()`` (TTUR ratio 1, for the
timing). The official ``train_one_step`` runs the generator forward first and hands its
detached sample to the guidance turn; on the guidance-only steps of TTUR the generator
runs under ``no_grad`` instead, which is what ``guidance_turn`` does here, like our JAX
``make_fake_score_step``.

  python benchmarks/dmd2_torch_reference.py [--config small] [--batch 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

# Official SDXL 1-step defaults (algorithms.md §1.2, experiments/sdxl/*.sh).
DM_T_MIN, DM_T_MAX = 20, 980             # min/max_step_percent 0.02 / 0.98 of 1000
NUM_TRAIN_TIMESTEPS = 1000

# The tiny text_time UNet of tests/tiny_sdxl.py (context 32 + 48, pooled 40).
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=40 + 6 * 8,
    cross_attention_dim=32 + 48, norm_num_groups=8)

# A small SDXL-shaped UNet (three levels, transformer depth 1/2 on the attention levels,
# SDXL's 2048-wide context and 1280-wide pooled embedding): 16x16 latents in seconds.
SMALL = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                          "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256,
    cross_attention_dim=2048,
    norm_num_groups=32)


def _mid_size_config() -> dict:
  """``MID_SIZE`` of ``benchmarks/unet_forward.py`` (248 M parameters), read from there."""
  spec = importlib.util.spec_from_file_location(
      "unet_forward", Path(__file__).with_name("unet_forward.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.MID_SIZE)


# ---------------------------------------------------------------------------------------
# Pieces of the official code.
# ---------------------------------------------------------------------------------------


def get_x0_from_noise(sample, model_output, alphas_cumprod, timestep):
  """Official ``main/utils.py get_x0_from_noise``: ``(x_t - sqrt(1 - a) eps) / sqrt(a)``.

  The official callers pass float64 tensors (``.double()``); so do ours.
  """
  alpha_prod_t = alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
  beta_prod_t = 1 - alpha_prod_t
  return (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5


def predict_noise(unet, noisy_latents, text_embeddings, uncond_embedding, timesteps,
                  guidance_scale=1.0, unet_added_conditions=None,
                  uncond_unet_added_conditions=None):
  """Official ``sd_guidance.predict_noise``: CFG only when ``guidance_scale > 1``.

  With CFG the unconditional and conditional halves run as one batched call
  (``[uncond, cond]``) and combine as ``uncond + w * (cond - uncond)``.
  """
  if guidance_scale > 1:
    model_input = torch.cat([noisy_latents] * 2)
    embeddings = torch.cat([uncond_embedding, text_embeddings])
    timesteps = torch.cat([timesteps] * 2)
    condition_input = None
    if unet_added_conditions is not None:
      condition_input = {k: torch.cat([uncond_unet_added_conditions[k], v])
                         for k, v in unet_added_conditions.items()}
    noise_pred = unet(model_input, timesteps, embeddings,
                      added_cond_kwargs=condition_input).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
  return unet(noisy_latents, timesteps, text_embeddings,
              added_cond_kwargs=unet_added_conditions).sample


def classify_forward(unet: UNet2DConditionModel, sample, timestep, encoder_hidden_states,
                     added_cond_kwargs):
  """The mid-block output of a diffusers UNet (official ``sd_unet_forward.classify_forward``
  with ``classify_mode=True``, of which DMD2 keeps only the last entry, the bottleneck).

  The diffusers forward up to and including the mid block, without the paths SDXL does
  not take (class embeddings, attention masks, ControlNet / T2I-Adapter residuals,
  GLIGEN); the up blocks never run.
  """
  t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
  emb = unet.time_embedding(t_emb, None)
  aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                               added_cond_kwargs=added_cond_kwargs)
  emb = emb + aug_emb if aug_emb is not None else emb
  if unet.time_embed_act is not None:
    emb = unet.time_embed_act(emb)
  encoder_hidden_states = unet.process_encoder_hidden_states(
      encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
  h = unet.conv_in(sample)
  for block in unet.down_blocks:
    if getattr(block, "has_cross_attention", False):
      h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
    else:
      h, _ = block(hidden_states=h, temb=emb)
  if getattr(unet.mid_block, "has_cross_attention", False):
    return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
  return unet.mid_block(h, emb)


def cls_pred_branch(channels: int, resolution: int, groups: int = 32) -> nn.Sequential:
  """The official GAN classifier head (``SDGuidance.cls_pred_branch``).

  ``log2(resolution / 4)`` x [Conv 4x4 stride 2 padding 1 -> GroupNorm -> SiLU] down to
  4x4 (SDXL's 32x32 mid block: three), [Conv 4x4 stride 4 -> GroupNorm -> SiLU] to 1x1,
  Conv 1x1 -> one logit; width ``channels`` throughout (1280 for SDXL), torch's default
  initialisation. Our ``adm_jax.models.disc_heads.DMD2Head`` ports it.
  """
  if resolution < 4 or resolution & (resolution - 1):
    raise ValueError(f"cls_pred_branch needs a power-of-two mid block >= 4, "
                     f"got {resolution}")
  layers = []
  for _ in range(int(math.log2(resolution // 4))):
    layers += [nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
               nn.GroupNorm(groups, channels), nn.SiLU()]
  layers += [nn.Conv2d(channels, channels, kernel_size=4, stride=4, padding=0),
             nn.GroupNorm(groups, channels), nn.SiLU(),
             nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0)]
  return nn.Sequential(*layers)


def dm_loss_torch(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor):
  """DMD2's distribution-matching loss, as official
  ``SDGuidance.compute_distribution_matching_loss`` (after its two score calls)::

    p_real = x - x0_real ; p_fake = x - x0_fake
    grad = (p_real - p_fake) / |p_real|.mean(dim=[1, 2, 3], keepdim=True)
    grad = nan_to_num(grad)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")

  The direction runs without gradient in the dtype of the x0 predictions (float64 in
  the harness, as upstream); ``d loss / d x = grad / x.numel()``. Mirrors our JAX
  ``adm_jax.losses.dm_loss`` (which works channels-last, ``[B, H, W, C]``).

  Args:
    x: ``[B, C, H, W]`` generator output; the gradient flows into it.
    x0_real: ``[B, C, H, W]`` real-score (CFG) x0 prediction, treated as a constant.
    x0_fake: ``[B, C, H, W]`` fake-score x0 prediction, treated as a constant.

  Returns:
    The scalar float32 loss.
  """
  with torch.no_grad():
    p_real = x - x0_real
    p_fake = x - x0_fake
    grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
    grad = torch.nan_to_num(grad)
  return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")


# ---------------------------------------------------------------------------------------
# The harness.
# ---------------------------------------------------------------------------------------


class DMD2Reference:
  """One DMD2 training iteration (official ``SDUniModel`` + ``SDGuidance`` +
  ``train_one_step``) on random-weight SDXL-architecture UNets; build with
  :func:`build_reference`."""

  def __init__(self, real_unet, fake_unet, generator, cls_head, cond, real, *,
               cfg_scale, gan, conditioning_time, lr_generator, lr_guidance,
               gan_weight_g, gan_weight_d, dm_weight, max_grad_norm):
    self.real_unet, self.fake_unet, self.generator = real_unet, fake_unet, generator
    self.cls_pred_branch = cls_head
    self.cond, self.real = cond, real
    self.cfg_scale, self.gan, self.conditioning_time = cfg_scale, gan, conditioning_time
    self.gan_weight_g, self.gan_weight_d = gan_weight_g, gan_weight_d
    self.dm_weight = dm_weight
    self.max_grad_norm = max_grad_norm
    self.scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                   beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    self.alphas_cumprod = self.scheduler.alphas_cumprod.to(real["latents"].device)
    # train_sd.py: AdamW over the parameters that require grad, betas (0.9, 0.999),
    # weight decay 0.01; the guidance optimiser holds the fake UNet and the head.
    adamw = dict(betas=(0.9, 0.999), weight_decay=0.01)
    self.optimizer_generator = torch.optim.AdamW(
        [p for p in generator.parameters() if p.requires_grad], lr=lr_generator, **adamw)
    self.optimizer_guidance = torch.optim.AdamW(
        [p for p in self.guidance_parameters() if p.requires_grad], lr=lr_guidance, **adamw)

  def guidance_parameters(self):
    """The guidance model's trainable parameters: fake UNet, then the classifier head."""
    yield from self.fake_unet.parameters()
    if self.gan:
      yield from self.cls_pred_branch.parameters()

  def _set_guidance_requires_grad(self, flag: bool) -> None:
    for p in self.guidance_parameters():
      p.requires_grad_(flag)

  @property
  def batch(self) -> int:
    return self.cond["text_embedding"].shape[0]

  def _randint(self, low: int, high: int) -> torch.Tensor:
    dev = self.real["latents"].device
    return torch.randint(low, high, [self.batch], device=dev, dtype=torch.long)

  # ------------------------------------------------------------------ generator sample

  def generate(self) -> torch.Tensor:
    """One-step generator from pure noise told ``t = conditioning_time`` (official
    ``SDUniModel.forward`` without denoising: ``prepare_pure_generation_data``), x0 from
    its epsilon in float64. Runs with gradient unless called under ``no_grad``."""
    c = self.cond
    noise = torch.randn_like(self.real["latents"])
    timesteps = torch.full([self.batch], self.conditioning_time, dtype=torch.long,
                           device=noise.device)
    eps = self.generator(noise, timesteps, c["text_embedding"],
                         added_cond_kwargs=c["unet_added_conditions"]).sample
    return get_x0_from_noise(noise.double(), eps.double(), self.alphas_cumprod.double(),
                             timesteps).float()

  # ----------------------------------------------------------------------------- losses

  def compute_cls_logits(self, image, text_embedding, unet_added_conditions):
    """Official ``compute_cls_logits`` (diffusion GAN): noise at its own
    ``t ~ U[0, 1000)``, fake-UNet mid block, classifier head -> logits ``[B]``."""
    timesteps = self._randint(0, NUM_TRAIN_TIMESTEPS)
    image = self.scheduler.add_noise(image, torch.randn_like(image), timesteps)
    rep = classify_forward(self.fake_unet, image, timesteps, text_embedding,
                           unet_added_conditions).float()
    return self.cls_pred_branch(rep).squeeze(dim=[1, 2, 3])

  def compute_loss_fake(self, latents) -> torch.Tensor:
    """Official ``compute_loss_fake``: fake-UNet epsilon MSE on detached generator
    samples noised at ``t ~ U[0, 1000)``, no CFG."""
    c = self.cond
    latents = latents.detach()
    noise = torch.randn_like(latents)
    timesteps = self._randint(0, NUM_TRAIN_TIMESTEPS)
    noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
    fake_noise_pred = predict_noise(
        self.fake_unet, noisy_latents, c["text_embedding"], c["uncond_embedding"],
        timesteps, guidance_scale=1, unet_added_conditions=c["unet_added_conditions"],
        uncond_unet_added_conditions=c["uncond_unet_added_conditions"])
    return torch.mean((fake_noise_pred.float() - noise.float()) ** 2)

  def compute_distribution_matching_loss(self, latents) -> torch.Tensor:
    """Official ``compute_distribution_matching_loss``: ``t ~ U[20, 980]``, both scores
    without gradient (real with CFG, fake without), x0 in float64, then
    :func:`dm_loss_torch`."""
    c = self.cond
    with torch.no_grad():
      timesteps = self._randint(DM_T_MIN, min(DM_T_MAX + 1, NUM_TRAIN_TIMESTEPS))
      noise = torch.randn_like(latents)
      noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
      pred_fake_noise = predict_noise(
          self.fake_unet, noisy_latents, c["text_embedding"], c["uncond_embedding"],
          timesteps, guidance_scale=1, unet_added_conditions=c["unet_added_conditions"],
          uncond_unet_added_conditions=c["uncond_unet_added_conditions"])
      pred_fake_image = get_x0_from_noise(noisy_latents.double(), pred_fake_noise.double(),
                                          self.alphas_cumprod.double(), timesteps)
      pred_real_noise = predict_noise(
          self.real_unet, noisy_latents, c["text_embedding"], c["uncond_embedding"],
          timesteps, guidance_scale=self.cfg_scale,
          unet_added_conditions=c["unet_added_conditions"],
          uncond_unet_added_conditions=c["uncond_unet_added_conditions"])
      pred_real_image = get_x0_from_noise(noisy_latents.double(), pred_real_noise.double(),
                                          self.alphas_cumprod.double(), timesteps)
    return dm_loss_torch(latents, pred_real_image, pred_fake_image)

  # ------------------------------------------------------------------------------ turns

  def _clip_and_step(self, params, optimizer) -> None:
    if self.max_grad_norm is not None:
      torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
    optimizer.step()
    # Both optimisers are zeroed after every step (train_sd.py), so that no gradient
    # leaks from one turn into the other.
    self.optimizer_generator.zero_grad()
    self.optimizer_guidance.zero_grad()

  def guidance_turn(self) -> dict[str, float]:
    """Fake UNet + classifier head take one AdamW step on
    ``loss_fake_mean + gan_weight_d * guidance_cls_loss`` (official ``guidance_forward``),
    the GAN term ``softplus(D(fake)) + softplus(-D(real))``
    (``compute_guidance_clean_cls_loss``) on detached generator samples and real latents
    with their own captions."""
    with torch.no_grad():
      image = self.generate()
    loss_fake = self.compute_loss_fake(image)
    losses = {"loss_fake_mean": loss_fake}
    loss = loss_fake
    if self.gan:
      c, r = self.cond, self.real
      pred_realism_on_real = self.compute_cls_logits(
          r["latents"].detach(), r["text_embedding"], r["unet_added_conditions"])
      pred_realism_on_fake = self.compute_cls_logits(
          image.detach(), c["text_embedding"], c["unet_added_conditions"])
      cls_loss = (F.softplus(pred_realism_on_fake).mean()
                  + F.softplus(-pred_realism_on_real).mean())
      losses["guidance_cls_loss"] = cls_loss
      loss = loss + self.gan_weight_d * cls_loss
    losses["guidance_loss"] = loss
    loss.backward()
    self._clip_and_step(list(self.guidance_parameters()), self.optimizer_guidance)
    return {k: float(v.detach()) for k, v in losses.items()}

  def generator_turn(self) -> dict[str, float]:
    """The generator takes one AdamW step on ``dm_weight * loss_dm + gan_weight_g *
    gen_cls_loss`` (official ``generator_forward`` / ``train_one_step``), with the
    guidance model frozen (``requires_grad_(False)``) for the turn; the GAN term
    ``softplus(-D(fake))`` (``compute_generator_clean_cls_loss``) draws its own ``t`` and
    noise, and its gradient reaches the generator through the fake UNet's encoder."""
    image = self.generate()
    self._set_guidance_requires_grad(False)
    try:
      loss_dm = self.compute_distribution_matching_loss(image)
      losses = {"loss_dm": loss_dm}
      loss = self.dm_weight * loss_dm
      if self.gan:
        c = self.cond
        logits = self.compute_cls_logits(image, c["text_embedding"],
                                         c["unet_added_conditions"])
        gen_cls_loss = F.softplus(-logits).mean()
        losses["gen_cls_loss"] = gen_cls_loss
        loss = loss + self.gan_weight_g * gen_cls_loss
      losses["generator_loss"] = loss
      loss.backward()
    finally:
      self._set_guidance_requires_grad(True)
    self._clip_and_step(list(self.generator.parameters()), self.optimizer_generator)
    return {k: float(v.detach()) for k, v in losses.items()}

  def iteration(self) -> dict[str, float]:
    """``guidance_turn()`` then ``generator_turn()``; their losses in one dict."""
    return {**self.guidance_turn(), **self.generator_turn()}


def _sdxl_cond(batch, seq_len, context_dim, pooled_dim, pixel_size, device):
  """Random SDXL conditioning and its all-zero unconditional branch (official
  ``SDUniModel.forward``: ``torch.zeros_like`` of both embeddings, same ``time_ids``)."""
  text_embedding = torch.randn(batch, seq_len, context_dim, device=device)
  pooled = torch.randn(batch, pooled_dim, device=device)
  # build_condition_input: (original size, crop top-left, target size).
  time_ids = torch.tensor([[pixel_size, pixel_size, 0, 0, pixel_size, pixel_size]],
                          dtype=torch.float32, device=device).repeat(batch, 1)
  return {
      "text_embedding": text_embedding,
      "uncond_embedding": torch.zeros_like(text_embedding),
      "unet_added_conditions": {"time_ids": time_ids, "text_embeds": pooled},
      "uncond_unet_added_conditions": {"time_ids": time_ids,
                                       "text_embeds": torch.zeros_like(pooled)},
  }


def build_reference(unet_config: dict, *, batch: int, latent_hw: int,
                    context_dim: int | None = None, pooled_dim: int | None = None,
                    seq_len: int = 77, cfg_scale: float = 8.0, gan: bool = True,
                    conditioning_time: int = 399, lr_generator: float = 5e-7,
                    lr_guidance: float = 5e-7, gan_weight_g: float = 5e-3,
                    gan_weight_d: float = 1e-2, dm_weight: float = 1.0,
                    max_grad_norm: float | None = 10.0, device: str = "cpu",
                    seed: int = 0) -> DMD2Reference:
  """Builds the DMD2 reference on random weights (float32).

  Args:
    unet_config: ``UNet2DConditionModel`` keyword arguments (SDXL ``text_time``
      conditioning).
    batch: per-iteration batch size ``B``.
    latent_hw: latent height = width; the mid block (``latent_hw / 2**(levels - 1)``)
      must be a power of two >= 4 for the classifier head.
    context_dim: width of ``encoder_hidden_states``; default ``cross_attention_dim``.
    pooled_dim: width of ``text_embeds``; default
      ``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``.
    seq_len: text tokens (77).
    cfg_scale: real-score guidance ``w`` (8 for SDXL; CFG only when > 1).
    gan: add the GAN terms and the classifier head (``cls_on_clean_image``).
    conditioning_time: the one-step generator's timestep (399 for SDXL).
    lr_generator, lr_guidance: AdamW learning rates (5e-7, official SDXL).
    gan_weight_g, gan_weight_d: ``gen_cls_loss_weight`` 5e-3 and
      ``guidance_cls_loss_weight`` 1e-2.
    dm_weight: ``dm_loss_weight`` (1).
    max_grad_norm: gradient clipping of each turn (10, official; None: off).
    device: torch device.
    seed: ``torch.manual_seed`` for weights, conditioning, real latents and every draw
      of the turns (the global torch RNG, as the official code).

  Returns:
    A :class:`DMD2Reference`.
  """
  torch.manual_seed(seed)
  cfg = dict(unet_config)
  if context_dim is None:
    context_dim = cfg["cross_attention_dim"]
  if pooled_dim is None:
    pooled_dim = (cfg["projection_class_embeddings_input_dim"]
                  - 6 * cfg["addition_time_embed_dim"])
  real_unet = UNet2DConditionModel(**cfg).to(device).float()
  real_unet.requires_grad_(False)
  real_unet.eval()
  fake_unet = copy.deepcopy(real_unet).requires_grad_(True).train()
  generator = copy.deepcopy(real_unet).requires_grad_(True).train()

  channels = cfg["block_out_channels"][-1]
  mid_hw = latent_hw // 2 ** (len(cfg["block_out_channels"]) - 1)
  cls_head = cls_pred_branch(channels, mid_hw).to(device) if gan else None

  cond = _sdxl_cond(batch, seq_len, context_dim, pooled_dim, 8 * latent_hw, device)
  real = _sdxl_cond(batch, seq_len, context_dim, pooled_dim, 8 * latent_hw, device)
  in_ch = cfg.get("in_channels", 4)
  real["latents"] = torch.randn(batch, in_ch, latent_hw, latent_hw, device=device)
  return DMD2Reference(real_unet, fake_unet, generator, cls_head, cond, real,
                       cfg_scale=cfg_scale, gan=gan, conditioning_time=conditioning_time,
                       lr_generator=lr_generator, lr_guidance=lr_guidance,
                       gan_weight_g=gan_weight_g, gan_weight_d=gan_weight_d,
                       dm_weight=dm_weight, max_grad_norm=max_grad_norm)


# ---------------------------------------------------------------------------------------
# CLI: time iterations.
# ---------------------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", choices=("tiny", "small", "mid"), default="small",
                  help="tiny: tests/tiny_sdxl.py's UNet; small: 3 levels 64/128/256 with "
                       "SDXL context / pooled widths; mid: benchmarks/unet_forward.py's "
                       "MID_SIZE (248 M)")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--latent", type=int, default=None,
                  help="latent height = width (default: 8 tiny, 16 small, 32 mid)")
  ap.add_argument("--steps", type=int, default=3, help="timed iterations")
  ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
  ap.add_argument("--cfg", type=float, default=8.0)
  ap.add_argument("--no-gan", dest="gan", action="store_false")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=None,
                  help="torch.set_num_threads (default: torch's own default, left alone)")
  args = ap.parse_args()
  if args.threads is not None:
    torch.set_num_threads(args.threads)

  config = {"tiny": TINY, "small": SMALL}.get(args.config) or _mid_size_config()
  latent = args.latent or {"tiny": 8, "small": 16, "mid": 32}[args.config]
  ref = build_reference(config, batch=args.batch, latent_hw=latent, cfg_scale=args.cfg,
                        gan=args.gan, seed=args.seed)
  n_params = sum(p.numel() for p in ref.real_unet.parameters())
  print(f"config={args.config} ({n_params / 1e6:.1f} M params per UNet) batch={args.batch} "
        f"latent={latent}x{latent} gan={args.gan} cfg={args.cfg} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}")
  for _ in range(args.warmup):
    ref.iteration()
  times, turns = [], {"guidance": [], "generator": []}
  for _ in range(args.steps):
    t0 = time.perf_counter()
    losses = ref.guidance_turn()
    t1 = time.perf_counter()
    losses.update(ref.generator_turn())
    t2 = time.perf_counter()
    turns["guidance"].append(t1 - t0)
    turns["generator"].append(t2 - t1)
    times.append(t2 - t0)
  med = lambda ts: statistics.median(ts) * 1e3  # noqa: E731
  print("last losses: " + ", ".join(f"{k}={v:.4g}" for k, v in losses.items()))
  print(f"guidance turn {med(turns['guidance']):.1f} ms, generator turn "
        f"{med(turns['generator']):.1f} ms (medians)")
  print(f"{med(times):.1f} ms/iteration (median of {args.steps}; mean "
        f"{sum(times) / len(times) * 1e3:.1f} ms)")


if __name__ == "__main__":
  main()
