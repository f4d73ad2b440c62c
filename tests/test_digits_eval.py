"""The digits benchmark's evaluation side: data splits, the shipped classifier, FID,
alignment, diversity, the labelled grid and the error paths.

One :class:`DigitsEvaluator` (shipped classifier, held-out reference) is shared by the
module; every image batch goes through the same compiled chunk shape.
"""
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from adm_jax import digit_classifier, digits, evaluation
from adm_jax.convert import common


@pytest.fixture(scope="module")
def evaluator():
  return evaluation.make("digits")


@pytest.fixture(scope="module")
def heldout():
  return digits.load("heldout")


def _noised(images, std, seed=0):
  rng = np.random.default_rng(seed)
  return images + std * rng.standard_normal(images.shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------


def test_split_disjoint_stratified_deterministic():
  tr, ho = digits.split_indices("train"), digits.split_indices("heldout")
  assert len(np.intersect1d(tr, ho)) == 0
  assert len(tr) + len(ho) == 1797
  np.testing.assert_array_equal(np.sort(np.concatenate([tr, ho])), np.arange(1797))
  _, y_tr = digits.load("train", 8)
  _, y_ho = digits.load("heldout", 8)
  for k in range(10):
    frac = np.sum(y_ho == k) / (np.sum(y_ho == k) + np.sum(y_tr == k))
    assert abs(frac - 0.2) < 0.02, (k, frac)
  x1, y1 = digits.load("heldout", 8)
  x2, y2 = digits.load("heldout", 8)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)


def test_shapes_ranges_and_nearest_upsampling():
  x32, y32 = digits.load("train")
  x8, y8 = digits.load("train", size=8)
  assert x32.shape == (len(y32), 32, 32, 3) and x32.dtype == np.float32
  assert x8.shape == (len(y8), 8, 8, 3)
  assert y32.dtype == np.int32 and set(np.unique(y32)) == set(range(10))
  assert x32.min() == -1.0 and x32.max() == 1.0
  np.testing.assert_array_equal(y8, y32)
  # Every 4x4 block of the 32x32 image is constant and equals the 8x8 pixel.
  blocks = x32.reshape(-1, 8, 4, 8, 4, 3)
  np.testing.assert_array_equal(blocks, np.broadcast_to(x8[:, :, None, :, None, :],
                                                        blocks.shape))
  # Gray replicated to 3 channels; 0 -> -1 and 16 -> +1 on the raw values.
  np.testing.assert_array_equal(x8[..., 0], x8[..., 2])
  from sklearn.datasets import load_digits
  raw = load_digits().images[digits.split_indices("train")]
  np.testing.assert_allclose(x8[..., 0], raw / 8.0 - 1.0, atol=1e-6)
  assert len(digits.prompts()) == 10 and digits.prompts()[7] == "a handwritten digit 7"


def test_load_bad_input():
  with pytest.raises(ValueError, match="train, heldout"):
    digits.load("test")
  with pytest.raises(ValueError, match="multiple of 8"):
    digits.load("train", size=20)


# ---------------------------------------------------------------------------------------
# The shipped classifier.
# ---------------------------------------------------------------------------------------


def test_shipped_classifier_accuracy(evaluator, heldout):
  x, y = heldout
  clf = evaluator.classifier
  assert digit_classifier.DEFAULT_DIR.is_dir()
  assert (digit_classifier.DEFAULT_DIR / digit_classifier.WEIGHTS).stat().st_size < 2**20
  assert np.mean(clf.predict(x) == y) >= 0.97
  assert clf.features(x[:5]).shape == (5, 128) and clf.logits(x[:5]).shape == (5, 10)


def test_classifier_io_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    digit_classifier.load(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    evaluation.DigitsEvaluator(classifier_dir=tmp_path / "nowhere")
  src = digit_classifier.DEFAULT_DIR
  tensors = {k: np.array(v) for k, v in common.read_safetensors_file(
      src / digit_classifier.WEIGHTS).items()}

  def folder(name, tensors_):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src / digit_classifier.CONFIG, d / digit_classifier.CONFIG)
    common.write_safetensors(d / digit_classifier.WEIGHTS, tensors_)
    return d

  missing = dict(tensors)
  del missing["fc.bias"]
  with pytest.raises(ValueError, match=r"missing key\(s\): fc\.bias"):
    digit_classifier.load(folder("missing", missing))
  extra = {**tensors, "conv9.kernel": np.zeros((1,), np.float32)}
  with pytest.raises(ValueError, match="conv9.kernel"):
    digit_classifier.load(folder("extra", extra))
  reshaped = {**tensors, "head.kernel": np.zeros((128, 11), np.float32)}
  with pytest.raises(ValueError, match="head.kernel"):
    digit_classifier.load(folder("shape", reshaped))
  d = folder("truncated", tensors)
  data = (d / digit_classifier.WEIGHTS).read_bytes()
  (d / digit_classifier.WEIGHTS).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    digit_classifier.load(d)
  d = tmp_path / "no_weights"
  d.mkdir()
  shutil.copy(src / digit_classifier.CONFIG, d / digit_classifier.CONFIG)
  with pytest.raises(FileNotFoundError, match=digit_classifier.WEIGHTS):
    digit_classifier.load(d)


def test_save_load_roundtrip(tmp_path, evaluator, heldout):
  clf = evaluator.classifier
  digit_classifier.save(tmp_path / "c", clf.params)
  cfg = json.loads((tmp_path / "c" / digit_classifier.CONFIG).read_text())
  assert cfg["widths"] == [32, 64, 128]
  again = digit_classifier.load(tmp_path / "c")
  x = heldout[0][:8]
  np.testing.assert_array_equal(again.logits(x), clf.logits(x))


# ---------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------


def test_frechet_distance_closed_form():
  fd = evaluation.frechet_distance
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert math.isclose(fd([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0, rel_tol=1e-9)
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
  want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert math.isclose(fd(m1, np.diag(v1), m2, np.diag(v2)), want, rel_tol=1e-9)
  # Singular covariances (fewer samples than dimensions) stay finite.
  mu, sigma = evaluation.feature_stats(rng.normal(size=(5, 16)))
  assert np.isfinite(fd(mu, sigma, np.zeros(16), np.eye(16)))
  with pytest.raises(ValueError, match="shapes"):
    fd(m1, np.diag(v1), m2[:5], np.diag(v2[:5]))


def test_fid_identity_noise_and_train(evaluator, heldout):
  x, y = heldout
  noisy = [evaluator.evaluate(_noised(x, s), y)["fid"] for s in (0.2, 0.4, 0.8, 1.6)]
  assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
  assert evaluator.evaluate(x, y)["fid"] < 1e-3 * noisy[0]
  train = evaluator.evaluate(*digits.load("train"))["fid"]
  assert train < 0.1 * noisy[2], (train, noisy)


# ---------------------------------------------------------------------------------------
# Alignment and diversity.
# ---------------------------------------------------------------------------------------


def test_alignment_and_diversity(evaluator, heldout):
  x, y = heldout
  real = evaluator.evaluate(x, y)
  assert set(real) == {"fid", "alignment", "diversity", "reference_diversity"}
  assert real["alignment"] >= 0.97
  assert math.isclose(real["diversity"], real["reference_diversity"], rel_tol=1e-6)
  assert real["reference_diversity"] > 0
  shuffled = evaluator.evaluate(x, np.random.default_rng(0).permutation(y))
  assert abs(shuffled["alignment"] - 0.1) < 0.05
  assert evaluator.evaluate(x, (y + 1) % 10)["alignment"] < 0.02
  # One image repeated: no diversity; a class with one sample is skipped.
  rep = evaluator.evaluate(np.repeat(x[:1], 6, 0), np.array([3, 3, 3, 3, 3, 5]))
  assert rep["diversity"] == 0.0
  # Real train digits are about as diverse as the held-out ones.
  base = evaluator.baseline(359)
  assert abs(base["diversity"] / real["reference_diversity"] - 1) < 0.1


def test_evaluator_bad_input(evaluator, heldout):
  x, y = heldout
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    evaluator.evaluate(digits.load("heldout", 8)[0], y)
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
    evaluator.evaluate(x[..., :1], y)
  with pytest.raises(ValueError, match="labels"):
    evaluator.evaluate(x, y[:-1])
  with pytest.raises(ValueError, match="labels"):
    evaluator.evaluate(x[:4], np.array([0, 1, 2, 10]))
  with pytest.raises(ValueError, match="unknown evaluator 'cifar'; valid: digits"):
    evaluation.make("cifar")


# ---------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------


def test_labelled_grid(tmp_path, heldout):
  x, y = heldout
  sel = np.concatenate([np.flatnonzero(y == k)[:n] for k, n in ((7, 3), (2, 5), (4, 1))])
  path = evaluation.labelled_grid(x[sel], y[sel], tmp_path / "g" / "grid.png")
  img = Image.open(path)
  assert img.format == "PNG" and img.mode == "RGB"
  pad = evaluation.GRID_PAD
  assert img.height == pad + 3 * (32 + pad)
  assert img.width > 5 * (32 + pad) + 60      # 5 images per row plus the prompt text
  small = evaluation.labelled_grid(x[sel], y[sel], tmp_path / "s.png", per_row=2)
  assert Image.open(small).width == img.width - 3 * (32 + pad)
  a = np.asarray(img)
  assert a.min() == 0 and a.max() == 255
  with pytest.raises(ValueError, match="labelled_grid wants images"):
    evaluation.labelled_grid(x[0], y[:1], tmp_path / "bad.png")
  with pytest.raises(ValueError, match="labels"):
    evaluation.labelled_grid(x[:3], y[:2], tmp_path / "bad.png")
  with pytest.raises(ValueError, match="no prompt"):
    evaluation.labelled_grid(x[:2], np.array([0, 12]), tmp_path / "bad.png")


def test_format_table():
  table = evaluation.format_table(
      [{"method": "dmd2", "fid": 1.23456, "alignment": 0.9}, {"method": "adm"}],
      ["method", "fid", "alignment"])
  assert table.splitlines() == ["| method | fid | alignment |", "|---|---|---|",
                                "| dmd2 | 1.235 | 0.9 |", "| adm |  |  |"]
  with pytest.raises(ValueError):
    evaluation.format_table([], [])


def test_read_results_rows_missing_and_corrupt(tmp_path):
  assert evaluation.read_results(tmp_path) == []
  path = tmp_path / evaluation.RESULTS
  path.parent.mkdir(parents=True)
  rows = [{"step": 5, "stage": "adp", "fid": 3.5}, {"step": 9, "stage": "adm", "fid": 2.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert evaluation.read_results(tmp_path) == rows
  path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 9, "fi')        # a torn last line
  with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON results row"):
    evaluation.read_results(tmp_path)
