"""Sample-quality evaluation: FID, prompt alignment and diversity (digits benchmark).

An *evaluator* scores a batch of generated images against the prompts (class labels)
they were generated for. :func:`make` builds one by name from :data:`EVALUATORS`; each
has ``evaluate(images, labels) -> dict[str, float]``.

:class:`DigitsEvaluator` scores the embedded digits benchmark (:mod:`adm_jax.digits`)
with the small CNN shipped in ``adm_jax/assets/digits/classifier``
(:mod:`adm_jax.digit_classifier`):

* ``fid``: Fréchet distance between Gaussians fitted to the classifier's 128-d features
  of the samples and of the real held-out digits (lower is better). Like every FID it
  is biased by the sample count: compare runs at equal ``N``.
* ``alignment``: fraction of samples the classifier assigns to their prompted digit.
* ``diversity``: per prompt, the mean pairwise L2 distance between the features of the
  samples of that prompt; averaged over the prompts with at least 2 samples. A
  collapsed generator scores ~0.
* ``reference_diversity``: the same statistic on the real held-out digits, so that
  ``diversity`` can be read against it.

The scoring network must never be a network any discriminator (or any loss) of the
distillation uses: a generator learns to please the network that judges it, and its
scores would then measure adversarial agreement, not quality. The digits classifier is
trained on the ``"train"`` split only and used *only* here, for evaluation.

Also: :func:`frechet_distance`, :func:`feature_stats`, :func:`labelled_grid` (a PNG of
samples, one labelled row per prompt) and :func:`format_table` (markdown results).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.linalg
from scipy.spatial.distance import pdist

from adm_jax import digit_classifier, digits

DEFAULT_DIR = digit_classifier.DEFAULT_DIR


# ---------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean ``[D]`` and (unbiased) covariance ``[D, D]`` of features ``[N, D]``, float64."""
  f = np.asarray(feats, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_stats wants features [N >= 2, D], got shape {f.shape}")
  if not np.all(np.isfinite(f)):
    raise ValueError("feature_stats: features contain NaN or inf")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
  """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:

  ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``,

  in float64. When the matrix square root is not finite (singular covariances, e.g.
  fewer samples than feature dimensions), ``eps`` is added to both diagonals and it is
  taken again; the real part is kept (the imaginary part is round-off). The result is
  clamped at 0.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))                  # [D]
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))                # [D, D]
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, "
                     f"sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():   # singular products are expected and handled below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = np.real(covmean)
  value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
  return max(value, 0.0)


def mean_pairwise_distance(feats) -> float:
  """Mean L2 distance over all unordered pairs of rows of ``[N >= 2, D]``."""
  f = np.asarray(feats, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"mean_pairwise_distance wants [N >= 2, D], got shape {f.shape}")
  return float(pdist(f).mean())


def per_prompt_diversity(feats, labels) -> float:
  """Mean over the labels with >= 2 samples of their mean pairwise feature distance
  (NaN when no label has 2 samples)."""
  f, y = np.asarray(feats), np.asarray(labels)
  per = [mean_pairwise_distance(f[y == k]) for k in np.unique(y) if np.sum(y == k) >= 2]
  return float(np.mean(per)) if per else math.nan


# ---------------------------------------------------------------------------------------
# Evaluators.
# ---------------------------------------------------------------------------------------


class DigitsEvaluator:
  """Scores generated digits with the evaluation-only digits classifier.

  Args:
    classifier_dir: folder written by :func:`adm_jax.digit_classifier.save` (default:
      the shipped weights).
    reference: the real split the samples are compared with (``"heldout"``; the
      classifier never saw it).
    size: image side the samples must have (a multiple of 8; the classifier is
      trained at 32).

  The classifier judging the samples must not be a network that any discriminator or
  loss uses: a generator can learn to please the network that judges it. This one is
  used only for evaluation.

  Attributes:
    reference_mu, reference_sigma: feature statistics of the reference digits.
    reference_diversity: :func:`per_prompt_diversity` of the reference digits.
    reference_alignment: classifier accuracy on the reference digits (the ceiling of
      ``alignment``).
  """

  name = "digits"

  def __init__(self, classifier_dir: str | Path = DEFAULT_DIR, reference: str = "heldout",
               size: int = 32):
    self.classifier = digit_classifier.load(classifier_dir)
    self.size = int(size)
    self.reference = reference
    self.num_classes = int(self.classifier.config["num_classes"])
    images, labels = digits.load(reference, self.size)
    feats, logits = self.classifier.features_and_logits(images)
    self.reference_mu, self.reference_sigma = feature_stats(feats)
    self.reference_diversity = per_prompt_diversity(feats, labels)
    self.reference_alignment = float(np.mean(np.argmax(logits, -1) == labels))
    self.reference_count = int(labels.shape[0])

  def _check(self, images, labels) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1:] != (self.size, self.size, 3):
      raise ValueError(f"{type(self).__name__} wants images [N, {self.size}, {self.size}, 3] "
                       f"in [-1, 1], got shape {x.shape}")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{type(self).__name__} wants integer labels [{x.shape[0]}], got "
                       f"{y.dtype} {y.shape}")
    if x.shape[0] < 2:
      raise ValueError(f"{type(self).__name__} needs at least 2 samples, got {x.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= self.num_classes):
      raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                       f"[{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(x)):
      raise ValueError("images contain NaN or inf")
    return np.clip(x, -1.0, 1.0), y.astype(np.int32)

  def evaluate(self, images, labels) -> dict[str, float]:
    """Scores ``images`` (``[N, size, size, 3]`` in ``[-1, 1]``; values outside are
    clipped) generated for the digits ``labels`` (int ``[N]``).

    Returns:
      ``{"fid", "alignment", "diversity", "reference_diversity"}`` (see the module
      docstring); ``diversity`` is NaN when no label has 2 samples.
    """
    x, y = self._check(images, labels)
    feats, logits = self.classifier.features_and_logits(x)
    mu, sigma = feature_stats(feats)
    return {
        "fid": frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma),
        "alignment": float(np.mean(np.argmax(logits, -1) == y)),
        "diversity": per_prompt_diversity(feats, y),
        "reference_diversity": float(self.reference_diversity),
    }

  def baseline(self, num_samples: int, *, split: str = "train", seed: int = 0
               ) -> dict[str, float]:
    """:meth:`evaluate` on ``num_samples`` real digits of ``split`` (drawn without
    replacement, with their true labels): the score of a perfect generator at this
    sample count. FID is biased upwards at small ``N`` (train digits score about 2.5
    at ``N = 100``, 0.8 at ``N = 359``, 0.3 for all 1,438), so report this row next to
    generated samples of the same count."""
    images, labels = digits.load(split, self.size)
    if not 2 <= num_samples <= labels.shape[0]:
      raise ValueError(f"baseline: num_samples must lie in [2, {labels.shape[0]}] for the "
                       f"{split!r} split, got {num_samples}")
    idx = np.sort(np.random.default_rng(seed).permutation(labels.shape[0])[:num_samples])
    return self.evaluate(images[idx], labels[idx])


EVALUATORS: dict[str, type] = {"digits": DigitsEvaluator}

RESULTS = Path("eval") / "results.jsonl"      # under a workdir: one JSON row per evaluation


def read_results(workdir: str | Path) -> list[dict]:
  """The evaluation rows the trainer appended to ``workdir/eval/results.jsonl`` (step,
  stage, sample count, grid path and every score), oldest first; ``[]`` if none."""
  import json
  path = Path(workdir) / RESULTS
  if not path.is_file():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not a JSON results row ({e})") from None
  return rows


def make(name: str, **kw: Any):
  """Builds the evaluator registered as ``name`` with keyword arguments ``kw``."""
  if name not in EVALUATORS:
    raise ValueError(f"unknown evaluator {name!r}; valid: {', '.join(sorted(EVALUATORS))}")
  return EVALUATORS[name](**kw)


# ---------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------

GRID_PAD = 2
GRID_BACKGROUND = (255, 255, 255)
GRID_TEXT = (0, 0, 0)


def to_uint8(images) -> np.ndarray:
  """``[..., C]`` in ``[-1, 1]`` -> uint8 ``[0, 255]`` (clipped, rounded)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def labelled_grid(images, labels, path: str | Path, *, per_row: int | None = None,
                  prompts: Sequence[str] | None = None) -> Path:
  """Writes a PNG grid of ``images`` with one row per distinct label (sorted).

  Each row starts with the label's prompt (``prompts[label]``, default
  :func:`adm_jax.digits.prompts`) in PIL's default font, followed by up to ``per_row``
  images of that label (default: as many as the most frequent label has), in input
  order. Cells are separated by :data:`GRID_PAD` pixels.

  Args:
    images: ``[N, H, W, C]`` (``C`` 1 or 3) in ``[-1, 1]``.
    labels: int ``[N]``.
    path: output ``.png`` path (its folder is created).

  Returns:
    ``path`` as a :class:`~pathlib.Path`. The image is
    ``GRID_PAD + rows * (row_h + GRID_PAD)`` high with ``row_h = max(H, text height)``.
  """
  from PIL import Image, ImageDraw, ImageFont
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
    raise ValueError(f"labelled_grid wants images [N > 0, H, W, 1 or 3], got shape {x.shape}")
  y = np.asarray(labels)
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labelled_grid wants integer labels [{x.shape[0]}], got "
                     f"{y.dtype} {y.shape}")
  if per_row is not None and per_row <= 0:
    raise ValueError(f"per_row must be positive, got {per_row}")
  prompts = list(prompts) if prompts is not None else digits.prompts()
  rows = [int(k) for k in np.unique(y)]
  bad = [k for k in rows if not 0 <= k < len(prompts)]
  if bad:
    raise ValueError(f"labels {bad} have no prompt ({len(prompts)} prompts given)")
  counts = {k: int(np.sum(y == k)) for k in rows}
  per_row = per_row or max(counts.values())
  tiles = to_uint8(x)
  if tiles.shape[-1] == 1:
    tiles = np.repeat(tiles, 3, axis=-1)                        # [N, H, W, 3]
  n, h, w, _ = tiles.shape

  font = ImageFont.load_default()
  text_w = max(int(math.ceil(font.getlength(prompts[k]))) for k in rows) + 2 * GRID_PAD
  text_h = max(font.getbbox(prompts[k])[3] for k in rows)
  row_h = max(h, text_h)
  width = text_w + per_row * (w + GRID_PAD) + GRID_PAD
  height = GRID_PAD + len(rows) * (row_h + GRID_PAD)
  canvas = Image.new("RGB", (width, height), GRID_BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for r, k in enumerate(rows):
    top = GRID_PAD + r * (row_h + GRID_PAD)
    draw.text((GRID_PAD, top + (row_h - text_h) // 2), prompts[k], fill=GRID_TEXT, font=font)
    for c, i in enumerate(np.flatnonzero(y == k)[:per_row]):
      left = text_w + c * (w + GRID_PAD)
      canvas.paste(Image.fromarray(tiles[i]), (left, top + (row_h - h) // 2))
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path, format="PNG")
  return path


def _cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, (float, np.floating)):
    return "nan" if math.isnan(v) else f"{float(v):.4g}"
  return str(v).replace("|", "\\|")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table of ``rows`` (dicts) restricted to ``columns`` in that order; floats
  get 4 significant digits, missing entries are blank."""
  columns = list(columns)
  if not columns:
    raise ValueError("format_table needs at least one column")
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
  return "\n".join(lines)
