"""SAM ViT image encoder: parity with transformers 5, conversion, error paths."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adm_jax import tree  # noqa: E402
from adm_jax.convert import sam as sam_convert  # noqa: E402
from adm_jax.convert.common import ConversionError, write_safetensors  # noqa: E402
from adm_jax.models import sam  # noqa: E402

TOL = 1e-4
# 64 px / patch 8 -> an 8x8 token map; window 3 pads it to 9x9 (exercises the padding),
# window 4 tiles it exactly. Blocks 1 and 3 (0-based) attend globally.
VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
              patch_size=8, global_attn_indexes=[1, 3], output_channels=16, mlp_dim=64,
              use_rel_pos=True)
PROMPT = dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
DECODER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
               iou_head_hidden_dim=16)


def _randomise(model, seed):
  """transformers initialises SAM with std 1e-10 and zero position tables; give every
  parameter an O(1) value so the parity test sees each of them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim >= 2 and "pos" not in name:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(noise / np.sqrt(fan_in))
      else:
        p.copy_(0.3 * noise)
  return model.eval()


def _hf_sam(window_size=3, seed=0, **vision):
  cfg = transformers.SamConfig(
      vision_config=VISION | dict(window_size=window_size) | vision,
      prompt_encoder_config=PROMPT, mask_decoder_config=DECODER)
  return _randomise(transformers.SamModel(cfg), seed)


def _pixels(batch, seed):
  return np.random.default_rng(seed).standard_normal((batch, 64, 64, 3)).astype(np.float32)


def _torch_encoder(encoder, pixels):
  with torch.no_grad():
    o = encoder(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return (o.last_hidden_state.numpy().transpose(0, 2, 3, 1),
          [h.numpy() for h in o.hidden_states])


@jax.jit(static_argnums=(0, 3, 4))
def _apply(graphdef, state, pixels, layers, neck):
  return nnx.merge(graphdef, state)(pixels, feature_layers=layers, neck=neck)


def _ours(graphdef, state, pixels, layers, neck=True):
  """One compiled forward per (model structure, batch, layers): XLA:CPU compiles dominate
  this file's run time, so tests share them."""
  return _apply(graphdef, state, jnp.asarray(pixels), tuple(layers), neck)


def _assert_parity(graphdef, state, encoder, batches=(1, 2)):
  n = len(encoder.layers)
  for batch in batches:
    pixels = _pixels(batch, seed=batch)
    last, hidden = _torch_encoder(encoder, pixels)
    out = _ours(graphdef, state, pixels, tuple(range(n + 1)))
    assert out["last"].shape == last.shape
    np.testing.assert_allclose(np.asarray(out["last"]), last, atol=TOL, rtol=0)
    assert sorted(out["layers"]) == list(range(n + 1))
    for i, ref in enumerate(hidden):
      np.testing.assert_allclose(np.asarray(out["layers"][i]), ref, atol=TOL, rtol=0,
                                 err_msg=f"hidden state {i}")


@pytest.mark.parametrize("window_size", [3, 4])
def test_parity_with_transformers(tmp_path, window_size):
  model = _hf_sam(window_size)
  model.save_pretrained(tmp_path)
  config, graphdef, state = sam_convert.load(tmp_path)
  assert config.window_size == window_size and config.global_attn_indexes == (1, 3)
  _assert_parity(graphdef, state, model.vision_encoder)


def test_vision_model_checkpoint_and_export(tmp_path):
  """SamVisionModel folders load too; export writes one transformers reads back."""
  full = _hf_sam(seed=1)
  vision = transformers.SamVisionModel(full.config.vision_config)
  vision.vision_encoder.load_state_dict(full.vision_encoder.state_dict())
  vision.eval().save_pretrained(tmp_path / "vision")
  config, graphdef, state = sam_convert.load(tmp_path / "vision")
  _assert_parity(graphdef, state, vision.vision_encoder, batches=(2,))
  sam_convert.export(config, state, tmp_path / "out")
  back = transformers.SamVisionModel.from_pretrained(tmp_path / "out").eval()
  ref, got = vision.state_dict(), back.state_dict()
  assert set(ref) == set(got)
  assert all(torch.equal(ref[k], got[k]) for k in ref)
  config2, _, state2 = sam_convert.load(tmp_path / "out")
  assert config2 == config
  f1, f2 = tree.flatten(state), tree.flatten(state2)
  assert all(np.array_equal(np.asarray(f1[k]), np.asarray(f2[k])) for k in f1)


def test_key_table_covers_vision_encoder():
  model = _hf_sam()
  names = {k for k in model.state_dict() if k.startswith("vision_encoder.")}
  config = sam.SamVisionConfig.from_hf(model.config.to_dict())
  assert set(sam_convert.key_table(config)) == names
  others = {k.split(".")[0] + "." for k in model.state_dict()
            if not k.startswith("vision_encoder.")}
  assert others <= set(sam_convert.IGNORED_PREFIXES)


def test_features_only_stops_early(tmp_path):
  model = _hf_sam()
  model.save_pretrained(tmp_path)
  _, graphdef, state = sam_convert.load(tmp_path)
  pixels = _pixels(2, seed=5)
  _, hidden = _torch_encoder(model.vision_encoder, pixels)
  out = _ours(graphdef, state, pixels, (1, 2), neck=False)
  assert out["last"] is None and sorted(out["layers"]) == [1, 2]
  for i in (1, 2):
    np.testing.assert_allclose(np.asarray(out["layers"][i]), hidden[i], atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="feature_layers"):
    nnx.merge(graphdef, state)(jnp.asarray(pixels), feature_layers=(5,))
  with pytest.raises(ValueError, match="64, 64, 3"):
    nnx.merge(graphdef, state)(jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("q,k,length", [(4, 4, 7), (5, 5, 7), (3, 3, 11), (2, 2, 9)])
def test_get_rel_pos_matches_transformers(q, k, length):
  """Including the linear resize of a table of another length."""
  table = np.random.default_rng(0).standard_normal((length, 6)).astype(np.float32)
  ref = transformers.models.sam.modeling_sam.SamVisionAttention.get_rel_pos(
      None, q, k, torch.from_numpy(table)).numpy()
  got = np.asarray(sam.get_rel_pos(q, k, jnp.asarray(table)))
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_bfloat16_compute(tmp_path):
  model = _hf_sam()
  model.save_pretrained(tmp_path)
  _, graphdef, state = sam_convert.load(tmp_path, dtype=jnp.bfloat16)
  pixels = _pixels(1, seed=3)
  out = _ours(graphdef, state, pixels, (2,))
  assert out["last"].dtype == jnp.bfloat16 and out["layers"][2].dtype == jnp.bfloat16
  last, _ = _torch_encoder(model.vision_encoder, pixels)
  err = np.abs(np.asarray(out["last"], np.float32) - last)
  assert err.mean() < 0.05 and err.max() < 0.5


def test_gradient_reaches_pixels(tmp_path):
  model = _hf_sam()
  model.save_pretrained(tmp_path)
  _, graphdef, state = sam_convert.load(tmp_path)
  enc = nnx.merge(graphdef, state)

  def f(images):
    x = sam.preprocess(images, 64)
    return sum(jnp.sum(v ** 2) for v in enc(x, feature_layers=(2,), neck=False)
               ["layers"].values())
  g = jax.jit(jax.grad(f))(jnp.asarray(np.tanh(_pixels(1, seed=0)[:, :32, :48])))
  assert g.shape == (1, 32, 48, 3) and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).max()) > 0


def test_preprocess():
  mean, std = np.array(sam.PIXEL_MEAN), np.array(sam.PIXEL_STD)
  grey = jnp.zeros((2, 40, 40, 3))                  # 0 in [-1, 1] -> 0.5
  out = np.asarray(sam.preprocess(grey, 64))
  assert out.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(out, np.broadcast_to((0.5 - mean) / std, out.shape), atol=1e-6)
  wide = jnp.ones((1, 32, 64, 3))                   # 1 -> 1.0; resized to 32x64, padded
  out = np.asarray(sam.preprocess(wide, 64, pad=True))
  assert out.shape == (1, 64, 64, 3)
  np.testing.assert_allclose(out[:, :32], np.broadcast_to((1 - mean) / std, (1, 32, 64, 3)),
                             atol=1e-6)
  assert np.all(out[:, 32:] == 0)
  same = jnp.asarray(np.tanh(_pixels(1, 0)))        # already 64x64: no resampling
  np.testing.assert_allclose(np.asarray(sam.preprocess(same, 64)),
                             ((np.asarray(same) + 1) / 2 - mean) / std, atol=1e-6)


def test_missing_folder(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    sam_convert.load(missing)


def _rewrite(folder, change):
  from safetensors.numpy import load_file
  path = folder / "model.safetensors"
  tensors = load_file(str(path))
  change(tensors)
  write_safetensors(path, tensors, {"format": "pt"})


def test_extra_and_missing_tensor(tmp_path):
  _hf_sam().save_pretrained(tmp_path)
  sam_convert.load(tmp_path)                        # ignored prompt / decoder keys: fine
  extra = {"vision_encoder.surprise": np.zeros(3, np.float32)}
  _rewrite(tmp_path, lambda t: t.update(extra))
  with pytest.raises(ConversionError, match="vision_encoder.surprise"):
    sam_convert.load(tmp_path)
  _rewrite(tmp_path, lambda t: (t.pop("vision_encoder.surprise"),
                                t.update(surprise=np.zeros(3, np.float32))))
  with pytest.raises(ConversionError, match="surprise"):
    sam_convert.load(tmp_path)
  _rewrite(tmp_path, lambda t: (t.pop("surprise"),
                                t.pop("vision_encoder.layers.2.attn.rel_pos_w")))
  with pytest.raises(ConversionError, match=r"vision_encoder\.layers\.2\.attn\.rel_pos_w"):
    sam_convert.load(tmp_path)


def test_vision_only_checkpoint_refuses_decoder_keys(tmp_path):
  config = transformers.SamVisionConfig(**VISION, window_size=4)
  vision = transformers.SamVisionModel(config)
  vision.save_pretrained(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({"mask_decoder.x": np.zeros(2, np.float32)}))
  with pytest.raises(ConversionError, match=r"mask_decoder\.x"):
    sam_convert.load(tmp_path)


def test_wrong_shape(tmp_path):
  _hf_sam().save_pretrained(tmp_path)
  _rewrite(tmp_path, lambda t: t.update({"vision_encoder.pos_embed":
                                         np.zeros((1, 4, 4, 32), np.float32)}))
  with pytest.raises(ConversionError, match="pos_embed"):
    sam_convert.load(tmp_path)


def test_config_round_trip_and_errors(tmp_path):
  model = _hf_sam()
  model.save_pretrained(tmp_path)
  full = json.loads((tmp_path / "config.json").read_text())
  config = sam.SamVisionConfig.from_hf(full)
  assert config == sam.SamVisionConfig.from_hf(full["vision_config"])
  assert config.mlp_dim == 64 and config.image_size == 64 and config.grid_size == 8
  assert sam.SamVisionConfig.from_hf(config.to_hf()) == config
  hf = transformers.SamVisionConfig(**config.to_hf())
  assert hf.global_attn_indexes == [1, 3] and hf.mlp_dim == 64
  vision = full["vision_config"]
  assert sam.SamVisionConfig.from_hf(vision | {"mlp_dim": None}).mlp_dim == 128
  assert sam.SamVisionConfig.from_hf(vision | {"image_size": [64, 64]}).image_size == 64
  with pytest.raises(ValueError, match="image_size"):
    sam.SamVisionConfig.from_hf(vision | {"image_size": [64, 32]})
  with pytest.raises(ValueError, match="hidden_act"):
    sam.SamVisionConfig.from_hf(vision | {"hidden_act": "swish"})
  with pytest.raises(ValueError, match="num_attention_heads"):
    sam.SamVisionConfig.from_hf(vision | {"num_attention_heads": 5})
  with pytest.raises(ValueError, match="global_attn_indexes"):
    sam.SamVisionConfig.from_hf(vision | {"global_attn_indexes": [7]})
  with pytest.raises(ValueError, match="model_type"):
    sam.SamVisionConfig.from_hf(vision | {"model_type": "clip_vision_model"})
  vit_h = sam.PRESETS["vit_h"]
  assert (vit_h.hidden_size, vit_h.num_hidden_layers, vit_h.mlp_dim) == (1280, 32, 5120)


def test_abstract_vit_h_shapes():
  """The ViT-H encoder ADM uses builds abstractly with the expected parameter count."""
  _, abstract = sam_convert.abstract_model(sam.PRESETS["vit_h"])
  n = sum(int(np.prod(s)) for s in tree.shapes(abstract).values())
  assert 630e6 < n < 640e6                           # SAM ViT-H image encoder: ~637M
