"""The embedded "digits" benchmark data: scikit-learn's ``load_digits`` (1,797 8x8 digits).

The data ship with scikit-learn, so the benchmark runs anywhere without a download.
Each image is a gray 8x8 array with integer values ``0..16``; :func:`load` maps them
to float32 in ``[-1, 1]`` (``0 -> -1``, ``16 -> +1``), upsamples them by
nearest-neighbour repetition to ``size x size`` (a multiple of 8) and replicates the
gray channel to RGB, channels-last: ``[N, size, size, 3]``.

Splits are deterministic and stratified: within every class, a fixed-seed permutation
puts ``round(20 %)`` of the images in ``"heldout"`` and the rest in ``"train"``. The two
are disjoint and together cover all 1,797 images. Generators and the evaluation
classifier train on ``"train"`` only; FID and the other scores are taken against
``"heldout"``.

Class ``k`` is prompted by ``PROMPT_TEMPLATE.format(k)`` (:func:`prompts` lists all ten,
index = digit).
"""
from __future__ import annotations

import functools

import numpy as np

PROMPT_TEMPLATE = "a handwritten digit {}"
NUM_CLASSES = 10
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
NATIVE_SIZE = 8
MAX_VALUE = 16.0


def prompts() -> list[str]:
  """The ten class prompts, index = digit."""
  return [PROMPT_TEMPLATE.format(k) for k in range(NUM_CLASSES)]


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 [1797, 8, 8], labels int32 [1797])`` from scikit-learn."""
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.asarray(d.images).astype(np.uint8)      # [N, 8, 8], values 0..16
  labels = np.asarray(d.target).astype(np.int32)      # [N]
  return images, labels


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
  """Sorted indices of each split into the full data set (stratified, fixed seed)."""
  _, labels = _raw()
  rng = np.random.default_rng(SPLIT_SEED)
  held, train = [], []
  for k in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == k)
    idx = idx[rng.permutation(len(idx))]
    n_held = int(round(HELDOUT_FRACTION * len(idx)))
    held.append(idx[:n_held])
    train.append(idx[n_held:])
  return {"train": np.sort(np.concatenate(train)), "heldout": np.sort(np.concatenate(held))}


def split_indices(split: str) -> np.ndarray:
  """Indices (int64 ``[N]``, sorted) of ``split`` into the full ``load_digits`` set."""
  if split not in SPLITS:
    raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
  return _split_indices()[split].copy()


def to_model_range(images: np.ndarray, size: int = 32) -> np.ndarray:
  """Raw ``[N, 8, 8]`` values ``0..16`` -> float32 ``[N, size, size, 3]`` in ``[-1, 1]``."""
  if size <= 0 or size % NATIVE_SIZE:
    raise ValueError(f"digits size must be a positive multiple of {NATIVE_SIZE}, got {size}")
  x = np.asarray(images, np.float32) * (2.0 / MAX_VALUE) - 1.0   # [N, 8, 8]
  r = size // NATIVE_SIZE
  x = np.repeat(np.repeat(x, r, axis=1), r, axis=2)              # [N, size, size]
  return np.ascontiguousarray(np.broadcast_to(x[..., None], x.shape + (3,)))


def load(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """One split of the digits.

  Args:
    split: ``"train"`` or ``"heldout"``.
    size: output side; a positive multiple of 8 (nearest-neighbour upsampling).

  Returns:
    ``(images, labels)``: float32 ``[N, size, size, 3]`` in ``[-1, 1]`` and int32 ``[N]``.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
  if not isinstance(size, (int, np.integer)) or size <= 0 or size % NATIVE_SIZE:
    raise ValueError(f"digits size must be a positive multiple of {NATIVE_SIZE}, got {size!r}")
  images, labels = _raw()
  idx = _split_indices()[split]
  return to_model_range(images[idx], int(size)), labels[idx].copy()
