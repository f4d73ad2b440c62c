"""End to end on a tiny SDXL pipeline: convert CLI -> main --mode=sample, against
diffusers' StableDiffusionXLPipeline with the same noise, prompts, steps and guidance."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_sdxl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_convert_then_sample_matches_diffusers_pipeline(tmp_path):
  src, dst, work = tmp_path / "tiny-sdxl", tmp_path / "weights", tmp_path / "work"
  pipe = tiny_sdxl.build_pipeline(src)
  _run("adm_jax.convert", "--family=sdxl", f"--src={src}", f"--dst={dst}")
  for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
    assert (dst / name).is_dir(), name
  # Converting again into the same place refuses to overwrite.
  r = subprocess.run([sys.executable, "-m", "adm_jax.convert", f"--src={src}",
                      f"--dst={dst}"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode != 0 and "exists" in r.stderr

  steps, cfg = 4, 5.0
  _run("adm_jax.main", "--config=configs/sdxl_onestep.py:tiny", f"--workdir={work}",
       "--mode=sample", f"--config.teacher.weights_dir={dst}",
       f"--config.sample.num_steps={steps}", f"--config.sample.guidance_scale={cfg}",
       # 2 prompts x 4 = 8 samples: split over the 8 fake CPU devices (data axis), with the
       # teacher FSDP-sharded by config.sharding_rules.
       "--config.sample.num_per_prompt=4", "--config.mesh=(('data', 2), ('fsdp', 4))",
       "--config.sharding_rules=(('.*', 'fsdp'),)")
  assert (work / "samples.png").stat().st_size > 0
  r = _run("adm_jax.main", "--config=configs/sdxl_onestep.py:tiny", f"--workdir={work}",
           "--mode=check", f"--config.teacher.weights_dir={dst}")
  n_unet = sum(p.numel() for p in pipe.unet.parameters())
  assert f"unet             {n_unet / 1e6:10.2f} M parameters" in r.stdout
  assert "latent shape at 32px: (16, 16, 4)" in r.stdout
  out = np.load(work / "samples.npz")
  latents, prompts = out["latents"], [str(p) for p in out["prompts"]]
  assert out["images"].shape == (8, 32, 32, 3)

  # diffusers with the same starting noise: ours is x_T = noise in VP scaling; diffusers'
  # Euler scales `latents` by init_noise_sigma = 1 / alpha_T into its VE form, the same
  # point.
  import jax
  noise = np.array(jax.random.normal(jax.random.key(0), latents.shape))
  start = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref = pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=cfg,
               latents=start, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(latents, ref, atol=2e-4, rtol=0)


def test_partial_conversion_names_the_missing_tokenizer(tmp_path):
  src, dst = tmp_path / "tiny-sdxl", tmp_path / "weights"
  tiny_sdxl.build_pipeline(src)
  _run("adm_jax.convert", f"--src={src}", f"--dst={dst}", "--components=unet,vae")
  _run("adm_jax.convert", f"--src={src}", f"--dst={dst}",
       "--components=text_encoder,text_encoder_2")
  r = subprocess.run([sys.executable, "-m", "adm_jax.main",
                      "--config=configs/sdxl_onestep.py:tiny", f"--workdir={tmp_path}",
                      "--mode=check", f"--config.teacher.weights_dir={dst}"], cwd=ROOT,
                     capture_output=True, text=True)
  # Tokenizers were not copied by a partial conversion: a clear error names them.
  assert r.returncode != 0 and str(dst / "tokenizer") in r.stderr


def test_export_cli_round_trip(tmp_path):
  import diffusers
  src, dst = tmp_path / "tiny-sdxl", tmp_path / "weights"
  pipe = tiny_sdxl.build_pipeline(src)
  _run("adm_jax.convert", f"--src={src}", f"--dst={dst}", "--components=unet")
  _run("adm_jax.convert", "--export", f"--src={dst / 'unet'}", f"--dst={tmp_path / 'out'}")
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out")
  ref = pipe.unet.state_dict()
  for k, v in back.state_dict().items():
    assert torch.equal(v, ref[k]), k
