"""Shared config fragments, argument parsing and validation for ``configs/*.py``.

A config file defines ``get_config(arg)`` and builds its ``ConfigDict`` from the presets
here, so that teacher, optimiser and mesh settings are written once. :func:`validate`
checks every enumerated value against its valid choices, and :func:`check_overrides`
rejects ``--config.x.y=...`` flags naming keys the config does not have, before absl
parses them, with a message that lists the valid keys.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

# key path -> valid values. Checked by validate(); extended as features land.
CHOICES: dict[str, tuple] = {
    "family": ("sdxl", "toy"),
    "method": ("dmd2", "adm", "adp", "dmdx", "regression"),
    "teacher.dtype": ("float32", "bfloat16"),
    "teacher.param_dtype": ("float32", "bfloat16"),
    "teacher.parameterization": ("epsilon", "v_prediction", "flow"),
    "sample.sampler": ("ddim", "euler"),
    "sample.spacing": ("trailing", "leading", "linspace"),
    "pairs.sampler": ("ddim", "euler"),
    "pairs.spacing": ("trailing", "leading", "linspace"),
    "pairs.source": ("online", "files"),
    "pairs.record_dtype": ("float32", "float16"),
    "hparams.gan_loss": ("nonsaturating", "hinge"),
    "hparams.regression": ("mse", "pseudo_huber"),
    "disc.head": ("admhead2d", "dmd2"),
    "dmdx.adm_disc_init": ("fresh", "adp_latent"),
    # adm_jax.models.layers.REMAT_POLICIES (a test keeps the two equal).
    **{f"remat.{net}": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                        "everything_saveable")
       for net in ("generator", "fake_score", "teacher", "decoder", "pixel")},
    "compile.target_kind": ("auto", "tpu", "cpu"),
}

CONVERT_HINT = ("python -m adm_jax.convert --family={family} "
                "--src=/path/to/diffusers/{name} --dst={dst}")


class ConfigError(ValueError):
  """A config key or value is invalid; the message names the key and what is valid."""


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """``"tiny"`` or ``"variant=tiny,batch=8"`` -> ConfigDict over ``defaults``.

  A bare word sets ``variant``. Values are cast to the type of their default.
  """
  out = ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = "variant", part
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; valid: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


# ------------------------------------------------------------------------------------
# Presets.
# ------------------------------------------------------------------------------------

SDXL_BASE = "stable-diffusion-xl-base-1.0"


def sdxl_teacher(weights_dir: str = f"weights/{SDXL_BASE}") -> ConfigDict:
  """SDXL base 1.0: ε-prediction on the scaled-linear VP schedule, two CLIP encoders."""
  return ConfigDict(dict(
      family="sdxl",
      weights_dir=weights_dir,           # written by `python -m adm_jax.convert`
      source_name=SDXL_BASE,             # only used in the convert hint
      dtype="bfloat16",                  # compute dtype of the frozen teacher
      param_dtype="float32",             # its storage (bfloat16: half the memory)
      parameterization="epsilon",
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      guidance_scale=8.0,                # DMD2 SDXL real-score CFG
      resolution=1024,                   # pixels; latents are resolution / 8
  ))


DIGITS_TEACHER = "weights/digits-sdxl"


def digits_teacher() -> ConfigDict:
  """The embedded digits teacher (``weights/digits-sdxl``, diffusers format, committed;
  trained by ``configs/digits_teacher.py``): converted once into ``WORKDIR/teacher``."""
  c = sdxl_teacher(weights_dir="")
  c.update(diffusers_dir=DIGITS_TEACHER, source_name="digits-sdxl", dtype="float32",
           resolution=32, guidance_scale=2.0)     # 99 % alignment, FID near real (README there)
  return c


def digits_distillation(method: str, *, times, total_steps: int, batch_size: int,
                        variant: str = "full") -> ConfigDict:
  """Everything the digits distillation configs share: the embedded teacher, ODE pairs
  from its 25-step Euler sampler, the 10 prompts, evaluation by the shipped digit
  classifier (FID vs held-out digits, alignment, diversity), AdamW 1e-4 for every
  network; ``variant="tiny"``: a seconds-long smoke run of the same job (tests)."""
  if variant not in ("full", "tiny"):
    raise ConfigError(f"unknown variant {variant!r}; valid: full, tiny")
  from adm_jax import digits
  prompts = tuple(digits.prompts())
  c = distillation(method, times=times, total_steps=total_steps, batch_size=batch_size)
  c.family = "sdxl"
  c.seed = 0
  c.teacher = digits_teacher()
  c.data = ConfigDict(dict(prompts=prompts))
  c.pairs = pair_settings(num_steps=25, sampler="euler", spacing="trailing",
                          source="files", num_pairs=2048, shard_size=512, batch_size=64,
                          cache_conditioning=True)
  c.eval = eval_settings(evaluator="digits", prompts=prompts, labels=tuple(range(10)),
                         num_per_prompt=100, batch_size=200)
  c.sample = sample_settings(prompts=prompts, num_per_prompt=8, guidance_scale=2.0)
  c.mesh = mesh(data=-1)
  c.sharding_rules = REPLICATE_RULES
  c.optim = ConfigDict({net: adamw(1e-4, warmup_steps=50, weight_decay=0.0)
                        for net in ("generator", "fake_score", "discriminator")})
  c.log_every = 50
  c.checkpoint_every = 500
  c.num_samples = 20
  if variant == "tiny":
    c.total_steps, c.batch_size = 4, 8
    c.log_every = c.checkpoint_every = 2
    c.pairs.update(num_pairs=16, shard_size=8, batch_size=8, num_steps=4)
    c.eval.update(num_per_prompt=2, batch_size=20)
    c.num_samples = 4
  return c


def toy_teacher() -> ConfigDict:
  """The exact-score 2-D mixture: ε-prediction on SDXL's VP schedule, CFG 2."""
  return ConfigDict(dict(family="toy", parameterization="epsilon", num_train_timesteps=1000,
                         beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         guidance_scale=2.0, dtype="float32"))


def adamw(lr: float, *, warmup_steps: int = 500, grad_clip: float = 10.0,
          weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999) -> ConfigDict:
  """AdamW with linear warm-up then constant LR and global-norm clipping (DMD2 App. F)."""
  return ConfigDict(dict(name="adamw", lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip,
                         weight_decay=weight_decay, b1=b1, b2=b2))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple:
  """Mesh axes as a tuple (tuples can be overridden on the command line:
  ``--config.mesh="(('data', 2), ('fsdp', 4))"``)."""
  return (("data", data), ("fsdp", fsdp), ("tensor", tensor))


# First match wins; the frozen teacher is replicated or FSDP-sharded like the students.
# Parameters under 1 MB (norms, biases) stay replicated.
FSDP_RULES = ((".*", "fsdp(min_size_mb=1)"),)
REPLICATE_RULES = ((".*", "replicate"),)


def rules_for(config, net: str):
  """The parameter sharding rules of network ``net`` (``generator`` | ``fake_score`` |
  ``discriminator`` | ``teacher``): ``config.sharding_rules`` is one rule list for every
  network, or ``{net: rules}`` (e.g. the frozen teacher replicated, the trained nets
  FSDP; optimiser states follow their parameters)."""
  rules = config.sharding_rules
  if isinstance(rules, (dict, ConfigDict)):
    if net not in rules:
      raise ConfigError(f"config.sharding_rules has no entry for {net!r} (has "
                        f"{', '.join(sorted(rules))})")
    return tuple(rules[net])
  return rules


def distillation(method: str, *, times: Sequence[float], total_steps: int,
                 batch_size: int, adp_fraction: float = 0.5) -> ConfigDict:
  """Keys every training config shares (the trainer reads exactly these).

  Args:
    method: ``dmd2`` | ``adm`` | ``adp`` | ``dmdx`` | ``regression``.
    times: the generator's conditioning times, noisiest first (``(999,)`` one-step;
      ``(999, 749, 499, 249)``: DMD2's four steps with backward simulation).
    total_steps: iterations of the whole run (DMDX: ADP and ADM together).
    batch_size: global batch.
    adp_fraction: DMDX's share of ``total_steps`` spent in ADP.
  """
  return ConfigDict(dict(
      method=method,
      student=dict(times=tuple(float(t) for t in times)),
      # DMD2: fake score every step, generator every 5th (App. C); ADM / ADP: TTUR 1.
      ttur=5 if method == "dmd2" else 1,
      ema_decay=0.0,
      # CFG of the real score in the DM (DMD2) and ADM losses; 0: teacher.guidance_scale
      # (which the ODE pairs and teacher samples use).
      real_guidance_scale=0.0,
      batch_size=batch_size,
      total_steps=total_steps,
      dmd2=dict(gan=True),
      # DMDX: ADP steps, per-stage optimiser overrides ({net: {"lr": ...}}) and TTUR
      # ratios (0: ``ttur``), and where ADM's discriminator heads start: "fresh"
      # (initialised) or "adp_latent" (ADP's latent heads, on the same teacher features).
      dmdx=dict(adp_steps=max(1, int(total_steps * adp_fraction)), adp_optim={},
                adm_optim={}, adp_ttur=0, adm_ttur=0, adm_disc_init="fresh"),
      hparams=dict(),                     # overrides of adm_jax.steps.default_hparams
      pairs=pair_settings(),
      eval=eval_settings(),
      log_every=100,
      checkpoint_every=1000,
      keep_checkpoints=2,
      resume="",                          # another run's checkpoint (see README)
      sample_every=0,                     # sample grid every N steps (0: at the end only)
      num_samples=16,
      # XLA's persistent compilation cache (a restarted or preempted run skips compiling).
      compilation_cache_dir="",
      # Memory levers. Activation rematerialisation of each network's blocks (none |
      # full | dots_saveable | ...): the UNets' resnet and transformer blocks (the
      # teacher's count where gradients flow through it: ADM / ADP discriminator
      # features), ADP's VAE decoder resnets and pixel-encoder (SAM) ViT blocks.
      remat=dict(generator="none", fake_score="none", teacher="none", decoder="none",
                 pixel="none"),
      # Each stack of identical transformer blocks as one lax.scan (faster compiles).
      scan_blocks=False,
      # ADP's pixel branch (VAE decode + pixel encoder at full resolution, the largest
      # activations of DMDX) in this many sequential, rematerialised passes over the
      # batch; keep global_batch / pixel_microbatches a multiple of the batch shards.
      pixel_microbatches=1,
      # --mode=compile (adm_jax/compile_check.py): the target to compile for (local: this
      # run's devices; a Cloud TPU slice such as v5p-8 / v5p-64 / v5e-16 / v6e-8,
      # compiled here by libtpu; cpu-N fake devices), the global batch (0: batch_size)
      # an iteration time for the implied MFU (0: none) and which steps to compile
      # ("" every one; else e.g. "adm/generator,adm/fake_score").
      compile=dict(target="local", target_kind="auto", batch_size=0, step_time_s=0.0,
                   steps=""),
  ))


def pair_settings(**overrides) -> ConfigDict:
  """ODE pairs (``adm_jax/pairs.py``): the teacher's PF-ODE with its CFG scale.

  ``source="online"`` solves the ODE inside each training batch (small runs, tests);
  ``"files"`` reads the pair job's ArrayRecord shards from ``dir`` (default
  ``WORKDIR/pairs``), running ``--mode=pairs`` first when they are missing.
  """
  base = dict(num_steps=25, sampler="ddim", spacing="trailing", source="online", dir="",
              prompts_file="", num_pairs=1024, shard_size=256, batch_size=32, seed=0,
              record_dtype="float32", cache_conditioning=True)
  base.update(overrides)
  return ConfigDict(base)


def eval_settings(**overrides) -> ConfigDict:
  """Evaluation of the student (``adm_jax/evaluation.py``) every ``every`` steps and at
  the end of the run: ``num_per_prompt`` one-step samples of each of ``prompts``, scored
  by ``evaluator`` against ``labels`` (the class each prompt asks for). ``evaluator=""``:
  no evaluation."""
  base = dict(evaluator="", prompts=(), labels=(), num_per_prompt=16, batch_size=64,
              every=0, seed=0)
  base.update(overrides)
  return ConfigDict(base)


def sample_settings(**overrides) -> ConfigDict:
  """Teacher sampling (``--mode=sample``): the PF-ODE with CFG, as diffusers pipelines."""
  base = dict(prompts=("a photo of a cat", "a watercolor painting of a lighthouse"),
              num_steps=25, sampler="euler", spacing="trailing", guidance_scale=5.0,
              num_per_prompt=2, seed=0)
  base.update(overrides)
  return ConfigDict(base)


# ------------------------------------------------------------------------------------
# Loading and checking.
# ------------------------------------------------------------------------------------

def load_config_file(spec: str) -> ConfigDict:
  """``"configs/x.py:arg"`` -> ``get_config(arg)`` (the same split absl uses)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def override(config: ConfigDict, values: dict) -> ConfigDict:
  """Sets ``{"a.b": value}`` entries on ``config`` in place (scripts and tests; a new
  leaf may be added, e.g. under ``hparams``). Returns ``config``."""
  for dotted, value in values.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _lookup(config: ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _has_key(config, dotted: str) -> tuple[bool, str, list[str]]:
  node, done = config, []
  for part in dotted.split("."):
    if not isinstance(node, (ConfigDict, dict)) or part not in node:
      keys = sorted(node.keys()) if isinstance(node, (ConfigDict, dict)) else []
      return False, ".".join(done), keys
    node = node[part]
    done.append(part)
  return True, dotted, []


def check_overrides(argv: Sequence[str]) -> None:
  """Raises :class:`ConfigError` for ``--config.a.b=...`` flags naming unknown keys."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
               if a.startswith("--config.")]
  if spec is None or not overrides:
    return
  config = load_config_file(spec)
  for key in overrides:
    ok, parent, keys = _has_key(config, key)
    if not ok:
      where = f"under {parent!r}" if parent else "at the top level"
      raise ConfigError(f"unknown config key {key!r}; valid keys {where}: {', '.join(keys)}")


def validate(config: ConfigDict) -> ConfigDict:
  """Checks enumerated values (:data:`CHOICES`) and cross-field constraints."""
  for key, choices in CHOICES.items():
    ok, _, _ = _has_key(config, key)
    if ok and _lookup(config, key) not in choices:
      raise ConfigError(f"invalid value {_lookup(config, key)!r} for config key {key!r}; "
                        f"valid choices: {', '.join(map(repr, choices))}")
  n = config.get("pixel_microbatches", 1)
  if not isinstance(n, int) or n < 1:
    raise ConfigError(f"config.pixel_microbatches={n!r}: a positive integer (1: one pass)")
  if n > 1 and "batch_size" in config:
    for what, b in (("batch_size", config.batch_size),
                    ("compile.batch_size", config.get("compile", {}).get("batch_size", 0))):
      if b and b % n:
        raise ConfigError(f"config.{what}={b} does not split into "
                          f"config.pixel_microbatches={n} passes")
  for key, least in (("ttur", 1), ("dmdx.adp_ttur", 0), ("dmdx.adm_ttur", 0)):
    ok, _, _ = _has_key(config, key)
    value = _lookup(config, key) if ok else least
    if not isinstance(value, int) or value < least:
      raise ConfigError(f"config.{key}={value!r}: an integer >= {least}"
                        + (" (0: config.ttur)" if least == 0 else ""))
  if "family" in config and "teacher" in config and config.teacher.family != config.family:
    raise ConfigError(f"config.teacher.family={config.teacher.family!r} differs from "
                      f"config.family={config.family!r}")
  return config


def teacher_paths(teacher: ConfigDict, components: Sequence[str]) -> dict[str, Path]:
  """Expected converted-weight folders; a missing one raises with the convert command."""
  root = Path(teacher.weights_dir)
  paths = {c: root / c for c in components}
  missing = [str(p) for p in paths.values() if not p.exists()]
  if missing:
    hint = CONVERT_HINT.format(family=teacher.family, name=teacher.source_name, dst=root)
    raise FileNotFoundError(
        f"teacher weights not found: {', '.join(missing)}. Convert a diffusers checkpoint "
        f"first:\n  {hint}\nor point config.teacher.weights_dir at converted weights.")
  return paths


def asdict(config: ConfigDict) -> dict[str, Any]:
  return config.to_dict()
