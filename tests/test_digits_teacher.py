"""The embedded digits teacher (``weights/digits-sdxl``) and the job that trains it.

The committed folder loads in diffusers and through our converter; our UNet, text path
and sampler match diffusers' on its weights; its samples draw the prompted digit; its
VAE reconstructs the held-out digits; the ``tiny`` pretrain configs run end to end into
a temporary export folder.
"""
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from adm_jax import config_lib, conditioning, digits, pretrain, sampling
from adm_jax import teacher as teacher_lib
from adm_jax.convert import vae as vae_convert
from adm_jax.convert.__main__ import convert_pipeline

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "weights" / "digits-sdxl"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
              "scheduler")
MAX_FOLDER_BYTES = 12 * 2**20
# Measured held-out reconstruction MSE of the committed VAE: 0.00251 (README.md); an
# untrained or broken VAE is two orders of magnitude worse.
HELDOUT_MSE_BOUND = 0.004


def _config(name: str, arg: str = ""):
  return config_lib.load_config_file(str(ROOT / "configs" / name) + (f":{arg}" if arg else ""))


@pytest.fixture(scope="module")
def pipe():
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  return diffusers.StableDiffusionXLPipeline.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  dst = tmp_path_factory.mktemp("digits") / "digits-sdxl-jax"
  convert_pipeline("sdxl", FOLDER, dst, log=lambda *_: None)
  tcfg = _config("digits_teacher.py").teacher
  tcfg.weights_dir = str(dst)
  return teacher_lib.load_teacher(tcfg)


def test_folder_is_a_complete_small_sdxl_pipeline():
  for name in COMPONENTS:
    assert (FOLDER / name).is_dir(), name
  index = json.loads((FOLDER / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionXLPipeline"
  assert index["force_zeros_for_empty_prompt"] is True
  sched = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
  assert (sched["_class_name"], sched["timestep_spacing"], sched["steps_offset"],
          sched["beta_schedule"]) == ("EulerDiscreteScheduler", "trailing", 1, "scaled_linear")
  size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
  assert size < MAX_FOLDER_BYTES, size
  assert "held-out" in (FOLDER / "README.md").read_text()


def test_diffusers_loads_the_folder(pipe):
  import diffusers
  assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
  assert pipe.unet.config.addition_embed_type == "text_time"
  assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                  + pipe.text_encoder_2.config.hidden_size)
  assert pipe.vae.config.scaling_factor != 0.13025   # our own, measured on the latents


def test_converted_teacher_loads(teacher):
  assert set(teacher.parts) == {"unet", "vae", "text_encoder", "text_encoder_2"}
  assert teacher.latent_shape == (8, 8, 4)
  cond = teacher.encode_prompts(digits.prompts())
  sep = pretrain.prompt_separation({k: np.asarray(v) for k, v in cond.items()})
  # Different digits give clearly different prompt embeddings.
  assert min(sep["pooled_min_rel_distance"], sep["context_min_rel_distance"]) > 0.2, sep
  assert sep["pooled_max_cosine"] < 0.99, sep


def test_unet_and_text_path_match_diffusers(teacher, pipe):
  import torch
  prompts = [digits.prompts()[3], digits.prompts()[8]]
  ours = teacher.encode_prompts(prompts)
  with torch.no_grad():
    ctx, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
  np.testing.assert_allclose(np.asarray(ours["context"]), ctx.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours["pooled"]), pooled.numpy(), atol=1e-4, rtol=0)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)              # [B, h, w, c]
  t = np.array([999.0, 250.0], np.float32)
  out = np.asarray(jax.jit(teacher.apply)(teacher.denoiser.params, x, t, ours))
  with torch.no_grad():
    ref = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    ctx, added_cond_kwargs=dict(
                        text_embeds=pooled,
                        time_ids=torch.from_numpy(np.array(ours["time_ids"])))).sample
  np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_sampler_matches_diffusers_pipeline(teacher, pipe):
  import torch
  steps, cfg = 4, 3.0
  prompts = [digits.prompts()[0], digits.prompts()[7]]
  param = teacher_lib.make_parameterization(teacher.config, set_alpha_to_one=True)
  cond = teacher.encode_prompts(prompts)
  noise = np.asarray(jax.random.normal(jax.random.key(0), (2, *teacher.latent_shape)))
  sample = jax.jit(sampling.make_ode_sampler(teacher.apply, param, steps, spacing="trailing",
                                             cfg_scale=cfg, sampler="euler"))
  ours = np.asarray(sample(teacher.denoiser.params, noise, cond,
                           conditioning.uncond_like(cond)))
  # diffusers scales `latents` by init_noise_sigma into its VE form: the same start point.
  start = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref = pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=cfg,
               latents=start, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_teacher_samples_follow_their_prompts(teacher):
  """The committed teacher, sampled as the digits benchmark samples it (25 Euler steps,
  the configs' CFG), draws the prompted digit: ``benchmarks/digits_table.py`` measures
  alignment 0.989 at 5000 samples and 0.992 at 1000 (issue 5 asks 0.99 of a student).
  Bound here: 0.97 on 200 samples; a teacher that ignored its prompts scores about 0.1."""
  from adm_jax import evaluation, pairs
  c = _config("digits_dmdx.py")
  c.eval.num_per_prompt = 20
  ev = evaluation.make(c.eval.evaluator)
  images, labels = pairs.teacher_eval_samples(c, teacher, "euler", 25, jax.random.key(7))
  scores = ev.evaluate(images, labels)
  assert scores["alignment"] >= 0.97, scores
  # The same samples told the wrong digit score near zero: alignment reads the prompt.
  wrong = ev.evaluate(images, (labels + 1) % 10)
  assert wrong["alignment"] < 0.05, wrong


def test_vae_reconstructs_heldout_digits():
  cfg, graphdef, params = vae_convert.load(FOLDER / "vae")
  assert cfg.downscale == 4 and cfg.latent_channels == 4
  model = nnx.merge(graphdef, params)
  images, _ = digits.load("heldout", 32)                                  # [N, 32, 32, 3]
  recon = np.asarray(jax.jit(lambda x: model.decode(model.encode(x)))(images))
  mse = float(np.mean(np.square(recon - images)))
  assert mse < HELDOUT_MSE_BOUND, mse


@pytest.fixture
def fast_compile():
  """XLA without most optimisations: halves the compile-bound tiny runs (as Flax's
  examples do in their train tests); restored afterwards."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_tiny_pretrain_runs_end_to_end(tmp_path, fast_compile):
  vae = pretrain.run(_config("digits_vae.py", "tiny"), str(tmp_path))
  assert np.isfinite(vae["final_loss"]) and vae["final_loss"] < vae["first_loss"], vae
  te = pretrain.run(_config("digits_teacher.py", "tiny"), str(tmp_path))
  assert np.isfinite(te["first_loss"]) and np.isfinite(te["final_loss"]), te
  out = tmp_path / "export"
  for name in COMPONENTS:
    assert (out / name).is_dir(), name
  record = json.loads((out / pretrain.SUMMARY).read_text())
  assert set(record) == {"vae", "teacher"}
  assert (tmp_path / "teacher" / "samples.png").stat().st_size > 0
  # The tiny export is a pipeline our converter reads.
  convert_pipeline("sdxl", out, tmp_path / "converted", log=lambda *_: None)
  assert (tmp_path / "converted" / "tokenizer_2" / "vocab.json").exists()


def test_teacher_without_vae_names_the_missing_folder(tmp_path):
  config = _config("digits_teacher.py", "tiny")
  config.pretrain.export_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere" / "vae"))):
    pretrain.run(config, str(tmp_path))
