r"""Pretraining the embedded digits teacher: a small SDXL-family pipeline of our own.

The project trains its own real teacher on scikit-learn's digits (:mod:`adm_jax.digits`,
``"train"`` split only) and ships it in diffusers layout (``weights/digits-sdxl``), so a
fresh machine has a working SDXL-architecture teacher without any download. Two targets
(``config.pretrain.target``), run in this order::

  python -m adm_jax.main --config=configs/digits_vae.py --workdir=DIR --mode=pretrain
  python -m adm_jax.main --config=configs/digits_teacher.py --workdir=DIR --mode=pretrain

* ``vae``: a diffusers ``AutoencoderKL`` (32x32x3 images -> 8x8x4 latents), trained on
  L1 + L2 reconstruction of a posterior sample plus a small KL term (per-sample sums,
  as the LDM autoencoders; ``kl_weight`` ~1e-6). Its ``scaling_factor`` is then set to
  ``1 / std`` of the training latents (as SD did), and it is exported to ``EXPORT/vae``.
* ``teacher``: reads ``EXPORT/vae`` through the normal loader, encodes the train split
  once (posterior mean x scaling factor), builds two small frozen random-initialised CLIP
  text encoders (the first like CLIP-L: ``quick_gelu``, legacy EOS pooling; the second
  with a projection for ``pooled``) and their BPE tokenizers over a ten-word vocabulary,
  then trains a ``text_time`` UNet with ε-prediction on SDXL's scaled-linear schedule.
  Prompts are ``"a handwritten digit {label}"``; ``p_uncond`` of every batch gets SDXL's
  ``force_zeros_for_empty_prompt`` conditioning (zero context and pooled). The complete
  pipeline folder (UNet, text encoders, tokenizers, scheduler, ``model_index.json``) is
  written next to the VAE, with ``training.json`` and a ``README.md`` recording how.

Train steps are pure jitted functions ``(state, data, key, step) -> (state, metrics)``
(AdamW with warm-up and cosine decay, global-norm clipping, a parameter EMA that is what
gets exported); batches are drawn inside the step from ``fold_in(key, step)``, so a run
is a deterministic function of ``config.seed``.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adm_jax import conditioning, config_lib, digits, metrics, optim, tree
from adm_jax.convert import clip as clip_convert
from adm_jax.convert import unet as unet_convert
from adm_jax.convert import vae as vae_convert
from adm_jax.models import vae as vae_lib
from adm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from adm_jax.models.unet import UNet2DConditionModel, UNetConfig
from adm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

TARGETS = ("vae", "teacher")
TOKENIZER_WORDS = "a handwritten digit 0 1 2 3 4 5 6 7 8 9"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUMMARY = "training.json"
README = "README.md"
SAMPLES = "samples.png"
DIFFUSERS_VERSION = vae_convert.DIFFUSERS_VERSION
# The pad tokens of SDXL's two tokenizers (CLIP-L pads with EOS, OpenCLIP bigG with "!").
PAD_TOKENS = {"tokenizer": EOS, "tokenizer_2": "!"}
ENCODE_CHUNK = 256
# Smallest relative L2 distance two digit prompts' embeddings must keep (see
# prompt_separation); random CLIP encoders of the configured sizes give 0.1 to 0.3.
MIN_PROMPT_SEPARATION = 0.05


def run(config: config_lib.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode=pretrain``: trains ``config.pretrain.target`` and exports it.

  Returns the summary written to ``EXPORT/training.json`` for this target.
  """
  target = config.pretrain.target
  if target not in TARGETS:
    raise config_lib.ConfigError(f"invalid value {target!r} for config key "
                                 f"'pretrain.target'; valid choices: {', '.join(TARGETS)}")
  return train_vae(config, workdir) if target == "vae" else train_teacher(config, workdir)


def export_dir(config: config_lib.ConfigDict, workdir: str | Path) -> Path:
  """``config.pretrain.export_dir``, or ``WORKDIR/export`` when it is empty."""
  return Path(config.pretrain.export_dir or Path(workdir) / "export")


# ---------------------------------------------------------------------------------------
# Shared training machinery.
# ---------------------------------------------------------------------------------------


def make_optimizer(oc: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up to ``oc.lr`` then cosine decay to 0 over ``total_steps``,
  after global-norm clipping at ``oc.grad_clip`` (``config_lib.adamw`` fields)."""
  if oc.get("name", "adamw") != "adamw":
    raise config_lib.ConfigError(f"pretrain.optim.name={oc['name']!r}: only 'adamw'")
  warmup = int(oc.get("warmup_steps", 0))
  lr = optax.warmup_cosine_decay_schedule(0.0, float(oc["lr"]), warmup,
                                          max(int(total_steps), warmup + 1), end_value=0.0)
  opt = optax.adamw(lr, b1=float(oc.get("b1", 0.9)), b2=float(oc.get("b2", 0.999)),
                    weight_decay=float(oc.get("weight_decay", 0.0)))
  clip = float(oc.get("grad_clip", 0.0) or 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    sample_batch: Callable, ema_decay: float) -> Callable:
  """A jitted pure step ``(state, data, key, step) -> (state, metrics)``.

  ``state`` is ``{"params", "opt", "ema"}``; ``sample_batch(data, key)`` draws the batch
  on device; ``loss_fn(params, batch, key) -> (loss, metrics)``. The EMA decay warms up
  as ``min(ema_decay, (1 + step) / (10 + step))``.
  """
  def step(state, data, key, i):
    k_batch, k_loss = jax.random.split(jax.random.fold_in(key, i))
    batch = sample_batch(data, k_batch)
    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, k_loss)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    i32 = i.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + i32) / (10.0 + i32))
    ema = optim.ema_update(state["ema"], params, decay)
    return dict(params=params, opt=opt, ema=ema), dict(m, grad_norm=optax.global_norm(grads))
  return jax.jit(step, donate_argnums=(0,))


def build(make_model: Callable[[], nnx.Module], seed: int) -> tuple[Any, nnx.State]:
  """``(graphdef, params)`` of ``make_model()`` with fresh weights drawn in numpy.

  The distributions are flax's defaults (LeCun-normal kernels, ``1 / sqrt(features)``
  embeddings, zero biases, unit norm scales), drawn from ``np.random.default_rng(seed)``
  in sorted path order: eager JAX initialisation compiles a kernel per parameter shape
  and takes ~25 s for the small UNet on a 2-core CPU, this takes well under a second.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in sorted(tree.flatten(abstract).items()):
    shape, name = tuple(leaf.shape), path.rsplit(".", 1)[-1]
    if name == "kernel":             # [..., in, out]: fan-in is every axis but the last
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "embedding":        # [num_embeddings, features]
      value = rng.standard_normal(shape) / np.sqrt(shape[-1])
    elif name in ("bias", "scale"):
      value = np.full(shape, 1.0 if name == "scale" else 0.0)
    else:
      raise ValueError(f"pretrain.build: no initialiser for parameter {path!r}")
    flat[path] = jnp.asarray(value, leaf.dtype)
  return graphdef, tree.unflatten_like(abstract, flat)


def init_state(params, tx) -> dict[str, Any]:
  return dict(params=params, opt=tx.init(params), ema=jax.tree.map(jnp.copy, params))


def fit(name: str, step_fn: Callable, state, data, *, total_steps: int, log_every: int,
        seed: int, batch_size: int, logdir: Path) -> tuple[Any, dict[str, float]]:
  """Runs ``total_steps`` of ``step_fn``; prints and logs the mean metrics every
  ``log_every`` steps (and at the end). Returns the final state and a summary."""
  key = jax.random.key(seed)
  writer = metrics.MetricWriter(logdir, tensorboard=False)
  progress = metrics.Progress(0, total_steps)
  history, first, logged = [], 1, []
  t0 = time.perf_counter()
  for step in range(1, total_steps + 1):
    state, m = step_fn(state, data, key, jnp.int32(step - 1))
    history.append(m)
    if metrics.itstime(step, log_every, total_steps):
      scalars = metrics.mean_metrics(history)
      history = []
      metrics.check_finite(scalars, first, step)
      first = step + 1
      line, perf = progress.line(step, batch_size)
      print(f"[pretrain {name}] {line}  " + "  ".join(
          f"{k} {v:.4g}" for k, v in sorted(scalars.items())), flush=True)
      writer.write(step, {**scalars, **perf})
      logged.append(scalars["loss"])
  jax.block_until_ready(state)
  writer.close()
  return state, dict(first_loss=logged[0], final_loss=logged[-1],
                     train_seconds=round(time.perf_counter() - t0, 1))


def _command() -> str:
  if Path(sys.argv[0]).name == "main.py":
    return "python -m adm_jax.main " + shlex.join(sys.argv[1:])
  return "adm_jax.pretrain.run(config, workdir)"


# ---------------------------------------------------------------------------------------
# VAE.
# ---------------------------------------------------------------------------------------


def vae_config(config: config_lib.ConfigDict) -> AutoencoderKLConfig:
  pc = config.pretrain
  cfg = AutoencoderKLConfig.from_diffusers({**pc.vae.to_dict(), "sample_size": pc.image_size})
  if pc.image_size % cfg.downscale:
    raise config_lib.ConfigError(f"pretrain.image_size={pc.image_size} is not a multiple of "
                                 f"the VAE downscale {cfg.downscale}")
  return cfg


def make_vae_loss(graphdef, pc: config_lib.ConfigDict) -> Callable:
  """L1 + L2 reconstruction of a posterior sample + ``kl_weight`` x KL to N(0, I), each a
  per-sample sum averaged over the batch (LDM's autoencoder loss without the perceptual
  and adversarial terms). Metrics are per pixel (``mse``, ``l1``) or per sample (``kl``)."""
  w1, w2, beta = float(pc.l1_weight), float(pc.l2_weight), float(pc.kl_weight)

  def loss_fn(params, x, key):                             # x [B, H, W, 3]
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode_moments(x)                 # [B, h, w, c] each
    rec = model.decode_raw(vae_lib.sample_gaussian(key, mean, logvar))  # [B, H, W, 3]
    d = rec - x
    l1 = jnp.abs(d).sum((1, 2, 3)).mean()
    l2 = jnp.square(d).sum((1, 2, 3)).mean()
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).sum((1, 2, 3)).mean()
    loss = w1 * l1 + w2 * l2 + beta * kl
    n = x[0].size
    return loss, dict(loss=loss / n, l1=l1 / n, mse=l2 / n, kl=kl)
  return loss_fn


def _in_chunks(fn: Callable, x: np.ndarray, chunk: int = ENCODE_CHUNK) -> np.ndarray:
  """``fn`` over ``x`` in fixed-size chunks (the last one padded), concatenated."""
  out = []
  for s in range(0, x.shape[0], chunk):
    part = x[s:s + chunk]
    m = part.shape[0]
    if m < chunk:
      part = np.concatenate([part, np.zeros((chunk - m,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(fn(part))[:m])
  return np.concatenate(out)


def _classifier():
  """The shipped digits classifier, or None when it is absent."""
  from adm_jax import digit_classifier
  if not (digit_classifier.DEFAULT_DIR / digit_classifier.CONFIG).exists():
    return None
  return digit_classifier.load(digit_classifier.DEFAULT_DIR)


def train_vae(config: config_lib.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the VAE, sets its scaling factor and exports it to ``EXPORT/vae``."""
  t_start = time.perf_counter()
  pc = config.pretrain
  out = export_dir(config, workdir)
  images, _ = digits.load("train", pc.image_size)         # [N, 32, 32, 3]
  cfg = vae_config(config)
  graphdef, params = build(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), config.seed)
  print(f"[pretrain vae] AutoencoderKL {tree.count(params) / 1e6:.3f} M parameters, "
        f"{images.shape[0]} train images {images.shape[1:]} -> latents "
        f"{(pc.image_size // cfg.downscale,) * 2 + (cfg.latent_channels,)}", flush=True)
  tx = make_optimizer(pc.optim, pc.steps)
  bs = int(pc.batch_size)
  step = make_train_step(
      make_vae_loss(graphdef, pc), tx,
      lambda data, k: data[jax.random.randint(k, (bs,), 0, data.shape[0])],
      float(pc.ema_decay))
  state, fit_summary = fit("vae", step, init_state(params, tx), jnp.asarray(images),
                           total_steps=int(pc.steps), log_every=int(pc.log_every),
                           seed=config.seed, batch_size=bs, logdir=Path(workdir) / "vae")
  params = state["ema"]
  # SD's recipe: scale latents to unit standard deviation over the training set.
  model = nnx.merge(graphdef, params)
  z = _in_chunks(jax.jit(lambda x: model.encode_raw(x)), images)  # [N, h, w, c]
  std, mean = float(np.std(z)), float(np.mean(z))
  cfg = dataclasses.replace(cfg, scaling_factor=float(f"{1.0 / std:.5g}"))
  vae_convert.export(cfg, params, out / "vae")
  # Evaluate the exported folder through the normal loader.
  scores = evaluate_vae(out / "vae")
  summary = dict(command=_command(), steps=int(pc.steps), batch_size=bs,
                 params=tree.count(params), config=cfg.to_diffusers(),
                 raw_latent_std=round(std, 5), raw_latent_mean=round(mean, 5),
                 scaling_factor=cfg.scaling_factor, **fit_summary, **scores,
                 total_seconds=round(time.perf_counter() - t_start, 1),
                 kl_weight=float(pc.kl_weight), lr=float(pc.optim.lr))
  _update_summary(out, "vae", summary)
  print(f"[pretrain vae] exported {out / 'vae'}: scaling_factor {cfg.scaling_factor} "
        f"(raw latent std {std:.4f}, mean {mean:.4f}); held-out MSE "
        f"{scores['heldout_mse']:.5f}, train MSE {scores['train_mse']:.5f}", flush=True)
  return summary


def evaluate_vae(folder: str | Path) -> dict[str, float]:
  """Reconstruction MSE (posterior mean, images in [-1, 1]) on both splits, and the
  shipped classifier's accuracy on the held-out reconstructions (when present)."""
  cfg, graphdef, params = vae_convert.load(folder)
  model = nnx.merge(graphdef, params)
  recon = jax.jit(lambda x: model.decode(model.encode(x)))
  size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
  out = {}
  for split in ("heldout", "train"):
    x, labels = digits.load(split, size)
    r = _in_chunks(recon, x)
    out[f"{split}_mse"] = round(float(np.mean(np.square(r - x))), 6)
    if split == "heldout":
      clf = _classifier()
      if clf is not None:
        out["heldout_recon_classifier_accuracy"] = round(
            float(np.mean(clf.predict(np.clip(r, -1, 1)) == labels)), 4)
        out["heldout_classifier_accuracy"] = round(
            float(np.mean(clf.predict(x) == labels)), 4)
  return out


# ---------------------------------------------------------------------------------------
# Text path: tokenizers and frozen random CLIP text encoders.
# ---------------------------------------------------------------------------------------


def write_tokenizer(folder: str | Path, pad_token: str, words: str = TOKENIZER_WORDS,
                    max_length: int = 77) -> int:
  """A CLIP BPE tokenizer over ``words`` as a ``vocab.json`` + ``merges.txt`` folder.

  The vocabulary is CLIP's byte-level alphabet (plain and ``</w>``-final), one merge
  chain per word, then ``<|startoftext|>`` and ``<|endoftext|>`` last (EOS has the
  highest id, as in CLIP, so the legacy argmax pooling finds it). Returns the
  vocabulary size.
  """
  from tokenizers import pre_tokenizers  # Host-side only.
  folder = Path(folder)
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab: dict[str, int] = {}
  for suffix in ("", "</w>"):
    for c in alphabet:
      vocab[c + suffix] = len(vocab)
  merges: list[str] = []
  for word in words.split():
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    cur = pieces[0]
    for piece in pieces[1:]:
      if f"{cur} {piece}" not in merges:
        merges.append(f"{cur} {piece}")
      cur += piece
      vocab.setdefault(cur, len(vocab))
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  special = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)
  (folder / "tokenizer_config.json").write_text(json.dumps(
      dict(tokenizer_class="CLIPTokenizer", model_max_length=max_length, **special),
      indent=2, sort_keys=True))
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2,
                                                             sort_keys=True))
  return len(vocab)


def text_encoder_configs(config: config_lib.ConfigDict, vocab: Mapping[str, int]
                         ) -> tuple[CLIPTextConfig, CLIPTextConfig]:
  """``text_encoder`` (CLIP-L-like: quick_gelu, legacy ``eos_token_id=2``) and
  ``text_encoder_2`` (gelu, projection head, EOS by id) over ``vocab``."""
  tc = config.pretrain.text
  common = dict(vocab_size=len(vocab), bos_token_id=vocab[BOS],
                max_position_embeddings=int(tc.max_length))
  te1 = CLIPTextConfig(**common, **tc.encoder_1.to_dict(), hidden_act="quick_gelu",
                       eos_token_id=2, pad_token_id=vocab[PAD_TOKENS["tokenizer"]])
  te2 = CLIPTextConfig(**common, **tc.encoder_2.to_dict(), hidden_act="gelu",
                       eos_token_id=vocab[EOS], pad_token_id=vocab[PAD_TOKENS["tokenizer_2"]],
                       with_projection=True)
  return te1, te2


def build_text_path(config: config_lib.ConfigDict, out: Path):
  """Writes both tokenizers and both (random, frozen) text encoders under ``out``;
  returns ``(tokenizers, (te1, te2) modules, their configs)``."""
  max_length = int(config.pretrain.text.max_length)
  sizes = {name: write_tokenizer(out / name, pad, max_length=max_length)
           for name, pad in PAD_TOKENS.items()}
  vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
  if len(set(sizes.values())) != 1:
    raise RuntimeError(f"tokenizer vocabularies differ in size: {sizes}")
  cfgs = text_encoder_configs(config, vocab)
  seed = int(config.pretrain.text.seed)
  modules = []
  for i, (name, cfg) in enumerate(zip(("text_encoder", "text_encoder_2"), cfgs)):
    graphdef, params = build(lambda cfg=cfg: CLIPTextModel(cfg, rngs=nnx.Rngs(0)), seed + i)
    clip_convert.export(cfg, params, out / name)
    modules.append(nnx.merge(graphdef, params))
  tokenizers = {name: conditioning.load_tokenizer(out / name) for name in PAD_TOKENS}
  return tokenizers, tuple(modules), cfgs


def encode_digit_prompts(tokenizers, encoders, resolution: int) -> dict[str, np.ndarray]:
  """SDXL conditioning of the ten digit prompts: ``context`` [10, 77, D1 + D2],
  ``pooled`` [10, P], ``time_ids`` [10, 6] (``resolution`` square, no crop)."""
  prompts = digits.prompts()
  ids = [conditioning.tokenize(tokenizers[t], prompts) for t in PAD_TOKENS]
  time_ids = conditioning.sdxl_add_time_ids((resolution, resolution), (0, 0),
                                            (resolution, resolution), len(prompts))
  cond = conditioning.encode_sdxl(*encoders, *ids, time_ids=time_ids)
  return {k: np.asarray(v) for k, v in cond.items()}


def prompt_separation(cond: Mapping[str, np.ndarray]) -> dict[str, float]:
  """How different the ten digit prompts' embeddings are: for ``pooled`` and for the
  whole ``context``, the largest cosine similarity and the smallest L2 distance (relative
  to the mean norm) between two different digits."""
  out = {}
  for key in ("pooled", "context"):
    v = cond[key].reshape(cond[key].shape[0], -1).astype(np.float64)   # [10, F]
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = ~np.eye(v.shape[0], dtype=bool)
    out[f"{key}_max_cosine"] = round(float(cos[off].max()), 4)
    dist = np.linalg.norm(v[:, None] - v[None], axis=-1)
    rel = dist / np.linalg.norm(v, axis=1).mean()
    out[f"{key}_min_rel_distance"] = round(float(rel[off].min()), 4)
  return out


# ---------------------------------------------------------------------------------------
# Teacher UNet.
# ---------------------------------------------------------------------------------------


def unet_config(config: config_lib.ConfigDict, te1: CLIPTextConfig, te2: CLIPTextConfig,
                latent_side: int, latent_channels: int) -> UNetConfig:
  """The UNet of ``config.pretrain.unet``; the text widths, the ``text_time`` input size
  and the sample size follow from the text encoders and the VAE."""
  d = config.pretrain.unet.to_dict()
  derived = dict(cross_attention_dim=te1.hidden_size + te2.hidden_size,
                 projection_class_embeddings_input_dim=(
                     te2.projection_dim + 6 * int(d["addition_time_embed_dim"])),
                 sample_size=latent_side, in_channels=latent_channels,
                 out_channels=latent_channels, addition_embed_type="text_time")
  clash = sorted(k for k in derived if k in d and d[k] != derived[k])
  if clash:
    raise config_lib.ConfigError(
        f"pretrain.unet sets {', '.join(clash)}, which follow from the text encoders and "
        f"the VAE ({', '.join(f'{k}={derived[k]}' for k in clash)}); remove them")
  return UNetConfig.from_diffusers({**d, **derived})


def make_denoise_loss(graphdef, param, p_uncond: float) -> Callable:
  """ε-prediction MSE at uniform integer timesteps; a ``p_uncond`` share of the batch
  gets the zero (``force_zeros_for_empty_prompt``) text conditioning."""
  T = param.schedule.num_train_timesteps

  def loss_fn(params, batch, key):
    x0, cond = batch["latents"], batch["cond"]               # [B, h, w, c]
    b = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 0, T)                  # [B]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_t = param.add_noise(x0, eps, t)
    keep = ~jax.random.bernoulli(k_drop, p_uncond, (b,))     # [B]
    cond = {k: (v * keep.reshape((b,) + (1,) * (v.ndim - 1)).astype(v.dtype)
                if k in conditioning.TEXT_KEYS else v) for k, v in cond.items()}
    pred = nnx.merge(graphdef, params)(x_t, param.model_time(t), cond)
    loss = jnp.mean(jnp.square(pred - param.target(x0, eps, t)))
    return loss, dict(loss=loss)
  return loss_fn


def _teacher_batch(bs: int) -> Callable:
  def sample(data, key):
    idx = jax.random.randint(key, (bs,), 0, data["latents"].shape[0])
    labels = data["labels"][idx]                             # [B]
    cond = {k: v[labels] for k, v in data["prompt_cond"].items()}
    return dict(latents=data["latents"][idx], cond=cond)
  return sample


def encode_images(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
  """Scaled latents (posterior mean x scaling factor) ``[N, h, w, c]``."""
  return _in_chunks(jax.jit(lambda x: vae.encode(x)), images)


def train_teacher(config: config_lib.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains the UNet on VAE latents of the train split and exports the whole pipeline."""
  from adm_jax import teacher as teacher_lib
  t_start = time.perf_counter()
  pc = config.pretrain
  out = export_dir(config, workdir)
  vae_dir = out / "vae"
  if not (vae_dir / vae_convert.CONFIG).exists():
    raise FileNotFoundError(
        f"digits VAE not found: {vae_dir} (train it first: python -m adm_jax.main "
        f"--config=configs/digits_vae.py --workdir=DIR --mode=pretrain, with the same "
        f"pretrain.export_dir)")
  vcfg, vgraph, vparams = vae_convert.load(vae_dir)
  vae = nnx.merge(vgraph, vparams)
  res = int(config.teacher.resolution)
  images, labels = digits.load("train", res)
  latents = encode_images(vae, images)                      # [N, h, w, c]
  print(f"[pretrain teacher] encoded {latents.shape[0]} train digits -> latents "
        f"{latents.shape[1:]} (std {latents.std():.3f}, mean {latents.mean():.3f})",
        flush=True)
  tokenizers, encoders, (te1, te2) = build_text_path(config, out)
  prompt_cond = encode_digit_prompts(tokenizers, encoders, res)
  separation = prompt_separation(prompt_cond)
  print(f"[pretrain teacher] prompt embedding separation: {separation}", flush=True)
  if min(separation["pooled_min_rel_distance"],
         separation["context_min_rel_distance"]) < MIN_PROMPT_SEPARATION:
    raise RuntimeError(f"text encoders barely separate the digit prompts: {separation}")

  cfg = unet_config(config, te1, te2, latents.shape[1], latents.shape[-1])
  graphdef, params = build(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)),
                            config.seed)
  print(f"[pretrain teacher] UNet {tree.count(params) / 1e6:.3f} M parameters", flush=True)
  param = teacher_lib.make_parameterization(config.teacher)
  tx = make_optimizer(pc.optim, pc.steps)
  bs = int(pc.batch_size)
  step = make_train_step(make_denoise_loss(graphdef, param, float(pc.p_uncond)), tx,
                         _teacher_batch(bs), float(pc.ema_decay))
  data = dict(latents=jnp.asarray(latents), labels=jnp.asarray(labels),
              prompt_cond={k: jnp.asarray(v) for k, v in prompt_cond.items()})
  state, fit_summary = fit("teacher", step, init_state(params, tx), data,
                           total_steps=int(pc.steps), log_every=int(pc.log_every),
                           seed=config.seed, batch_size=bs, logdir=Path(workdir) / "teacher")
  params = state["ema"]
  unet_convert.export(cfg, params, out / "unet")
  write_pipeline_files(out, config)
  summary = dict(command=_command(), steps=int(pc.steps), batch_size=bs,
                 lr=float(pc.optim.lr), ema_decay=float(pc.ema_decay),
                 p_uncond=float(pc.p_uncond),
                 params=dict(unet=tree.count(params),
                             text_encoder=tree.count(nnx.state(encoders[0], nnx.Param)),
                             text_encoder_2=tree.count(nnx.state(encoders[1], nnx.Param))),
                 prompt_separation=separation, **fit_summary)
  summary.update(evaluate_teacher(config, graphdef, params, vae, prompt_cond, param,
                                  Path(workdir) / "teacher"))
  shutil.copyfile(Path(workdir) / "teacher" / "samples.png", out / SAMPLES)
  summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
  _update_summary(out, "teacher", summary)
  print(f"[pretrain teacher] exported the pipeline to {out}", flush=True)
  return summary


def evaluate_teacher(config, graphdef, params, vae, prompt_cond, param, logdir: Path
                     ) -> dict[str, Any]:
  """Held-out ε-MSE, then ``eval.num_per_prompt`` CFG samples per digit (the Euler
  sampler of ``--mode=sample``): a labelled PNG grid and, with the shipped classifier,
  its FID / alignment / diversity against the held-out digits."""
  from adm_jax import evaluation, sampling
  ec = config.pretrain.eval
  res = int(config.teacher.resolution)
  apply = lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)  # noqa: E731
  # Held-out denoising loss at fixed noise and timesteps (conditional).
  x_h, y_h = digits.load("heldout", res)
  lat_h = encode_images(vae, x_h)                           # [M, h, w, c]
  k_t, k_eps = jax.random.split(jax.random.key(ec.seed))
  t_h = jax.random.randint(k_t, (lat_h.shape[0],), 0, param.schedule.num_train_timesteps)
  eps = jax.random.normal(k_eps, lat_h.shape)
  cond_h = {k: jnp.asarray(v)[y_h] for k, v in prompt_cond.items()}
  pred = jax.jit(apply)(params, param.add_noise(lat_h, eps, t_h), param.model_time(t_h),
                        cond_h)
  out: dict[str, Any] = dict(heldout_eps_mse=round(float(jnp.mean(jnp.square(pred - eps))), 5))
  # Samples.
  labels = np.repeat(np.arange(digits.NUM_CLASSES), int(ec.num_per_prompt))
  cond = {k: jnp.asarray(v)[labels] for k, v in prompt_cond.items()}
  noise = jax.random.normal(jax.random.key(ec.seed + 1), (len(labels),) + lat_h.shape[1:])
  sample = jax.jit(sampling.make_ode_sampler(
      apply, param, int(ec.num_steps), spacing="trailing", cfg_scale=float(ec.guidance_scale),
      sampler="euler"))
  lat = sample(params, noise, cond, conditioning.uncond_like(cond))
  imgs = np.asarray(jax.jit(lambda z: vae.decode(z))(lat))   # [n, H, W, 3]
  logdir.mkdir(parents=True, exist_ok=True)
  grid = evaluation.labelled_grid(imgs, labels, logdir / "samples.png")
  out.update(sample_steps=int(ec.num_steps), sample_guidance_scale=float(ec.guidance_scale),
             num_samples=int(len(labels)))
  if ec.classifier and _classifier() is not None:
    ev = evaluation.DigitsEvaluator()
    scores = ev.evaluate(np.clip(imgs, -1, 1), labels)
    base = ev.baseline(len(labels)) if len(labels) >= 2 else {}
    out.update({f"sample_{k}": round(float(v), 4) for k, v in scores.items()})
    out.update({f"real_train_{k}": round(float(v), 4) for k, v in base.items()
                if k != "reference_diversity"})
  print(f"[pretrain teacher] wrote {grid}; " + ", ".join(
      f"{k} {v}" for k, v in out.items()), flush=True)
  return out


# ---------------------------------------------------------------------------------------
# Pipeline files.
# ---------------------------------------------------------------------------------------


def scheduler_config(tcfg: config_lib.ConfigDict) -> dict[str, Any]:
  """diffusers ``EulerDiscreteScheduler`` config of the teacher's schedule (trailing)."""
  return {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
          "beta_end": float(tcfg.beta_end), "beta_schedule": tcfg.beta_schedule,
          "beta_start": float(tcfg.beta_start), "final_sigmas_type": "zero",
          "interpolation_type": "linear",
          "num_train_timesteps": int(tcfg.num_train_timesteps),
          "prediction_type": tcfg.parameterization, "rescale_betas_zero_snr": False,
          "sigma_max": None, "sigma_min": None, "steps_offset": 1,
          "timestep_spacing": "trailing", "timestep_type": "discrete",
          "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
          "use_karras_sigmas": False}


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True,
    "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_pipeline_files(out: Path, config: config_lib.ConfigDict) -> None:
  """``scheduler/scheduler_config.json`` and ``model_index.json``."""
  if config.teacher.parameterization != "epsilon":
    raise config_lib.ConfigError("the digits teacher is epsilon-prediction "
                                 "(config.teacher.parameterization)")
  (out / "scheduler").mkdir(parents=True, exist_ok=True)
  (out / "scheduler" / "scheduler_config.json").write_text(
      json.dumps(scheduler_config(config.teacher), indent=2, sort_keys=True) + "\n")
  (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True)
                                        + "\n")


def _update_summary(out: Path, target: str, summary: Mapping[str, Any]) -> None:
  """Records ``summary`` under ``target`` in ``EXPORT/training.json``; re-renders README."""
  path = out / SUMMARY
  data = json.loads(path.read_text()) if path.exists() else {}
  data[target] = dict(summary, platform=_platform())
  if target == "vae":
    data.pop("teacher", None)   # a new VAE invalidates any teacher trained on the old one
  path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
  (out / README).write_text(render_readme(data))


def _platform() -> str:
  import os
  import platform
  return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")


def _fmt_seconds(s: float) -> str:
  return f"{s / 60:.1f} min ({s:.0f} s)"


def render_readme(data: Mapping[str, Any]) -> str:
  """The export folder's README from the ``training.json`` records."""
  lines = [
      "# digits-sdxl: a small SDXL-family teacher trained on scikit-learn's digits", "",
      "A complete `StableDiffusionXLPipeline` folder (diffusers layout), trained from "
      "scratch by `adm_jax.pretrain` on the `\"train\"` split of `adm_jax.digits` "
      "(sklearn `load_digits`, 8x8 digits upsampled to 32x32, stratified 20 % held out). "
      "Prompts: `\"a handwritten digit {k}\"`; 32x32 images, 8x8x4 latents. The text "
      "encoders are random-initialised and frozen (they only need to tell ten prompts "
      "apart); the tokenizers know the words `a handwritten digit 0 1 2 3 4 5 6 7 8 9`.",
      "", "Use it through adm_jax (convert once, then e.g. sample):", "", "```",
      "python -m adm_jax.convert --family=sdxl --src=weights/digits-sdxl "
      "--dst=weights/digits-sdxl-jax",
      "python -m adm_jax.main --config=configs/digits_teacher.py --workdir=DIR --mode=sample",
      "```", "", "or with diffusers: `StableDiffusionXLPipeline.from_pretrained(folder)`, "
      "`pipe(prompt, height=32, width=32, num_inference_steps=25, guidance_scale=...)`.", ""]
  vae = data.get("vae")
  if vae:
    lines += ["## VAE", "", "```", vae["command"], "```", "",
              f"- AutoencoderKL, {vae['params'] / 1e6:.3f} M parameters; "
              f"{vae['steps']} steps of batch {vae['batch_size']} "
              f"(AdamW lr {vae['lr']}, KL weight {vae['kl_weight']}).",
              f"- Training loop {_fmt_seconds(vae['train_seconds'])}, whole run "
              f"{_fmt_seconds(vae['total_seconds'])} on {vae['platform']}.",
              f"- scaling_factor {vae['scaling_factor']} = 1 / std of the raw training "
              f"latents (std {vae['raw_latent_std']}, mean {vae['raw_latent_mean']}).",
              f"- Reconstruction MSE (images in [-1, 1], posterior mean): held-out "
              f"{vae['heldout_mse']}, train {vae['train_mse']}."]
    if "heldout_recon_classifier_accuracy" in vae:
      lines.append(f"- Digits classifier on held-out reconstructions: "
                   f"{vae['heldout_recon_classifier_accuracy']:.2%} "
                   f"(on the originals: {vae['heldout_classifier_accuracy']:.2%}).")
    lines.append("")
  te = data.get("teacher")
  if te:
    p = te["params"]
    lines += ["## UNet and text encoders", "", "```", te["command"], "```", "",
              f"- UNet2DConditionModel (`text_time`), {p['unet'] / 1e6:.3f} M parameters; "
              f"text encoders {p['text_encoder'] / 1e3:.0f} k + "
              f"{p['text_encoder_2'] / 1e3:.0f} k parameters (frozen, random).",
              f"- ε-prediction on SDXL's scaled-linear schedule; {te['steps']} steps of "
              f"batch {te['batch_size']} (AdamW lr {te['lr']}, cosine decay), "
              f"{te['p_uncond']:.0%} unconditional (zero context and pooled); the exported "
              f"weights are the EMA (decay {te['ema_decay']}).",
              f"- Training loop {_fmt_seconds(te['train_seconds'])}, whole run "
              f"{_fmt_seconds(te['total_seconds'])} on {te['platform']}.",
              f"- Held-out ε-MSE (conditional, uniform t): {te['heldout_eps_mse']}.",
              f"- Prompt separation (largest cosine between two digits): pooled "
              f"{te['prompt_separation']['pooled_max_cosine']}, context "
              f"{te['prompt_separation']['context_max_cosine']}."]
    if "sample_alignment" in te:
      lines.append(
          f"- {te['num_samples']} samples ({te['sample_steps']}-step Euler, trailing, CFG "
          f"{te['sample_guidance_scale']}): classified as the prompted digit "
          f"{te['sample_alignment']:.1%}; FID vs held-out digits (classifier features) "
          f"{te['sample_fid']:.2f} (real train digits, same count: "
          f"{te['real_train_fid']:.2f}).")
    lines += ["", f"![samples, one row per prompt]({SAMPLES})"]
    lines.append("")
  return "\n".join(lines)
