"""The trainer on a tiny SDXL-architecture pipeline: DMDX (ADP with the latent and the
SAM pixel discriminators, then ADM) through ``python -m adm_jax.main``, and DMD2 with a
four-step student, end to end from diffusers / transformers checkpoints on disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import conftest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import tiny_sdxl  # noqa: E402
from adm_jax import config_lib, train  # noqa: E402
from adm_jax.convert.__main__ import convert_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  tiny_sdxl.build_pipeline(root / "src")
  convert_pipeline("sdxl", root / "src", root / "sdxl", log=lambda *_: None)
  torch.manual_seed(0)
  sam = transformers.SamModel(transformers.SamConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8, window_size=2,
                         global_attn_indexes=[1], output_channels=16, mlp_dim=64),
      prompt_encoder_config=dict(hidden_size=16, image_size=32, patch_size=8),
      mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               mlp_dim=32, iou_head_hidden_dim=16)))
  sam.save_pretrained(root / "sam")
  return root / "sdxl", root / "sam"


def _rows(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow      # tests/test_digits_pipeline.py runs the same path in the default suite
def test_dmdx_through_main(weights, tmp_path):
  sdxl, sam = weights
  r = subprocess.run(
      [sys.executable, "-m", "adm_jax.main", "--config=configs/sdxl_onestep.py:tiny",
       f"--workdir={tmp_path}", f"--config.teacher.weights_dir={sdxl}",
       f"--config.disc.pixel.weights_dir={sam}"],
      # One CPU device: compiling five SDXL-UNet step functions for 8 fake devices
      # would double this test's time (the sharded path is test_dmd2_four_step's).
      env={**os.environ, "XLA_FLAGS": conftest.xla_flags()},
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "[adp]" in r.stdout and "[adm]" in r.stdout
  rows = _rows(tmp_path)
  adp, adm = rows[0], rows[-1]
  for key in ("generator/latent_fake_logit", "generator/pixel_fake_logit",
              "discriminator/pixel_real_logit", "discriminator/latent_real_logit"):
    assert np.isfinite(adp[key]), key
  for key in ("fake_score/loss", "discriminator/loss", "generator/loss"):
    assert np.isfinite(adm[key]), key
  assert "generator/pixel_fake_logit" not in adm
  grid = tmp_path / "samples" / "step_0000004.png"
  assert grid.stat().st_size > 0


@pytest.mark.slow
def test_dmd2_four_step(weights, tmp_path):
  """Sharded: the batch over ``data`` (2), the rest of the 8 devices on ``tensor``."""
  sdxl, _ = weights
  c = config_lib.load_config_file("configs/sdxl_onestep.py:tiny,method=dmd2,steps=4")
  c.teacher.weights_dir = str(sdxl)
  c.total_steps = 3
  c.mesh = config_lib.mesh(data=2, fsdp=1, tensor=4)
  state = train.train_and_evaluate(config_lib.validate(c), str(tmp_path))
  rows = _rows(tmp_path)
  for key in ("generator/dm_loss", "generator/gan_loss", "fake_score/loss",
              "discriminator/loss"):
    assert any(np.isfinite(r.get(key, np.nan)) for r in rows), key
  assert int(state.generator.step) == 2 and int(state.fake_score.step) == 3   # TTUR 2
  # The students started as float32 copies of the teacher and have moved away from it.
  from adm_jax import models
  _, _, teacher = models.load_component(sdxl / "unet")
  moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(teacher), jax.tree.leaves(state.generator.params))]
  assert any(moved) and jax.tree.leaves(state.generator.params)[0].dtype == np.float32
