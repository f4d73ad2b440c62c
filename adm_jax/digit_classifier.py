"""Training, saving and loading the digits evaluation classifier.

The shipped weights live in :data:`DEFAULT_DIR` (package data,
``adm_jax/assets/digits/classifier``): ``classifier.safetensors`` (float32, keyed by
our dotted parameter paths, e.g. ``conv1.kernel``) + ``config.json`` (architecture,
training settings and the held-out accuracy). They were trained on the ``"train"``
split only, so the ``"heldout"`` split stays unseen by everything but the evaluator.

The classifier is an *evaluation* network (see :mod:`adm_jax.evaluation`): never
use it inside a discriminator or loss.

Regenerate the shipped weights (well under 2 minutes on a laptop CPU)::

  python -m adm_jax.digit_classifier --out adm_jax/assets/digits/classifier
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adm_jax import digits, tree
from adm_jax.models.classifier import DigitClassifier

Array = jax.Array

DEFAULT_DIR = Path(__file__).parent / "assets" / "digits" / "classifier"
WEIGHTS = "classifier.safetensors"
CONFIG = "config.json"
TRAIN_SIZE = 32          # the side the classifier is trained at
MAX_SHIFT = 2            # augmentation: random shifts in [-MAX_SHIFT, MAX_SHIFT] pixels

_ARCH_KEYS = ("widths", "feature_dim", "num_classes", "in_channels")
_DEFAULT_ARCH = {"widths": [32, 64, 128], "feature_dim": 128, "num_classes": 10,
                 "in_channels": 3}


def build(config: dict | None = None, *, seed: int = 0) -> DigitClassifier:
  """A freshly initialised classifier with the architecture of ``config``."""
  arch = {**_DEFAULT_ARCH, **{k: v for k, v in (config or {}).items() if k in _ARCH_KEYS}}
  return DigitClassifier(**arch, rngs=nnx.Rngs(seed))


def abstract_model(config: dict | None = None):
  """``(graphdef, abstract params)`` without allocating any weights."""
  return nnx.split(nnx.eval_shape(lambda: build(config)))


def random_shift(x: Array, key: Array, max_shift: int = MAX_SHIFT) -> Array:
  """Shifts each image ``[B, H, W, C]`` by its own integer offset in
  ``[-max_shift, max_shift]`` per axis; pixels shifted in are background (-1)."""
  if max_shift <= 0:
    return x
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   constant_values=-1.0)                        # [B, h+2s, w+2s, c]
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)                         # [B, h, w, c]


def train(*, steps: int = 1000, batch_size: int = 32, lr: float = 4e-3,
          weight_decay: float = 1e-4, max_shift: int = MAX_SHIFT,
          label_smoothing: float = 0.1, widths=(32, 64, 128), seed: int = 0,
          log_every: int = 0):
  """Trains a :class:`DigitClassifier` on the ``"train"`` split at 32x32.

  AdamW with a linear warm-up (5 % of the steps) and a cosine decay to zero, cross
  entropy with label smoothing, random shifts of up to ``max_shift`` pixels per axis
  (background shifted in); one jitted step with the batch drawn on device. The
  defaults (1,000 steps of 32, about 22 epochs) give 99.4 % held-out accuracy in
  about 1.5 minutes on a busy 2-core CPU.

  Returns:
    ``(graphdef, params)``; ``nnx.merge(graphdef, params)`` is the trained model.
  """
  if steps <= 0 or batch_size <= 0:
    raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
  images, labels = digits.load("train", TRAIN_SIZE)
  images, labels = jnp.asarray(images), jnp.asarray(labels)       # [N, 32, 32, 3], [N]
  graphdef, params = nnx.split(build({"widths": list(widths)}, seed=seed))
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.0)
  opt = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = opt.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x)                           # [B, 10]
    target = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, target).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def step(p, s, data, targets, key):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])
    x = random_shift(data[idx], k_shift, max_shift)              # [B, 32, 32, 3]
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, targets[idx])
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, acc

  key = jax.random.key(seed)
  for i in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss, acc = step(params, opt_state, images, labels, sub)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      print(f"step {i + 1}/{steps}: loss {float(loss):.4f}, batch acc {float(acc):.3f}",
            flush=True)
  return graphdef, params


# ---------------------------------------------------------------------------------------
# I/O.
# ---------------------------------------------------------------------------------------


def save(folder: str | Path, params, *, config: dict | None = None) -> Path:
  """Writes ``classifier.safetensors`` (float32, dotted keys) + ``config.json``.

  ``config`` adds entries (training settings, accuracy) to the architecture record;
  its architecture keys must describe ``params``.
  """
  from adm_jax.convert import common
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  cfg = {**_DEFAULT_ARCH, **(config or {}), "model": "DigitClassifier",
         "train_size": TRAIN_SIZE}
  _check_params(flat, tree.shapes(abstract_model(cfg)[1]), what="params to save")
  common.write_safetensors(folder / WEIGHTS, flat, metadata={"format": "adm_jax"})
  with open(folder / CONFIG, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return folder


def _check_params(flat, expected, *, what):
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  bad = [f"{k}: file {tuple(np.shape(flat[k]))} vs model {tuple(expected[k])}"
         for k in sorted(set(flat) & set(expected))
         if tuple(np.shape(flat[k])) != tuple(expected[k])]
  errors = []
  if missing:
    errors.append(f"missing key(s): {', '.join(missing)}")
  if unexpected:
    errors.append(f"unexpected key(s): {', '.join(unexpected)}")
  if bad:
    errors.append(f"shape mismatch(es): {'; '.join(bad)}")
  if errors:
    raise ValueError(f"{what} do not match DigitClassifier: " + "; ".join(errors))


@dataclasses.dataclass
class Classifier:
  """A loaded classifier: jitted ``features`` / ``logits`` on ``[N, H, W, 3]`` images.

  Both take numpy or jax arrays in ``[-1, 1]`` of any batch size and return numpy
  float32 arrays. Inputs run in chunks of ``batch_size``, each padded to a power of two
  (at least 8), so a new ``N`` compiles at most a handful of shapes.
  """
  graphdef: Any
  params: Any
  config: dict
  batch_size: int = 256

  def __post_init__(self):
    graphdef = self.graphdef

    def both(p, x):
      model = nnx.merge(graphdef, p)
      f = model.features(x)
      return f, model.logits_from_features(f)
    self._both = jax.jit(both)

  @property
  def size(self) -> int:
    return int(self.config.get("train_size", TRAIN_SIZE))

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    """``([N, feature_dim], [N, num_classes])`` float32."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"classifier wants images [N, H, W, 3], got shape {x.shape}")
    n, bs = x.shape[0], self.batch_size
    feats, logits = [], []
    for start in range(0, n, bs):
      chunk = x[start:start + bs]
      m = chunk.shape[0]
      padded = min(bs, max(8, 1 << (m - 1).bit_length()))
      if padded > m:             # pad to a bucketed shape (few compilations)
        chunk = np.concatenate([chunk, np.zeros((padded - m,) + chunk.shape[1:], np.float32)])
      f, l = self._both(self.params, chunk)
      feats.append(np.asarray(f)[:m])
      logits.append(np.asarray(l)[:m])
    if not feats:
      fd, nc = int(self.config["feature_dim"]), int(self.config["num_classes"])
      return np.zeros((0, fd), np.float32), np.zeros((0, nc), np.float32)
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    return self.features_and_logits(images)[0]

  def logits(self, images) -> np.ndarray:
    return self.features_and_logits(images)[1]

  def predict(self, images) -> np.ndarray:
    """Argmax class, int32 ``[N]``."""
    return np.argmax(self.logits(images), axis=-1).astype(np.int32)


def load(folder: str | Path = DEFAULT_DIR, *, batch_size: int = 256) -> Classifier:
  """Reads a folder written by :func:`save` into a :class:`Classifier`.

  Raises:
    FileNotFoundError: the folder, its ``config.json`` or its weights are missing.
    ValueError: the weights are corrupt, or their keys / shapes do not match the
      model of ``config.json`` (the offending keys are named).
  """
  from adm_jax.convert import common
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"digit classifier folder not found: {folder}")
  for name in (CONFIG, WEIGHTS):
    if not (folder / name).is_file():
      raise FileNotFoundError(f"digit classifier file not found: {folder / name}")
  cfg = {**_DEFAULT_ARCH, **common.read_json(folder / CONFIG)}
  flat = common.read_safetensors_file(folder / WEIGHTS)
  graphdef, abstract = abstract_model(cfg)
  _check_params(flat, tree.shapes(abstract), what=f"weights in {folder / WEIGHTS}")
  cpu = jax.devices("cpu")[0]
  flat = {k: jax.device_put(np.asarray(v, np.float32), cpu) for k, v in flat.items()}
  params = tree.unflatten_like(abstract, flat)
  return Classifier(graphdef, params, cfg, batch_size=batch_size)


def accuracy(classifier: Classifier, split: str = "heldout") -> float:
  images, labels = digits.load(split, classifier.size)
  return float(np.mean(classifier.predict(images) == labels))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="Train the digits evaluation classifier.")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--lr", type=float, default=4e-3)
  p.add_argument("--label_smoothing", type=float, default=0.1)
  p.add_argument("--max_shift", type=int, default=MAX_SHIFT)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  t0 = time.time()
  graphdef, params = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           label_smoothing=args.label_smoothing, max_shift=args.max_shift,
                           seed=args.seed, log_every=max(1, args.steps // 10))
  seconds = time.time() - t0
  clf = Classifier(graphdef, params, dict(_DEFAULT_ARCH))
  acc = accuracy(clf, "heldout")
  print(f"trained in {seconds:.1f} s; held-out accuracy {acc:.4f}")
  save(args.out, params, config={"steps": args.steps, "batch_size": args.batch_size,
                                 "lr": args.lr, "seed": args.seed,
                                 "label_smoothing": args.label_smoothing,
                                 "max_shift": args.max_shift,
                                 "heldout_accuracy": round(acc, 4),
                                 "train_seconds": round(seconds, 1)})
  print(f"saved to {args.out}")


if __name__ == "__main__":
  main()
