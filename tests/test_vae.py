"""AutoencoderKL: parity with diffusers, conversion, export and error paths.

Tiny diffusers VAEs are built in-test (random weights, norms perturbed so every
scale / bias matters), saved with ``save_pretrained`` and converted.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adm_jax import tree
from adm_jax.convert import common
from adm_jax.convert import vae as cv
from adm_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOL = 1e-4

VARIANTS = {
    # SD / SDXL style: quant convs, scaling only.
    "sd": dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4),
    # SD3 / Flux style: shift factor, no quant convs.
    "sd3": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=8,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
    # Three blocks (equal channels, no shortcut), no mid-block attention.
    "noattn": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                   mid_block_add_attention=False),
}


def _diffusers_vae(kw: dict, seed: int = 0):
  n = len(kw["block_out_channels"])
  torch.manual_seed(seed)
  m = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=8, sample_size=32, **kw)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory):
  """(name, torch model, saved folder, our config, graphdef, params)."""
  name = request.param
  model = _diffusers_vae(VARIANTS[name])
  folder = tmp_path_factory.mktemp(f"vae_{name}")
  model.save_pretrained(folder)
  cfg, graphdef, params = cv.load(folder)
  return name, model, folder, cfg, graphdef, params


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  model = _diffusers_vae(VARIANTS["sd"], seed=1)
  folder = tmp_path_factory.mktemp("vae_sd_errors")
  model.save_pretrained(folder)
  return folder


def _nchw(x):
  return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _all_outputs(graphdef):
  """One jitted function returning every path we compare."""
  @jax.jit
  def f(params, x, z, latents):
    m = nnx.merge(graphdef, params)
    mean, logvar = m.encode_moments(x)
    return dict(mean=mean, logvar=logvar, enc=m.encode(x), dec_raw=m.decode_raw(z),
                dec=m.decode(latents))
  return f


# -- configuration ---------------------------------------------------------------------

def test_config_round_trip(case):
  _, model, folder, cfg, _, _ = case
  raw = json.loads((folder / "config.json").read_text())
  assert AutoencoderKLConfig.from_diffusers(cfg.to_diffusers()) == cfg
  ours = cfg.to_diffusers()
  for key, value in ours.items():
    if not key.startswith("_"):
      want = raw[key]
      assert value == want, key
  assert set(cv.key_table(cfg)) == set(model.state_dict())


def test_config_rejects_unsupported():
  base = AutoencoderKLConfig(block_out_channels=(32, 64),
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).to_diffusers()
  with pytest.raises(ValueError, match="down_block_types"):
    AutoencoderKLConfig.from_diffusers(
        {**base, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
  with pytest.raises(ValueError, match="up_block_types"):
    AutoencoderKLConfig.from_diffusers({**base, "up_block_types": ["UpDecoderBlock2D"]})
  with pytest.raises(ValueError, match="norm_type"):
    AutoencoderKLConfig.from_diffusers({**base, "norm_type": "spatial"})
  with pytest.raises(ValueError, match="act_fn"):
    AutoencoderKLConfig.from_diffusers({**base, "act_fn": "gelu"})
  # Private diffusers keys and force_upcast are accepted.
  AutoencoderKLConfig.from_diffusers({**base, "_name_or_path": "x", "force_upcast": False})


def test_per_channel_latent_statistics():
  """latents_mean / latents_std follow the SDXL pipelines (e.g. Playground v2.5)."""
  mean, std = (0.1, -0.2, 0.3, 0.0), (0.5, 1.0, 2.0, 4.0)
  cfg = AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4, scaling_factor=0.5,
                            latents_mean=mean, latents_std=std)
  m = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))   # no weights needed
  z = np.random.RandomState(0).randn(2, 4, 4, 4).astype(np.float32)
  lat = np.asarray(m.scale_latents(jnp.asarray(z)))
  np.testing.assert_allclose(lat, (z - np.array(mean)) * 0.5 / np.array(std), rtol=1e-5,
                             atol=1e-6)
  # The pipeline's decode side: latents * std / scaling_factor + mean.
  np.testing.assert_allclose(np.asarray(m.unscale_latents(jnp.asarray(lat))),
                             lat * np.array(std) / 0.5 + np.array(mean), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(m.unscale_latents(jnp.asarray(lat))), z, atol=1e-6)
  assert AutoencoderKLConfig.from_diffusers(cfg.to_diffusers()) == cfg
  with pytest.raises(ValueError, match="shift_factor"):
    dataclasses.replace(cfg, shift_factor=0.1)
  with pytest.raises(ValueError, match="latents_std"):
    dataclasses.replace(cfg, latents_std=None)


# -- parity with diffusers -------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2])
def test_parity(case, batch):
  _, model, _, cfg, graphdef, params = case
  rs = np.random.RandomState(batch)
  x = rs.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)
  hw = 32 // cfg.downscale
  z = rs.randn(batch, hw, hw, cfg.latent_channels).astype(np.float32)
  latents = rs.randn(batch, hw, hw, cfg.latent_channels).astype(np.float32)
  out = _all_outputs(graphdef)(params, jnp.asarray(x), jnp.asarray(z), jnp.asarray(latents))

  sf, shift = cfg.scaling_factor, cfg.shift_factor or 0.0
  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
    want = dict(mean=_nhwc(dist.mean), logvar=_nhwc(dist.logvar),
                enc=(_nhwc(dist.mean) - shift) * sf,
                dec_raw=_nhwc(model.decode(_nchw(z)).sample),
                dec=_nhwc(model.decode(_nchw(latents) / sf + shift).sample))
  for key, ref in want.items():
    assert out[key].shape == ref.shape, key
    assert out[key].dtype == jnp.float32, key
    assert _maxdiff(out[key], ref) <= TOL, (key, _maxdiff(out[key], ref))


def test_sampling_matches_posterior():
  """encode(x, rng) draws (z - shift) * sf with z ~ N(mean, exp(logvar))."""
  model = _diffusers_vae(VARIANTS["sd3"], seed=2)
  cfg = AutoencoderKLConfig.from_diffusers(dict(model.config))
  graphdef, params = cv.abstract_model(cfg)
  flat = common.apply_table({k: v.numpy() for k, v in model.state_dict().items()},
                            cv.key_table(cfg), tree.shapes(params))
  params = tree.unflatten_like(params, flat)

  @jax.jit
  def run(params, x, rng):
    m = nnx.merge(graphdef, params)
    mean, logvar = m.encode_moments(x)
    return mean, logvar, m.encode(x, rng)

  x = jnp.broadcast_to(jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)),
                                   jnp.float32), (16, 32, 32, 3))
  mean, logvar, lat = run(params, x, jax.random.key(0))
  _, _, lat_same = run(params, x, jax.random.key(0))
  _, _, lat_other = run(params, x, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(lat), np.asarray(lat_same))
  assert _maxdiff(lat, lat_other) > 0.1
  z = np.asarray(lat) / cfg.scaling_factor + cfg.shift_factor
  std = np.exp(0.5 * np.asarray(logvar))
  eps = (z - np.asarray(mean)) / std                      # ~ N(0, 1), 16 * 8 * 16 * 16 draws
  assert abs(eps.mean()) < 0.02 and abs(eps.var() - 1) < 0.03, (eps.mean(), eps.var())
  # Per-element empirical mean across the 16 identical images (6 sigma).
  assert np.all(np.abs(z.mean(0) - np.asarray(mean)[0]) < 6 * std[0] / 4)
  # logvar is clamped to [-30, 20] as in DiagonalGaussianDistribution.
  for offset, bound in ((1e3, 20.0), (-1e3, -30.0)):
    bias = flat["encoder.conv_out.bias"].copy()
    bias[cfg.latent_channels:] += offset
    shifted = tree.unflatten_like(params, {**flat, "encoder.conv_out.bias": bias})
    np.testing.assert_array_equal(np.asarray(run(shifted, x, jax.random.key(0))[1]), bound)


def test_bf16_compute_close_to_f32(sd_folder):
  _, graphdef, params = cv.load(sd_folder)
  _, gd16, p16 = cv.load(sd_folder, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in tree.flatten(p16).values())
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
  rec = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
  rec16 = jax.jit(lambda p, x: nnx.merge(gd16, p)(x))(p16, x)
  assert rec16.dtype == jnp.float32
  diff = _maxdiff(rec16, rec)
  assert 0 < diff < 0.05 * float(jnp.abs(rec).max()) + 0.05, diff   # bf16 really ran


# -- export ----------------------------------------------------------------------------

def test_export_round_trip(case, tmp_path):
  _, model, _, cfg, graphdef, params = case
  out = cv.export(cfg, params, tmp_path / "exported")
  # ours -> diffusers.
  back = diffusers.AutoencoderKL.from_pretrained(out).eval()
  x = _nchw(np.random.RandomState(3).uniform(-1, 1, (2, 32, 32, 3)))
  with torch.no_grad():
    a, b = model(x).sample, back(x).sample
  assert float((a - b).abs().max()) == 0.0
  for key, value in model.state_dict().items():
    assert torch.equal(value, back.state_dict()[key]), key
  # ours -> ours, bit-exact (the exporter also takes a model).
  cfg2, _, params2 = cv.load(cv.export(cfg, nnx.merge(graphdef, params), tmp_path / "again"))
  assert cfg2 == cfg
  flat, flat2 = tree.flatten(params), tree.flatten(params2)
  assert set(flat) == set(flat2)
  for key in flat:
    np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(flat2[key]), err_msg=key)


# -- loading variants and errors -------------------------------------------------------

def _copy_with(folder, dst, edit):
  shutil.copytree(folder, dst)
  path = dst / cv.WEIGHTS
  tensors = dict(safetensors_numpy.load_file(str(path)))
  edit(tensors)
  safetensors_numpy.save_file(tensors, str(path))
  return dst


def _flat_params(folder, **kw):
  return tree.flatten(cv.load(folder, **kw)[2])


def test_missing_folder(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    cv.load(missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    cv.load(tmp_path / "empty")


def test_extra_tensor(sd_folder, tmp_path):
  bad = _copy_with(sd_folder, tmp_path / "bad",
                   lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(common.ConversionError, match=r"encoder\.extra\.weight"):
    cv.load(bad)


def test_missing_tensor(sd_folder, tmp_path):
  bad = _copy_with(sd_folder, tmp_path / "bad",
                   lambda t: t.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.bias"))
  with pytest.raises(common.ConversionError,
                     match=r"decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.bias"):
    cv.load(bad)


def test_shape_mismatch(sd_folder, tmp_path):
  bad = _copy_with(sd_folder, tmp_path / "bad",
                   lambda t: t.update({"encoder.conv_in.bias": np.zeros(33, np.float32)}))
  with pytest.raises(common.ConversionError, match=r"shape mismatch.*encoder\.conv_in\.bias"):
    cv.load(bad)


def test_config_weights_disagree(sd_folder, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(sd_folder, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["layers_per_block"] = 1
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(common.ConversionError, match=r"resnets\.1"):
    cv.load(bad)


def test_deprecated_attention_names(sd_folder, tmp_path):
  def rename(t):
    for p in ("encoder", "decoder"):
      for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                       ("proj_attn", "to_out.0")):
        for leaf in ("weight", "bias"):
          t[f"{p}.mid_block.attentions.0.{old}.{leaf}"] = t.pop(
              f"{p}.mid_block.attentions.0.{new}.{leaf}")
  old = _copy_with(sd_folder, tmp_path / "old", rename)
  want, got = _flat_params(sd_folder), _flat_params(old)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_pickle_needs_opt_in_and_pipeline_folder(sd_folder, tmp_path):
  pipe = tmp_path / "pipe"
  vae = pipe / "vae"
  vae.mkdir(parents=True)
  shutil.copy(sd_folder / "config.json", vae / "config.json")
  tensors = safetensors_numpy.load_file(str(sd_folder / cv.WEIGHTS))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             vae / "diffusion_pytorch_model.bin")
  with pytest.raises(common.ConversionError, match="pickle"):
    cv.load(pipe)
  want, got = _flat_params(sd_folder), _flat_params(pipe, allow_pickle=True)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
